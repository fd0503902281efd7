"""The ``selective`` lab: selective language modelling (Rho-1) on biographies mixed with noise.

The corpus mixes the knowledge lab's biographies with as many noise documents: the words of a random biography
shuffled, with random numbers strewn between them (text whose next token cannot be learned). A reference model is
trained on the clean biographies alone (``reference_steps``); then, from the same initialisation, a standard run
and a selective run (the ``keep`` fraction of each batch's tokens with the highest excess loss over the
reference) train on the mixture (``noise_weight`` of the batches' documents drawn from the noise) for ``steps``
steps each. Both process the same tokens per step, so the comparison is per training token; the selective run
also pays a reference forward pass per step (one third of a training step's FLOPs, in its FLOPs column), and
the reference's own training is reported beside them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnilm.lab.compare import plot_runs, runs_table, with_flops
from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import evaluator, loader, new_model, seen_probes, tokenize, train, write_corpus
from omnilm.utils.atomic import write_text_atomic


@dataclass
class SelectiveLabConfig(KnowledgeConfig):
    """N = 300 people, 500 steps per run on the mixture, a 250-step reference: about 7 minutes on 2 cores."""

    people: int = 300
    steps: int = 500
    eval_every: int = 50
    eval_examples: int = 300
    seeds: int = 1
    reference_steps: int = 250
    #: Fraction of each batch's tokens the selective run trains on.
    keep: float = 0.6
    #: Share of the training mixture drawn from the noise documents.
    noise_weight: float = 0.5


def noise_documents(bios: Path, out: Path, seed: int = 0) -> Path:
    """One noise document per training biography: its words shuffled, random numbers inserted (jsonl)."""
    from omnilm.data.synth.io import write_jsonl
    from omnilm.eval.attributes import read_jsonl

    rng = random.Random(seed)
    docs = []
    for record in read_jsonl(bios / "train.jsonl"):
        words = record["text"].split()
        rng.shuffle(words)
        for _ in range(max(1, len(words) // 4)):
            words.insert(rng.randrange(len(words) + 1), str(rng.randrange(10 ** rng.randint(1, 6))))
        docs.append({"text": " ".join(words)})
    write_jsonl(out, docs)
    return out


def run_selective_lab(config: SelectiveLabConfig, out: str | Path) -> dict[str, Any]:
    """Run the lab into ``out``: ``selective.png``, ``results.json``, ``report.md``."""
    from omnilm.model.moe import active_params
    from omnilm.objectives.selective import selective_objective

    out = Path(out)
    corpus = write_corpus(config, out / "data")
    tokenizer = corpus.tokenizer
    noise = tokenize(noise_documents(corpus.bios, out / "data" / "noise.jsonl"), corpus.tokenizer_dir,
                     out / "data" / "noise_tokens")
    evaluate = evaluator(tokenizer, seen_probes(corpus, config))
    mixture = {"bios": corpus.tokens, "noise": noise}
    weights = {"bios": 1 - config.noise_weight, "noise": config.noise_weight}
    tokens_per_step = config.batch_size * config.seq_len
    reference = new_model(config, tokenizer, seed=1)
    reference_rows = train(config, reference, loader({"bios": corpus.tokens}, config, 1), evaluate, 1,
                           out / "reference", steps=config.reference_steps)
    reference.eval().requires_grad_(False)
    runs: dict[str, dict[str, Any]] = {}
    for name in ("standard", "selective"):
        model = new_model(config, tokenizer, seed=0)
        objective = selective_objective(reference, config.keep) if name == "selective" else None
        rows = train(config, model, loader(mixture, config, 0, weights), evaluate, 0, out / name,
                     objective=objective)
        train_flops = 6.0 * active_params(model) * tokens_per_step
        # The selective run also scores every token with the reference (a forward pass: 2 FLOPs per parameter).
        flops = train_flops * (4 / 3 if name == "selective" else 1)
        runs[name] = {"curve": with_flops(rows, flops), "params": sum(p.numel() for p in model.parameters()),
                      "active_params": active_params(model), "tokens_per_step": tokens_per_step}
    return {"config": asdict(config), "runs": runs,
            "reference": {"curve": reference_rows, "flops": 6.0 * active_params(reference) * tokens_per_step
                          * config.reference_steps}}


def write_outputs(results: dict[str, Any], config: SelectiveLabConfig, out: Path) -> None:
    plot_runs(results["runs"], out / "selective.png")
    reference = results["reference"]["curve"][-1]
    lines = [f"# Selective LM lab: N = {config.people} people, mixture {1 - config.noise_weight:.0%} biographies / "
             f"{config.noise_weight:.0%} noise, {config.steps} steps per run, keep {config.keep:.0%} of the tokens",
             ""]
    lines += runs_table(results["runs"])
    lines += ["", f"Reference (clean biographies only, {config.reference_steps} steps, "
              f"{results['reference']['flops']:.2e} FLOPs, not counted above): held-out accuracy "
              f"{reference['accuracy']:.3f}, training-wording accuracy {reference['train_templates/accuracy']:.3f}.",
              "Both runs see the same tokens per step; the selective run's FLOPs include its reference forward "
              "passes."]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
