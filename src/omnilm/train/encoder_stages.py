"""Stage types of the encoder family: ``mlm`` (BERT), ``electra`` and ``classify``.

``mlm`` and ``electra`` read tokenised datasets like ``pretrain``: each row is ``[CLS]`` plus seq_len − 1 tokens of
a window, masked on the fly from a generator seeded by (seed, batch index, rank), so a resumed run masks exactly
as an uninterrupted one. The tokenizer gains ``[CLS] [SEP] [MASK] [PAD]`` when it lacks them. Options:

mlm, electra: ``mask_prob`` (0.15), ``replace_mask`` (0.8), ``replace_random`` (0.1), ``whole_word`` (false)
mlm also: ``next_sentence`` (false; true trains BERT's next-sentence head on segment pairs and writes
``BertForPreTraining``)
electra also: ``disc_weight`` λ (50), ``generator_size_divisor`` (4: the generator is a quarter as wide); the model
folder is the discriminator, with the generator in ``generator/``; one process only
classify: jsonl records with a text and a label field: ``text_field`` ("text"), ``label_field`` ("label"),
``labels`` (the class names in order; default: the sorted labels of the training records), ``eval_data``
(a jsonl file evaluated for accuracy), ``eval_where`` (its record filter), ``strict`` (false)

A model comes from ``model:`` (``family: bert|electra`` or ``preset:``) or ``init_from`` (an encoder folder; for
``classify`` an MLM or ELECTRA discriminator folder gets its family's fresh classification head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.train.stage import StageConfig, register_stage, stage_options, stage_setup
from omnilm.train.trainer import Trainer, TrainResult

MASKING_OPTIONS = {"mask_prob": 0.15, "replace_mask": 0.8, "replace_random": 0.1, "whole_word": False}
MLM_OPTIONS = MASKING_OPTIONS | {"next_sentence": False}
ELECTRA_OPTIONS = MASKING_OPTIONS | {"disc_weight": 50.0, "generator_size_divisor": 4}
CLASSIFY_OPTIONS = {"text_field": "text", "label_field": "label", "labels": None, "eval_data": None,
                    "eval_where": None, "strict": False}


class TransformedBatches:
    """Batches of ``loader`` passed through ``fn(batch, generator)``, the generator seeded by (seed, the loader's
    batch index, rank): resumable exactly, since the loader's state fixes the next seed."""

    def __init__(self, loader: Any, fn: Any, seed: int, rank: int) -> None:
        self.loader, self.fn, self.seed, self.rank = loader, fn, seed, rank

    def generator(self) -> Any:
        """The next batch's generator (drawn before the loader advances)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.loader.batch_index * 7_919 + self.rank)
                                             % 2**63)

    def next_batch(self) -> Any:
        generator = self.generator()
        return self.fn(self.loader.next_batch(), generator)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def encoder_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of [CLS] [SEP] [MASK] [PAD] (added to the tokenizer when missing); its pad token becomes [PAD]."""
    from omnilm.tokenizer.families import ensure_family_tokens

    ids = ensure_family_tokens(tokenizer, "bert")
    tokenizer.pad_token = "[PAD]"
    return {"cls": ids["[CLS]"], "sep": ids["[SEP]"], "mask": ids["[MASK]"], "pad": ids["[PAD]"]}


def special_id_tensor(tokenizer: Any) -> torch.Tensor:
    """Every special token id of the tokenizer (never masked, never a word part)."""
    return torch.tensor(sorted(tokenizer.backend.get_added_tokens_decoder()), dtype=torch.long)


def word_start_table(tokenizer: Any) -> torch.Tensor:
    """(vocab,) bool: the token opens a word (byte-level BPE marks a leading space with 'Ġ'; specials count)."""
    table = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for token, index in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        table[index] = token.startswith(("Ġ", "Ċ")) or not token[:1].isalnum()
    table[special_id_tensor(tokenizer)] = True
    return table


def masking_fn(seq_len: int, tokenizer: Any, options: dict[str, Any]) -> Any:
    """(B, ≥ seq_len − 1) windows -> a masked batch of (B, seq_len) rows that open with [CLS] (``options``: the
    keys of MASKING_OPTIONS; with ``next_sentence`` true, segment pairs as ``sentence_pairs`` makes them, with
    ``token_type_ids`` and ``nsp_labels``)."""
    from omnilm.objectives.mlm import MaskingConfig, mask_tokens

    ids = encoder_ids(tokenizer)
    masking = MaskingConfig(float(options["mask_prob"]), float(options["replace_mask"]),
                            float(options["replace_random"]), bool(options["whole_word"]))
    specials = special_id_tensor(tokenizer)
    starts = word_start_table(tokenizer)
    vocab = tokenizer.vocab_size
    pairs = bool(options.get("next_sentence", False))

    def transform(window: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        window = torch.as_tensor(window)
        extra: dict[str, torch.Tensor] = {}
        if pairs:
            tokens, types, nsp = sentence_pairs(window, seq_len, ids, generator)
            extra = {"token_type_ids": types, "nsp_labels": nsp}
        else:
            tokens = torch.cat([torch.full((window.shape[0], 1), ids["cls"], dtype=torch.long),
                                window[:, :seq_len - 1]], dim=1)  # (B, seq_len)
        maskable = ~torch.isin(tokens, specials)
        inputs, labels = mask_tokens(tokens, masking, ids["mask"], vocab, maskable, generator, starts[tokens])
        return {"inputs": inputs, "labels": labels, "attention_mask": torch.ones_like(tokens)} | extra

    return transform


def sentence_pairs(window: torch.Tensor, seq_len: int, ids: dict[str, int],
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-sentence-prediction rows ``[CLS] A [SEP] B [SEP]`` (B, ≤ seq_len) from windows (B, ≥ seq_len − 3):
    segment A is a window's first half; B is the half after it (label 0) or, with probability ½, the second half
    of the next row's window, text from elsewhere in the corpus (label 1). Token types: 0 up to the first [SEP],
    1 after. Returns (tokens, token types, labels)."""
    rows, half = window.shape[0], (seq_len - 3) // 2
    first, second = window[:, :half], window[:, half:2 * half]
    nsp = (torch.rand(rows, generator=generator) < 0.5).long() if rows > 1 else torch.zeros(rows, dtype=torch.long)
    second = torch.where(nsp[:, None].bool(), second.roll(1, 0), second)
    column = lambda token: torch.full((rows, 1), token, dtype=torch.long)  # noqa: E731
    tokens = torch.cat([column(ids["cls"]), first, column(ids["sep"]), second, column(ids["sep"])], dim=1)
    types = torch.zeros_like(tokens)
    types[:, half + 2:] = 1
    return tokens, types, nsp


def encoder_builder(head: str, **overrides: Any) -> Any:
    """``stage_setup``'s model builder for an encoder with ``head``."""

    def build(config: StageConfig, tokenizer: Any, resume_from: Path | None, seed: int) -> nn.Module:
        from omnilm.model.families import fresh_model
        from omnilm.model.hf_encoder import load_encoder

        pad = encoder_ids(tokenizer)["pad"]
        if resume_from is not None:
            return load_encoder(resume_from, dtype=torch.float32)
        torch.manual_seed(seed)
        if config.init_from:
            model = load_encoder(config.init_from, head=head, dtype=torch.float32, **overrides)
        else:
            if not config.model:
                raise ConfigError(f"stage {config.name!r}: set model (family/preset) or init_from")
            model = fresh_model(config.model, head, vocab_size=tokenizer.vocab_size, pad_token_id=pad, **overrides)
        check_encoder(config, model.config, tokenizer)
        return model

    return build


def check_encoder(config: StageConfig, model_config: Any, tokenizer: Any) -> None:
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"stage {config.name!r}: the model's vocabulary ({model_config.vocab_size}) is smaller "
                          f"than the tokenizer's ({tokenizer.vocab_size}, with the encoder's special tokens)")
    if model_config.max_seq_len < config.train.seq_len:
        raise ConfigError(f"stage {config.name!r}: train.seq_len={config.train.seq_len} exceeds the model's "
                          f"max_seq_len={model_config.max_seq_len}")


def masked_val_batches(config: StageConfig, info: Any, transform: Any) -> list[dict[str, torch.Tensor]]:
    """Fixed masked batches of the ``val`` splits (same masks at every evaluation)."""
    from omnilm.data.loader import BatchLoader, TokenDataset

    val = {n: TokenDataset.open(s.path, "val") for n, s in config.data.items() if (Path(s.path) / "val").is_dir()}
    if not val or config.train.eval_batches <= 0:
        return []
    loader = BatchLoader(val, config.train.batch_size, config.train.seq_len, seed=config.train.seed + 1,
                         rank=info.rank, world_size=info.world_size)
    return [transform(loader.next_batch(), torch.Generator().manual_seed(i)) for i in range(config.train.eval_batches)]


def mlm_evaluator(batches: list[dict[str, torch.Tensor]], device: torch.device, logits_of: Any) -> Any:
    from omnilm.objectives.lm import IGNORE_INDEX
    from omnilm.objectives.mlm import mlm_loss

    def evaluate(model: nn.Module) -> dict[str, float]:
        losses, correct, total = [], 0, 0
        for batch in batches:
            b = {k: v.to(device) for k, v in batch.items()}
            logits = logits_of(model, b)
            losses.append(mlm_loss(logits, b["labels"]).item())
            chosen = b["labels"] != IGNORE_INDEX
            correct += int((logits.argmax(-1)[chosen] == b["labels"][chosen]).sum())
            total += int(chosen.sum())
        return {"val_mlm_loss": sum(losses) / len(losses), "val_mlm_acc": correct / max(total, 1)}

    return evaluate if batches else None


@register_stage("mlm")
def run_mlm_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    """BERT's masked-language-model pre-training."""
    from omnilm.train.distributed import wrap_model
    from omnilm.train.pretrain import token_batches

    options = stage_options(config, MLM_OPTIONS)
    pairs = bool(options["next_sentence"])
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume,
                                                              encoder_builder("pretraining" if pairs else "mlm"))
    transform = masking_fn(config.train.seq_len, tokenizer, options)
    loader = TransformedBatches(token_batches(config, info), transform, config.train.seed, info.rank)
    model = wrap_model(model, config.train.distributed, info, device)

    def logits_of(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = m(b["inputs"], b["attention_mask"], b.get("token_type_ids"))
        return out[0] if pairs else out

    evaluate = mlm_evaluator(masked_val_batches(config, info, transform), device, logits_of)
    trainer = Trainer(model, mlm_objective, loader, config.train, out_dir, info=info, tokenizer=tokenizer,
                      evaluate=evaluate)
    return trainer.fit(resume=resume_from is not None)


def mlm_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The MLM loss of a masked batch (``masking_fn``'s); with ``nsp_labels``, plus the next-sentence
    cross-entropy of a model with both heads (logged as ``nsp_loss``, ``nsp_acc``)."""
    import torch.nn.functional as F

    from omnilm.objectives.mlm import mlm_loss

    if "nsp_labels" not in batch:
        return mlm_loss(model(batch["inputs"], batch["attention_mask"]), batch["labels"]), {}
    logits, nsp = model(batch["inputs"], batch["attention_mask"], batch["token_type_ids"])
    nsp_loss = F.cross_entropy(nsp.float(), batch["nsp_labels"])
    accuracy = (nsp.argmax(-1) == batch["nsp_labels"]).float().mean().item()
    return mlm_loss(logits, batch["labels"]) + nsp_loss, {"nsp_loss": nsp_loss.item(), "nsp_acc": accuracy}


def with_sample_seed(transform: Any) -> Any:
    """``transform`` whose batches also carry ``sample_seed``, drawn from the batch's generator after masking: the
    seed of the generator's replacements, so a resumed ELECTRA run samples exactly as an uninterrupted one."""

    def seeded(window: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return transform(window, generator) | {"sample_seed": torch.randint(2**62, (), generator=generator)}

    return seeded


def electra_objective(disc_weight: float) -> Any:
    """ELECTRA's joint loss of a masked batch (``with_sample_seed``'s) for an ``ElectraPretraining`` model."""
    from omnilm.objectives.mlm import electra_step

    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = batch["inputs"]
        sampler = torch.Generator(inputs.device).manual_seed(int(batch["sample_seed"]))
        return electra_step(model.generator, model.discriminator, inputs, batch["labels"], batch["attention_mask"],
                            disc_weight, sampler)

    return objective


def electra_builder(size_divisor: int) -> Any:
    def build(config: StageConfig, tokenizer: Any, resume_from: Path | None, seed: int) -> nn.Module:
        from omnilm.model.electra import ElectraPretraining
        from omnilm.model.encoder import load_encoder_config

        pad = encoder_ids(tokenizer)["pad"]
        if resume_from is not None or config.init_from:
            return ElectraPretraining.from_folder(resume_from or config.init_from, dtype=torch.float32)
        if not config.model:
            raise ConfigError(f"stage {config.name!r}: set model (family/preset) or init_from")
        from dataclasses import replace

        spec = dict(config.model)
        spec.pop("family", None)
        disc = replace(load_encoder_config(spec | ({} if "preset" in spec else {"family": "electra"})),
                       family="electra", vocab_size=tokenizer.vocab_size, pad_token_id=pad)
        check_encoder(config, disc, tokenizer)
        torch.manual_seed(seed)
        return ElectraPretraining.fresh(disc, size_divisor)

    return build


@register_stage("electra")
def run_electra_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    """ELECTRA's joint generator/discriminator pre-training (replaced-token detection)."""
    from omnilm.train.pretrain import token_batches

    options = stage_options(config, ELECTRA_OPTIONS)
    device, info, tokenizer, model, resume_from = stage_setup(
        config, out_dir, resume, electra_builder(int(options["generator_size_divisor"])))
    if info.world_size > 1:
        raise ConfigError(f"stage {config.name!r}: the electra stage runs in one process")
    transform = with_sample_seed(masking_fn(config.train.seq_len, tokenizer, options))
    loader = TransformedBatches(token_batches(config, info), transform, config.train.seed, info.rank)
    objective = electra_objective(float(options["disc_weight"]))
    evaluate = mlm_evaluator(masked_val_batches(config, info, transform), device,
                             lambda m, b: m.generator(b["inputs"], b["attention_mask"]))
    trainer = Trainer(model, objective, loader, config.train, out_dir, info=info, tokenizer=tokenizer,
                      evaluate=evaluate)
    return trainer.fit(resume=resume_from is not None)


# ---------------------------------------------------------------------------------------------- classify


def classification_examples(paths: list[str], where: dict | None, tokenizer: Any, options: dict[str, Any],
                            labels: list[str], max_len: int, strict: bool) -> list[tuple[list[int], int]]:
    """(``[CLS] text [SEP]`` ids truncated to ``max_len``, label index) of every record."""
    from omnilm.data.chat_data import read_records

    ids = encoder_ids(tokenizer)
    out = []
    for record, location in read_records(paths, where, strict=strict):
        text, label = record.get(options["text_field"]), record.get(options["label_field"])
        if not isinstance(text, str) or str(label) not in labels:
            if strict:
                raise ConfigError(f"{location}: needs a text {options['text_field']!r} and a label in {labels}")
            continue
        body = tokenizer.encode(text, special=False)[:max_len - 2]
        out.append(([ids["cls"], *body, ids["sep"]], labels.index(str(label))))
    return out


def classification_batch(examples: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    from omnilm.data.examples import pad_right

    return {"inputs": pad_right([e[0] for e in examples], pad),
            "attention_mask": pad_right([[1] * len(e[0]) for e in examples], 0),
            "labels": torch.tensor([e[1] for e in examples])}


def classification_accuracy(model: nn.Module, examples: list[tuple[list[int], int]], pad: int, device: torch.device,
                            batch_size: int = 64) -> float:
    """Share of ``examples`` whose arg-max class is the label."""
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in classification_batch(examples[start:start + batch_size], pad).items()}
        correct += int((model(batch["inputs"], batch["attention_mask"]).argmax(-1) == batch["labels"]).sum())
    return correct / max(len(examples), 1)


@register_stage("classify")
def run_classify_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    """Sequence classification: an encoder with a classifier on the pooled [CLS] state, cross-entropy."""
    import torch.nn.functional as F

    from omnilm.data.chat_data import read_records
    from omnilm.data.examples import ExampleLoader
    from omnilm.train.distributed import wrap_model

    options = stage_options(config, CLASSIFY_OPTIONS)
    strict = bool(options["strict"])
    labels = options["labels"]
    if labels is None:
        found = {str(r.get(options["label_field"])) for s in config.data.values()
                 for r, _ in read_records([s.path], s.where) if options["label_field"] in r}
        labels = sorted(found)
    labels = [str(label) for label in labels]
    if len(labels) < 2:
        raise ConfigError(f"stage {config.name!r}: classify needs at least two labels, found {labels}")
    device, info, tokenizer, model, resume_from = stage_setup(
        config, out_dir, resume, encoder_builder("classify", num_labels=len(labels)))
    pad = encoder_ids(tokenizer)["pad"]
    seq_len = config.train.seq_len
    examples = [e for s in config.data.values()
                for e in classification_examples([s.path], s.where, tokenizer, options, labels, seq_len, strict)]
    loader = ExampleLoader(len(examples), config.train.batch_size,
                           lambda idx: classification_batch([examples[i] for i in idx], pad),
                           seed=config.train.seed, rank=info.rank, world_size=info.world_size)
    evaluate = None
    if options["eval_data"]:
        held_out = classification_examples([options["eval_data"]], options["eval_where"], tokenizer, options, labels,
                                           seq_len, strict)

        def evaluate(model: nn.Module) -> dict[str, float]:
            return {"val_accuracy": classification_accuracy(model, held_out, pad, device)}

    model = wrap_model(model, config.train.distributed, info, device)

    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["inputs"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"]), {}

    mean_len = sum(len(e[0]) for e in examples) / max(len(examples), 1)
    trainer = Trainer(model, objective, loader, config.train, out_dir, info=info, tokenizer=tokenizer,
                      evaluate=evaluate, tokens_per_batch=round(mean_len * config.train.batch_size))
    return trainer.fit(resume=resume_from is not None)
