"""The ``moe`` lab: dense vs mixture-of-experts from scratch vs upcycled, at equal training compute.

One biography corpus (the knowledge lab's: N people, held-out and training wordings) and four runs of one seed:
- ``dense``: the dense model trained for ``steps`` steps;
- ``moe``: an MoE of the same active size (``experts`` experts of width d_ff / ``granularity``, ``top_k`` per
  token, so k/G = 1 dense MLP of compute per token) from scratch for ``steps`` steps;
- ``dense-continued``: the dense run's weights at ``steps``/2 (a separate run with the same seed and schedule up to
  there) trained ``steps``/2 more steps on a fresh cosine schedule from ``continue_lr``;
- ``upcycled``: the same half-trained dense weights upcycled (every MLP split into G slices, copied to E experts;
  the first forward equals the dense model's) and trained ``steps``/2 more steps on that same fresh schedule.
Every run uses the same active parameters per token, so equal steps are equal training FLOPs (6 · active
non-embedding parameters · tokens, plus attention, identical across runs). Logged against FLOPs: the attribute
loss and the greedy attribute accuracy on held-out wordings (and on training wordings); after training, each MoE
layer's expert load (share of the token assignments each expert received on one fixed batch of the corpus).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from omnilm.lab.compare import plot_runs, runs_table, with_flops
from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import evaluator, loader, new_model, seen_probes, train, write_corpus
from omnilm.utils.atomic import write_text_atomic

ARMS = ("dense", "moe", "dense-continued", "upcycled")


@dataclass
class MoeLabConfig(KnowledgeConfig):
    """N = 300 people, 500 steps per run (4 runs, 2,000 steps of training in all): about 10 minutes on 2 cores."""

    people: int = 300
    steps: int = 500
    eval_every: int = 50
    eval_examples: int = 300
    seeds: int = 1
    experts: int = 8
    top_k: int = 2
    granularity: int = 2
    #: Peak learning rate of the second half of the continued runs (a fresh cosine schedule).
    continue_lr: float = 1e-3


def run_moe_lab(config: MoeLabConfig, out: str | Path) -> dict[str, Any]:
    """Run the lab into ``out``: ``moe.png``, ``moe_load.png``, ``results.json``, ``report.md``."""
    from omnilm.model.moe import active_params, expert_load
    from omnilm.model.upcycle import upcycle

    out = Path(out)
    corpus = write_corpus(config, out / "data")
    tokenizer = corpus.tokenizer
    probes = seen_probes(corpus, config)
    evaluate = evaluator(tokenizer, probes)
    data = {"all": corpus.tokens}
    seed, half = 0, config.steps // 2
    moe_fields = {"n_experts": config.experts, "n_experts_per_tok": config.top_k}
    runs: dict[str, dict[str, Any]] = {}
    # Expert load is measured on one fixed batch of the corpus.
    load_batch = loader(data, config, seed + 99).next_batch()

    tokens_per_step = config.batch_size * config.seq_len

    def record(name: str, model: torch.nn.Module, rows: list[dict[str, float]], offset: int = 0,
               first: list[dict[str, float]] | None = None, first_flops: float = 0.0) -> None:
        """Log a run; a continued one starts with the rows (and FLOPs per step) of its first half."""
        flops = 6.0 * active_params(model) * tokens_per_step
        curve = with_flops(first or [], first_flops) + with_flops(rows, flops, offset, first_flops * offset)
        runs[name] = {"curve": curve, "params": sum(p.numel() for p in model.parameters()),
                      "active_params": active_params(model), "load": _load(model, load_batch, expert_load)}

    dense = new_model(config, tokenizer, seed)
    record("dense", dense, train(config, dense, loader(data, config, seed), evaluate, seed, out / "dense"))
    sparse = replace(config, model=dict(config.model) | moe_fields | {"moe_d_ff": dense.config.ff_dim //
                                                                        config.granularity})
    moe = new_model(sparse, tokenizer, seed)
    record("moe", moe, train(sparse, moe, loader(data, config, seed), evaluate, seed, out / "moe"))
    # The shared first half: the dense run up to steps/2, on the full run's schedule.
    base = new_model(config, tokenizer, seed)
    first = train(config, base, loader(data, config, seed), evaluate, seed, out / "half", steps=half,
                  schedule_steps=config.steps)
    for name in ("dense-continued", "upcycled"):
        model = upcycle(base, config.experts, config.top_k, config.granularity, seed) if name == "upcycled" \
            else _copy(base)
        rows = train(config, model.train(), loader(data, config, seed + 1), evaluate, seed, out / name,
                     steps=config.steps - half, lr=config.continue_lr)
        record(name, model, rows, offset=half, first=first, first_flops=6.0 * active_params(base) * tokens_per_step)
    return {"config": asdict(config), "runs": runs}


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _load(model: torch.nn.Module, tokens: torch.Tensor, expert_load: Any) -> list[list[float]]:
    """Each MoE layer's share of the token assignments per expert on ``tokens`` (empty for a dense model)."""
    model.eval()
    with torch.no_grad():
        model(tokens[:, :-1])
    return [[c / (sum(counts) or 1) for c in counts] for counts in expert_load(model)]


def write_outputs(results: dict[str, Any], config: MoeLabConfig, out: Path) -> None:
    """Plots and report from ``results`` (also from a saved ``results.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    plot_runs(runs, out / "moe.png")
    loaded = {name: run["load"] for name, run in runs.items() if run["load"]}
    if loaded:
        layers = max(len(v) for v in loaded.values())
        fig, axes = plt.subplots(len(loaded), layers, figsize=(3 * layers, 2.5 * len(loaded)), squeeze=False)
        for row, (name, load) in enumerate(loaded.items()):
            for layer, shares in enumerate(load):
                ax = axes[row][layer]
                ax.bar(range(len(shares)), shares)
                ax.axhline(1 / len(shares), color="gray", lw=0.8, ls="--")
                ax.set_title(f"{name}, layer {layer}", fontsize=9)
                ax.set_xlabel("expert", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "moe_load.png", dpi=110)
        plt.close(fig)
    write_text_atomic(out / "report.md", moe_report(results))


def moe_report(results: dict[str, Any]) -> str:
    config, runs = results["config"], results["runs"]
    busiest = {name: [f"{max(max(layer) * len(layer) for layer in run['load']):.2f}" if run["load"] else "-"]
               for name, run in runs.items()}
    lines = [f"# MoE lab: N = {config['people']} people, {config['steps']} steps per run, "
             f"{config['experts']} experts, top-{config['top_k']}, granularity {config['granularity']}", ""]
    lines += runs_table(runs, busiest, ["max expert load / uniform"])
    lines += ["", "Final evaluation of each run; loss and accuracy are on seen people's attributes. The last column "
              "is the busiest expert's share of assignments divided by 1/E, in the worst layer (1 = balanced)."]
    return "\n".join(lines) + "\n"
