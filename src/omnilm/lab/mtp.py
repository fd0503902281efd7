"""The ``mtp`` lab: does multi-token prediction change held-out-wording accuracy at equal compute?

One biography corpus (the knowledge lab's) and, from the same initialisation seed, a next-token-only run and runs
with ``heads`` extra heads (independent and sequential), every run ``steps`` steps. The heads cost compute (their
feed-forward blocks and one more unembedding each), so the runs are compared against training FLOPs:
6 · (active non-embedding parameters + (1 + heads) · V · D) per token. The report gives each run's final metrics
and its held-out accuracy at the smallest budget of all runs (the next-token run's). Gloeckle et al. (2024)
report gains that grow with model size and losses for small models; this lab runs the smallest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnilm.lab.compare import plot_runs, runs_table, with_flops
from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import evaluator, loader, new_model, seen_probes, train, write_corpus
from omnilm.utils.atomic import write_text_atomic


@dataclass
class MtpLabConfig(KnowledgeConfig):
    """N = 300 people, 500 steps per run, three runs: about 8 minutes on 2 cores."""

    people: int = 300
    steps: int = 500
    eval_every: int = 50
    eval_examples: int = 300
    seeds: int = 1
    heads: int = 2
    #: Loss weight of every extra head.
    head_weight: float = 1.0


def run_mtp_lab(config: MtpLabConfig, out: str | Path) -> dict[str, Any]:
    """Run the lab into ``out``: ``mtp.png``, ``results.json``, ``report.md``."""
    from omnilm.model.moe import active_params
    from omnilm.model.mtp import MTPConfig, MultiTokenModel
    from omnilm.objectives.mtp import multi_token_objective

    out = Path(out)
    corpus = write_corpus(config, out / "data")
    tokenizer = corpus.tokenizer
    evaluate = evaluator(tokenizer, seen_probes(corpus, config))
    tokens_per_step = config.batch_size * config.seq_len
    runs: dict[str, dict[str, Any]] = {}
    for name, variant in (("next-token", None), ("mtp independent", "independent"),
                          ("mtp sequential", "sequential")):
        model = new_model(config, tokenizer, seed=0)  # the same trunk initialisation in every run
        objective, heads = None, 0
        if variant is not None:
            heads = config.heads
            mtp = MTPConfig(n_heads=heads, variant=variant, loss_weights=(config.head_weight,) * heads)
            model = MultiTokenModel(model, mtp)
            objective = multi_token_objective(mtp.weights)
        batches = loader({"all": corpus.tokens}, config, 0)
        rows = train(config, model, batches, evaluate, 0, out / name.replace(" ", "-"), objective=objective)
        unembedding = (1 + heads) * model.config.vocab_size * model.config.d_model
        flops = 6.0 * (active_params(model) + unembedding) * tokens_per_step
        runs[name] = {"curve": with_flops(rows, flops), "params": sum(p.numel() for p in model.parameters()),
                      "active_params": active_params(model)}
    return {"config": asdict(config), "runs": runs}


def write_outputs(results: dict[str, Any], config: MtpLabConfig, out: Path) -> None:
    plot_runs(results["runs"], out / "mtp.png")
    lines = [f"# MTP lab: N = {config.people} people, {config.steps} steps per run, {config.heads} extra heads "
             f"(loss weight {config.head_weight} each)", ""]
    lines += runs_table(results["runs"])
    lines += ["", "The heads' extra compute is in the FLOPs; the held-out accuracy at the common budget is read off "
              "each run's curve (linear interpolation) at the next-token run's total FLOPs."]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
