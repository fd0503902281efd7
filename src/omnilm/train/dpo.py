"""Direct preference optimisation (stage type ``dpo``) against a frozen copy of the starting model.

Data: jsonl preference records (``prompt``, ``chosen``, ``rejected``; see ``omnilm.data.chat_data``). Each
micro-batch holds B chosen and B rejected conversations right-padded in one tensor; the policy and the frozen
reference score the assistant tokens of both. Options (``options:`` of the stage):

``beta`` (0.1)               strength of the implicit KL constraint
``loss_type`` (sigmoid)      ``sigmoid`` (DPO) or ``ipo`` (IPO; uses per-token average log-probs)
``label_smoothing`` (0.0)    conservative DPO: the share of preference labels assumed flipped
``nll_weight`` (0.0)         α of RPO (Pang et al., 2024): α × the chosen reply's mean token NLL is added to each
                             pair's loss, so that preferring the chosen reply cannot lower its own likelihood
``strict`` (false)           a bad record fails the run instead of being skipped and reported
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.data.sources import ReadReport
from omnilm.train.distributed import Dist, wrap_model
from omnilm.train.sft import padding_id, print_read_report
from omnilm.train.stage import StageConfig, frozen_reference, register_stage, stage_options, stage_setup
from omnilm.train.trainer import SummedObjective, Trainer, TrainResult

if TYPE_CHECKING:
    from omnilm.data.chat_data import PreferenceExample

DPO_OPTIONS = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "nll_weight": 0.0, "strict": False}


def preference_pairs(config: StageConfig, tokenizer: Any, strict: bool, info: Dist) -> list[PreferenceExample]:
    """The tokenised (chosen, rejected) pairs of all the stage's sources, truncated to seq_len + 1 tokens; the
    main process prints what was read and skipped."""
    from omnilm.data.chat_data import load_preference_examples

    report = ReadReport()
    pairs = []
    for source in config.data.values():
        pairs += load_preference_examples([source.path], tokenizer, config.train.seq_len + 1, source.where,
                                          strict=strict, report=report)
    if info.is_main:
        print_read_report(config.name, report, len(pairs))
    return pairs


def dpo_objective(reference: nn.Module, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, nll_weight: float = 0.0) -> SummedObjective:
    """The DPO (or IPO) loss of batches holding B chosen rows then B rejected rows, against the frozen
    ``reference``, plus ``nll_weight`` × each chosen reply's mean token NLL (RPO). Its unit is the pair: every
    pair of the global batch weighs the same, however the pairs are split into micro-batches and processes."""
    from omnilm.objectives.logprobs import sequence_logprobs
    from omnilm.objectives.preference import dpo_loss

    if nll_weight < 0:
        raise ConfigError(f"dpo: nll_weight must not be negative, got {nll_weight}")
    average = loss_type == "ipo"

    def loss_sums(policy: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, float]]:
        tokens, mask = batch["tokens"], batch["loss_mask"]
        scored = mask[:, 1:].sum(-1).clamp(min=1)
        summed = sequence_logprobs(policy, tokens, None, mask)
        logps = summed / scored if average else summed
        with torch.no_grad():
            ref = sequence_logprobs(reference, tokens, None, mask, average=average)
        n = tokens.shape[0] // 2
        total, metrics = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta, loss_type=loss_type,
                                  label_smoothing=label_smoothing, reduction="sum")
        if nll_weight:
            chosen_nll = -summed[:n] / scored[:n]
            total = total + nll_weight * chosen_nll.sum()
            metrics["nll/chosen"] = float(chosen_nll.detach().mean())
        return {"pairs": total}, metrics

    return SummedObjective(loss_sums, lambda batch: {"pairs": batch["tokens"].shape[0] // 2})


@register_stage("dpo")
def run_dpo_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.data.examples import ExampleLoader, pad_right

    options = stage_options(config, DPO_OPTIONS)
    if not config.init_from:
        raise ConfigError(f"stage {config.name!r}: dpo needs init_from (the model to align and its reference)")
    train = config.train
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume)
    reference = frozen_reference(config.init_from, device)
    pairs = preference_pairs(config, tokenizer, bool(options["strict"]), info)
    pad = padding_id(tokenizer)

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]
        return {"tokens": pad_right([r.ids for r in rows], pad), "loss_mask": pad_right([r.mask for r in rows], 0)}

    objective = dpo_objective(reference, float(options["beta"]), options["loss_type"],
                              float(options["label_smoothing"]), float(options["nll_weight"]))
    loader = ExampleLoader(len(pairs), train.batch_size, collate, seed=train.seed, rank=info.rank,
                           world_size=info.world_size)
    model = wrap_model(model, train.distributed, info, device)
    mean_len = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs) / max(len(pairs), 1)
    trainer = Trainer(model, objective, loader, train, out_dir, info=info, tokenizer=tokenizer,
                      tokens_per_batch=round(mean_len * train.batch_size))
    return trainer.fit(resume=resume_from is not None)
