"""The ``attention-patching`` study: do recall circuits form in attention during the plateau?

A reference model is trained and snapshotted at every evaluation. Fresh models are then trained whose
attention *patterns* (the softmax weights of every head in every layer) are not their own but those the
reference snapshot computes on the same input; everything else (embeddings, value/output projections, MLPs)
is learned as usual. If the patterns from after the plateau already encode "attend to the person's name",
the fresh model should skip the plateau (the study's finding); patterns from before it should not help.

Patching works through forward hooks, so the model class is untouched and checkpoints stay ordinary:
a pre-hook on the patched model runs the reference on the same arguments, recording each layer's pattern;
each patched attention module's output is replaced by o_proj(pattern @ V(x)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import (
    Snapshots,
    evaluator,
    loader,
    new_model,
    phases_of,
    seen_probes,
    train,
    write_corpus,
)
from omnilm.lab.knowledge.plots import plot_groups
from omnilm.lab.knowledge.report import pm, table
from omnilm.model.attention import apply_rope
from omnilm.utils.atomic import write_json_atomic, write_text_atomic


def attention_pattern(attn: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention weights (B, heads, T, T) of an omnilm attention module on its input ``x``."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    allowed = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return F.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).to(x.dtype)


def mix_values(attn: nn.Module, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The attention module's output for a given pattern: o_proj(pattern @ V(x)) with V from ``attn``."""
    B, T, _ = x.shape
    v = attn.v_proj(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
    return attn.o_proj((pattern @ v).transpose(1, 2).reshape(B, T, -1))


class AttentionPatch:
    """Makes ``model`` attend with the patterns ``reference`` computes on the same input (see module docstring).

    Usable while training: the reference is frozen and runs without gradients. ``remove()`` undoes the hooks.
    """

    def __init__(self, model: nn.Module, reference: nn.Module) -> None:
        if len(model.blocks) != len(reference.blocks):
            raise ValueError("the reference must have as many layers as the patched model")
        self.reference = reference.eval().requires_grad_(False)
        self.patterns: list[torch.Tensor | None] = [None] * len(model.blocks)
        self.handles = [model.register_forward_pre_hook(self._run_reference, with_kwargs=True)]
        for index, (mine, theirs) in enumerate(zip(model.blocks, reference.blocks, strict=True)):
            self.handles.append(theirs.attn.register_forward_pre_hook(self._recorder(index)))
            self.handles.append(mine.attn.register_forward_hook(self._replacer(index)))

    def _run_reference(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            self.reference(*args, **kwargs)

    def _recorder(self, index: int) -> Any:
        def record(module: nn.Module, args: tuple) -> None:
            x, rope, mask, _cache = args
            self.patterns[index] = attention_pattern(module, x, rope, mask)
        return record

    def _replacer(self, index: int) -> Any:
        def replace(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            pattern = self.patterns[index]
            if pattern is None or pattern.shape[-1] != args[0].shape[1]:
                raise RuntimeError("attention patching supports full-sequence forward passes only (no KV cache)")
            self.patterns[index] = None
            return mix_values(module, args[0], pattern)
        return replace

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class PatchingConfig(KnowledgeConfig):
    """N = 400 so that the reference has a plateau; the reference and three patched runs, one seed."""

    people: int = 400
    steps: int = 600
    eval_every: int = 25
    eval_examples: int = 300
    seeds: int = 1
    patch_from: list[str] = field(default_factory=lambda: ["before", "during", "after"])  # reference snapshots


def snapshot_steps(steps: list[int], phases: dict[str, Any]) -> dict[str, int]:
    """Which evaluation step stands for "before", "during" and "after" the plateau of the reference run.

    before: the first evaluation (still in the initial drop); during: the plateau's middle; after: the
    emergence step, or the last evaluation when knowledge never emerged by the loss criterion.
    """
    start = phases["drop_end"] if phases["drop_end"] is not None else steps[0]
    end = phases["emergence_step"] if phases["emergence_step"] is not None else steps[-1]
    middle = min(steps, key=lambda s: abs(s - (start + end) / 2))
    return {"before": steps[0], "during": middle, "after": end}


def run_patching(config: PatchingConfig, out: str | Path) -> dict[str, Any]:
    """Reference run, then one patched run per ``patch_from`` entry and seed; plots, table, results."""
    out = Path(out)
    corpus = write_corpus(config, out / "data")
    tokenizer = corpus.tokenizer
    probes = seen_probes(corpus, config)
    evaluate = evaluator(tokenizer, probes)
    baseline, prefix = probes[config.probe_wording].baseline, config.phase_prefix()
    groups: dict[str, list] = {"reference (own attention)": []}
    phases: dict[str, list] = {"reference (own attention)": []}
    chosen: list[dict[str, int]] = []
    for seed in range(config.seeds):
        reference = new_model(config, tokenizer, seed)
        snapshots = Snapshots(evaluate)
        rows = train(config, reference, loader({"all": corpus.tokens}, config, seed), snapshots, seed,
                     out / f"seed-{seed}" / "reference")
        found = phases_of(rows, baseline, config, prefix)
        groups["reference (own attention)"].append(rows)
        phases["reference (own attention)"].append(found)
        steps = [r["step"] for r in rows]
        points = snapshot_steps(steps, found)
        chosen.append(points)
        for when in config.patch_from:
            source = new_model(config, tokenizer, seed)
            source.load_state_dict(snapshots.states[steps.index(points[when]) + 1])
            # A different seed for the patched model's own weights and data order than the reference's.
            student = new_model(config, tokenizer, 1000 + seed)
            patch = AttentionPatch(student, source)
            rows = train(config, student, loader({"all": corpus.tokens}, config, 1000 + seed), evaluate,
                         1000 + seed, out / f"seed-{seed}" / f"patched-{when}")
            patch.remove()
            name = f"patterns from step {points[when]} ({when})" if config.seeds == 1 else f"patterns {when}"
            groups.setdefault(name, []).append(rows)
            phases.setdefault(name, []).append(phases_of(rows, baseline, config, prefix))
    results = {"config": asdict(config), "baseline": baseline, "snapshot_steps": chosen,
               "phases": phases, "curves": groups}
    write_json_atomic(out / "results.json", results)
    write_outputs(results, config, out)
    return results


def write_outputs(results: dict[str, Any], config: PatchingConfig, out: Path) -> None:
    """Plot and report from ``results`` (also used to redraw them from a saved ``results.json``)."""
    plot_groups(results["curves"], {"": results["baseline"]}, out / "patching.png", prefix=config.phase_prefix())
    write_text_atomic(out / "report.md", patching_report(results, config))


def first_step_above(rows: list[dict[str, float]], accuracy: float, prefix: str = "") -> int | None:
    """The first evaluation step where attribute accuracy reaches ``accuracy`` (None if it never does)."""
    return next((r["step"] for r in rows if r[prefix + "accuracy"] >= accuracy), None)


def patching_report(results: dict[str, Any], config: PatchingConfig) -> str:
    prefix = config.phase_prefix()
    rows = []
    for name, curves in results["curves"].items():
        found = results["phases"][name]
        rows.append([name, pm([p["drop_end"] for p in found], 0), pm([p["emergence_step"] for p in found], 0),
                     pm([p["plateau_length"] for p in found], 0),
                     pm([first_step_above(c, 0.1, prefix) for c in curves], 0),
                     pm([c[-1][prefix + "loss"] for c in curves]), pm([c[-1][prefix + "accuracy"] for c in curves])])
    reference = results["phases"]["reference (own attention)"]
    after = [v for k, v in results["phases"].items() if k.endswith("(after)") or k == "patterns after"]
    ref_emerge = [p["emergence_step"] for p in reference]
    after_emerge = [p["emergence_step"] for p in after[0]] if after else []
    if not after_emerge or None in after_emerge or None in ref_emerge:
        verdict = "not decided: knowledge did not emerge (by the loss criterion) in every compared run"
    else:
        ref_plateau, after_plateau = [p["plateau_length"] for p in reference], [p["plateau_length"] for p in after[0]]
        change = (f"knowledge emerges at step {pm(after_emerge, 0)} instead of {pm(ref_emerge, 0)}, plateau "
                  f"{pm(after_plateau, 0)} instead of {pm(ref_plateau, 0)} steps")
        if max(after_plateau) <= config.eval_every:
            verdict = f"reproduced: no plateau left at the evaluation grid ({change})"
        elif max(after_emerge) < min(ref_emerge):
            verdict = f"partially reproduced: shortened, not removed ({change})"
        else:
            verdict = f"not reproduced ({change})"
    lines = ["# Knowledge acquisition: attention patching", "", config.describe() + f"; probes: "
             f"{config.probe_wording.replace('_', ' ')}.", "",
             f"No-knowledge baseline {results['baseline']:.3f} nats/token; reference snapshots used: "
             f"{results['snapshot_steps']}.", ""]
    lines += table(["run", "end of initial drop", "knowledge emerges", "plateau length", "accuracy ≥ 0.1 at",
                    "final loss", "final accuracy"], rows)
    lines += ["", f"Post-plateau patterns remove the plateau: {verdict}.", "", "![patching](patching.png)", ""]
    return "\n".join(lines)
