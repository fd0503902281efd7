"""Stage types of the encoder–decoder families: ``span_corruption`` (T5), ``denoise`` (BART), ``seq2seq_sft``.

``span_corruption`` and ``denoise`` read tokenised datasets like ``pretrain``; every window is corrupted on the
fly by a generator seeded by (seed, batch index, rank), so resuming reproduces the batches. ``train.seq_len`` is
the encoder input length: span corruption draws the longer windows that fit it after corruption (T5's lengths,
see ``objectives.span_corruption``). Options:

span_corruption: ``noise_density`` (0.15), ``mean_noise_span_length`` (3), ``sentinels`` (100; added to the
tokenizer as ``<extra_id_N>`` when missing)
denoise: ``permute_sentences`` (true), ``rotate`` (false), ``infill_ratio`` (0.3), ``poisson_lambda`` (3),
``mask_prob`` (0), ``delete_prob`` (0); the mask token ``<mask>`` is added when missing
seq2seq_sft: jsonl records with an ``input_field`` ("input") and an ``output_field`` ("output"); ``eval_data`` (a
jsonl file scored by exact match of greedy outputs), ``eval_where``, ``max_new_tokens`` (64), ``strict`` (false)

A model comes from ``model:`` (``family: t5|bart`` or ``preset:``) or ``init_from`` (a T5 or BART folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.train.encoder_stages import TransformedBatches
from omnilm.train.stage import StageConfig, register_stage, stage_options, stage_setup
from omnilm.train.trainer import Trainer, TrainResult

SPAN_OPTIONS = {"noise_density": 0.15, "mean_noise_span_length": 3.0, "sentinels": 100}
DENOISE_OPTIONS = {"permute_sentences": True, "rotate": False, "infill_ratio": 0.3, "poisson_lambda": 3.0,
                   "mask_prob": 0.0, "delete_prob": 0.0}
SFT_OPTIONS = {"input_field": "input", "output_field": "output", "eval_data": None, "eval_where": None,
               "max_new_tokens": 64, "strict": False}


class NumpyTransformedBatches(TransformedBatches):
    """Batches of ``loader`` passed through ``fn(batch, rng)`` with a numpy generator seeded by (seed, batch index,
    rank)."""

    def generator(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.loader.batch_index, self.rank])


def special_ids(tokenizer: Any) -> dict[str, int]:
    """Pad, EOS and BOS ids for an encoder–decoder (pad falls back to EOS; BOS to EOS in config.json only: a
    tokenizer without BOS gets no BOS in the sequences, since an EOS there would end generation at once)."""
    eos = tokenizer.eos_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token, which encoder-decoders need")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
    return {"eos": eos, "pad": pad, "bos": tokenizer.bos_id if tokenizer.bos_id is not None else eos}


def seq2seq_builder(family_tokens: str | None = None, sentinels: int = 100) -> Any:
    """``stage_setup``'s builder: a T5/BART model (fresh, ``init_from`` or resumed); adds ``family_tokens``'s
    special tokens to the tokenizer first."""

    def build(config: StageConfig, tokenizer: Any, resume_from: Path | None, seed: int) -> nn.Module:
        from omnilm.model.families import SEQ2SEQ_TYPES, fresh_model, load_any
        from omnilm.tokenizer.families import ensure_family_tokens

        if family_tokens:
            ensure_family_tokens(tokenizer, family_tokens, sentinels)
        folder = resume_from or config.init_from
        if folder is not None:
            model = load_any(folder, dtype=torch.float32)
            if not hasattr(model, "decode"):
                raise ConfigError(f"stage {config.name!r}: {folder} is not an encoder-decoder ({SEQ2SEQ_TYPES})")
        else:
            if not config.model:
                raise ConfigError(f"stage {config.name!r}: set model (family/preset) or init_from")
            ids = special_ids(tokenizer)
            family = config.model.get("family") or ("bart" if str(config.model.get("preset", "")).startswith("bart")
                                                    else "t5")
            start = ids["pad"] if family == "t5" else ids["eos"]
            extra = {"bos_token_id": ids["bos"]} if family == "bart" else {}
            torch.manual_seed(seed)
            model = fresh_model(dict(config.model) | {"family": family}, vocab_size=tokenizer.vocab_size,
                                pad_token_id=ids["pad"], eos_token_id=ids["eos"], decoder_start_token_id=start, **extra)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"stage {config.name!r}: the model's vocabulary ({model.config.vocab_size}) is smaller "
                              f"than the tokenizer's ({tokenizer.vocab_size})")
        return model

    return build


def loss_evaluator(batches: list[dict[str, torch.Tensor]], device: torch.device) -> Any:
    from omnilm.objectives.seq2seq import seq2seq_loss

    def evaluate(model: nn.Module) -> dict[str, float]:
        losses = [seq2seq_loss(model, {k: v.to(device) for k, v in b.items()})[0].item() for b in batches]
        return {"val_loss": sum(losses) / len(losses)}

    return evaluate if batches else None


def corrupted_val_batches(config: StageConfig, info: Any, window_len: int, transform: Any) -> list[Any]:
    from omnilm.data.loader import BatchLoader, TokenDataset

    val = {n: TokenDataset.open(s.path, "val") for n, s in config.data.items() if (Path(s.path) / "val").is_dir()}
    if not val or config.train.eval_batches <= 0:
        return []
    loader = BatchLoader(val, config.train.batch_size, window_len - 1, seed=config.train.seed + 1, rank=info.rank,
                         world_size=info.world_size)
    return [transform(loader.next_batch(), np.random.default_rng([config.train.seed, i]))
            for i in range(config.train.eval_batches)]


def window_loader(config: StageConfig, info: Any, window_len: int) -> Any:
    """Windows of exactly ``window_len`` tokens from the stage's tokenised datasets."""
    from omnilm.data.loader import BatchLoader, TokenDataset
    from omnilm.train.pretrain import mixture_weights

    train = config.train
    datasets = {name: TokenDataset.open(source.path, "train") for name, source in config.data.items()}
    return BatchLoader(datasets, train.batch_size, window_len - 1, seed=train.seed, rank=info.rank,
                       world_size=info.world_size, weights=mixture_weights(config),
                       batches_per_step=train.accumulation(info.world_size))


def _run_corruption_stage(config: StageConfig, out_dir: Path, resume: bool, build: Any, window_len: int,
                          transform: Any, tokens_per_batch: int) -> TrainResult:
    from omnilm.objectives.seq2seq import seq2seq_loss
    from omnilm.train.distributed import wrap_model

    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume, build)
    bound = transform(tokenizer)
    loader = NumpyTransformedBatches(window_loader(config, info, window_len), bound, config.train.seed, info.rank)
    evaluate = loss_evaluator(corrupted_val_batches(config, info, window_len, bound), device)
    model = wrap_model(model, config.train.distributed, info, device)
    trainer = Trainer(model, seq2seq_loss, loader, config.train, out_dir, info=info, tokenizer=tokenizer,
                      evaluate=evaluate, tokens_per_batch=tokens_per_batch)
    return trainer.fit(resume=resume_from is not None)


@register_stage("span_corruption")
def run_span_corruption_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    """T5's span-corruption pre-training."""
    from omnilm.objectives.span_corruption import SpanCorruptionConfig, compute_input_and_target_lengths

    options = stage_options(config, SPAN_OPTIONS)
    spans = SpanCorruptionConfig(float(options["noise_density"]), float(options["mean_noise_span_length"]))
    window_len, targets_len = compute_input_and_target_lengths(config.train.seq_len, spans)
    count = int(options["sentinels"])
    return _run_corruption_stage(config, out_dir, resume, seq2seq_builder("t5", count), window_len,
                                 lambda tokenizer: span_corruption_fn(tokenizer, spans, count),
                                 config.train.batch_size * (config.train.seq_len + targets_len))


def span_corruption_fn(tokenizer: Any, spans: Any, sentinels: int) -> Any:
    """(B, window) token windows and a numpy generator -> a span-corrupted seq2seq batch (``spans``: a
    SpanCorruptionConfig; ``sentinels`` ids are added to the tokenizer when missing)."""
    from omnilm.objectives.span_corruption import span_corruption_batch
    from omnilm.tokenizer.families import sentinel_ids

    ids, eos = sentinel_ids(tokenizer, sentinels), special_ids(tokenizer)["eos"]

    def corrupt(windows: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        inputs, targets = span_corruption_batch(np.asarray(windows), spans, ids, eos, rng)
        inputs = torch.as_tensor(inputs, dtype=torch.long)
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs),
                "labels": torch.as_tensor(targets, dtype=torch.long)}

    return corrupt


@register_stage("denoise")
def run_denoise_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    """BART's denoising pre-training: noised text in, the original out."""
    from omnilm.objectives.denoise import bart_noising
    from omnilm.objectives.seq2seq import pad_pairs
    from omnilm.tokenizer.families import BART_MASK

    options = stage_options(config, DENOISE_OPTIONS)
    window_len = config.train.seq_len - 2  # (BOS and) EOS around each window

    def transform(tokenizer: Any) -> Any:
        ids = special_ids(tokenizer)
        mask_id = tokenizer.add_special_tokens([BART_MASK])[0]
        ends = [t for t in (tokenizer.token_to_id(p) for p in (".", "!", "?")) if t is not None]
        noising = bart_noising(mask_id, ends, options)
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []

        def corrupt(windows: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
            rows = [list(map(int, w)) for w in np.asarray(windows)]
            noised = [[*bos, *noising(row, rng), ids["eos"]] for row in rows]
            clean = [[*bos, *row, ids["eos"]] for row in rows]
            return pad_pairs(noised, clean, ids["pad"])

        return corrupt

    return _run_corruption_stage(config, out_dir, resume, seq2seq_builder("bart"), window_len, transform,
                                 2 * config.train.batch_size * config.train.seq_len)


# ---------------------------------------------------------------------------------------------- seq2seq_sft


def pair_examples(paths: list[str], where: dict | None, tokenizer: Any, model_config: Any, options: dict[str, Any],
                  max_len: int, strict: bool) -> list[tuple[list[int], list[int]]]:
    """(input ids, target ids) of every record, each ending with EOS (BART's also opening with BOS)."""
    from omnilm.data.chat_data import read_records

    eos = model_config.eos_token_id
    bos_id = getattr(model_config, "bos_token_id", eos)
    bos = [bos_id] if bos_id != eos else []
    out = []
    for record, location in read_records(paths, where, strict=strict):
        source, target = record.get(options["input_field"]), record.get(options["output_field"])
        if not isinstance(source, str) or not isinstance(target, str):
            if strict:
                raise ConfigError(f"{location}: needs text fields {options['input_field']!r} and "
                                  f"{options['output_field']!r}")
            continue
        src = bos + tokenizer.encode(source, special=False)[:max_len - 1 - len(bos)] + [eos]
        tgt = bos + tokenizer.encode(target, special=False)[:max_len - 1 - len(bos)] + [eos]
        out.append((src, tgt))
    return out


def exact_match(model: nn.Module, examples: list[tuple[list[int], list[int]]], max_new_tokens: int,
                batch_size: int = 64) -> float:
    """Share of examples whose greedy output equals the target (EOS included)."""
    from omnilm.infer.generate import FINISHED
    from omnilm.infer.sampling import SamplingParams
    from omnilm.infer.seq2seq import seq2seq_generate_ids

    config = model.config
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    hits = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        outputs: list[list[int]] = [[] for _ in chunk]
        for step in seq2seq_generate_ids(model, [e[0] for e in chunk], params, [config.eos_token_id],
                                         config.pad_token_id):
            for row, token in enumerate(step.tolist()):
                if token != FINISHED:
                    outputs[row].append(token)
        bos = getattr(config, "bos_token_id", None)
        for (_, target), output in zip(chunk, outputs, strict=True):
            expected = target[1:] if bos is not None and target[:1] == [bos] and output[:1] != [bos] else target
            hits += int(output == expected)
    return hits / max(len(examples), 1)


@register_stage("seq2seq_sft")
def run_seq2seq_sft_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    """Fine-tune an encoder-decoder on input -> output pairs."""
    from omnilm.data.examples import ExampleLoader
    from omnilm.objectives.seq2seq import pad_pairs, seq2seq_loss
    from omnilm.train.distributed import unwrap, wrap_model

    options = stage_options(config, SFT_OPTIONS)
    strict = bool(options["strict"])
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume, seq2seq_builder())
    seq_len = config.train.seq_len
    examples = [e for s in config.data.values()
                for e in pair_examples([s.path], s.where, tokenizer, model.config, options, seq_len, strict)]
    pad = model.config.pad_token_id
    loader = ExampleLoader(len(examples), config.train.batch_size,
                           lambda idx: pad_pairs([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad),
                           seed=config.train.seed, rank=info.rank, world_size=info.world_size)
    evaluate = None
    if options["eval_data"]:
        held_out = pair_examples([options["eval_data"]], options["eval_where"], tokenizer, model.config, options,
                                 seq_len, strict)

        def evaluate(model: nn.Module) -> dict[str, float]:
            return {"val_exact_match": exact_match(unwrap(model), held_out, int(options["max_new_tokens"]))}

    model = wrap_model(model, config.train.distributed, info, device)
    mean_len = sum(len(a) + len(b) for a, b in examples) / max(len(examples), 1)
    trainer = Trainer(model, seq2seq_loss, loader, config.train, out_dir, info=info, tokenizer=tokenizer,
                      evaluate=evaluate, tokens_per_batch=round(mean_len * config.train.batch_size))
    return trainer.fit(resume=resume_from is not None)
