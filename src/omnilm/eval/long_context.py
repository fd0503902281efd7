"""Long-context evaluation: passkey retrieval, needle in a haystack, perplexity against context length.

- Passkey retrieval (Mohtashami & Jaggi 2023): a five-digit key stated once ("The pass key is 71432. Remember it.
  71432 is the pass key.") inside repeated filler ("The grass is green. The sky is blue. ..."), then
  "What is the pass key? The pass key is"; correct when the greedy continuation starts with the key.
- Needle in a haystack: the same with a single sentence ("The special magic number is 71432.") hidden in
  natural-looking text (held-out biography sentences, ``omnilm.eval.lm_tasks``) and its own question.

Every document is sized with the model's tokenizer to at most ``length`` tokens, the needle placed after a
fraction ``depth`` of the filler. Documents are scored here directly (``score_retrieval``: batched greedy decoding,
the ``passkey`` evaluation of recipes) or written as lm-evaluation-harness tasks, one per (length, depth) cell
(``write_retrieval_tasks``: ``omnilm_passkey_<length>_d<depth%>``, tags ``omnilm_passkey`` / ``omnilm_needle``),
for ``omnilm eval``. ``plot_heatmap`` draws accuracy over length × depth.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnilm.errors import UserError

KINDS = {
    "passkey": ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
                " The pass key is {key}. Remember it. {key} is the pass key.",
                " What is the pass key? The pass key is"),
    "needle": (None, " The special magic number is {key}.", " What is the special magic number? The special magic "
               "number is"),
}
TASK_NAME = re.compile(r"^omnilm_(passkey|needle)_(\d+)_d(\d+)$")


@dataclass(frozen=True)
class RetrievalConfig:
    """Which documents to build."""

    #: passkey (repeated filler) or needle (biography sentences as the haystack).
    kind: str = "passkey"
    #: Document lengths in tokens of the model's tokenizer.
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    #: Where the key sits: the fraction of the filler before it.
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    #: Documents per (length, depth) cell, each with its own key.
    samples: int = 5
    seed: int = 0
    #: Haystack sentences for ``needle`` (None: held-out biography sentences of the demo people).
    haystack: list[str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown retrieval kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if not self.lengths or min(self.lengths) < 32 or not self.depths or self.samples < 1:
            raise UserError("retrieval documents need lengths ≥ 32 tokens, at least one depth and one sample")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise UserError(f"depths must lie in [0, 1], got {list(self.depths)}")
        object.__setattr__(self, "lengths", tuple(int(x) for x in self.lengths))
        object.__setattr__(self, "depths", tuple(float(x) for x in self.depths))


def haystack_sentences(seed: int = 0) -> list[str]:
    """Natural-looking filler: sentences of held-out biographies of the demo recipe's people."""
    from omnilm.eval.lm_tasks import bios_text_docs, read_people

    docs = bios_text_docs(read_people(None), random.Random(seed))
    return [sentence for doc in docs for sentence in re.split(r"(?<=\.)\s+", doc["text"]) if sentence]


def _units(config: RetrievalConfig, rng: random.Random) -> list[str]:
    filler = KINDS[config.kind][0]
    if filler is not None:  # one sentence per unit: documents can hit their length closely
        return re.split(r"(?<=\.)\s+", filler)
    sentences = config.haystack or haystack_sentences(config.seed)
    return rng.sample(sentences, len(sentences))


def make_doc(tokenizer: Any, length: int, depth: float, rng: random.Random, config: RetrievalConfig,
             units: list[str]) -> dict[str, Any]:
    """One document of at most ``length`` tokens with its key after ``depth`` of the filler."""
    _, needle_text, question = KINDS[config.kind]
    key = str(rng.randint(10000, 99999))
    needle = needle_text.format(key=key)
    fixed = len(tokenizer.encode(needle + question, special=False))
    per_unit = max(1, len(tokenizer.encode(" " + " ".join(units[:8]), special=False)) // min(8, len(units)))
    count = max(0, (length - fixed) // per_unit + 2)
    while True:
        filler = [units[i % len(units)] for i in range(count)]
        cut = round(depth * count)
        text = (" ".join(filler[:cut]) + needle + " " + " ".join(filler[cut:])).strip() + question
        n_tokens = len(tokenizer.encode(text, special=False))
        if n_tokens <= length or count == 0:
            break
        count = max(0, count - max(1, (n_tokens - length) // per_unit))
    if n_tokens > length:
        raise UserError(f"a {config.kind} document cannot fit {length} tokens with this tokenizer")
    return {"context": text, "answer": key, "length": length, "depth": depth, "tokens": n_tokens}


def retrieval_docs(tokenizer: Any, config: RetrievalConfig) -> list[dict[str, Any]]:
    """``samples`` documents per (length, depth) cell; fixed by the seed."""
    rng = random.Random(config.seed)
    units = _units(config, rng)
    return [make_doc(tokenizer, length, depth, rng, config, units)
            for length in config.lengths for depth in config.depths for _ in range(config.samples)]


def is_correct(continuation: str, answer: str) -> bool:
    """The greedy continuation states the key first (digits right after optional spaces)."""
    match = re.match(r"\s*(\d+)", continuation)
    return match is not None and match.group(1) == answer


@torch.inference_mode()
def continuations(model: Any, tokenizer: Any, docs: list[dict[str, Any]], batch_size: int = 8,
                  max_new_tokens: int = 8) -> list[str]:
    """The greedy continuation of every document's context (batched, left-padded; in the order of ``docs``)."""
    from omnilm.infer.generate import FINISHED, generate_ids
    from omnilm.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    texts = [""] * len(docs)
    order = sorted(range(len(docs)), key=lambda i: docs[i]["tokens"])  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        prompts = [tokenizer.encode(docs[i]["context"], special=False) for i in rows]
        outputs: list[list[int]] = [[] for _ in rows]
        for step in generate_ids(model, prompts, params, [], tokenizer.pad_id or 0):
            for row, token in enumerate(step.tolist()):
                if token != FINISHED:
                    outputs[row].append(token)
        for i, out in zip(rows, outputs, strict=True):
            texts[i] = tokenizer.decode(out)
    return texts


def score_retrieval(model: Any, tokenizer: Any, docs: list[dict[str, Any]], batch_size: int = 8,
                    ) -> dict[str, float]:
    """Accuracy per cell (``acc@<length>_d<depth%>``), per length (``acc@<length>``) and overall (``acc``)."""
    hits: dict[tuple[int, float], list[bool]] = {}
    for doc, text in zip(docs, continuations(model, tokenizer, docs, batch_size), strict=True):
        hits.setdefault((doc["length"], doc["depth"]), []).append(is_correct(text, doc["answer"]))
    metrics: dict[str, float] = {}
    for (length, depth), cell in sorted(hits.items()):
        metrics[f"acc@{length}_d{round(depth * 100)}"] = sum(cell) / len(cell)
    for length in sorted({length for length, _ in hits}):
        cells = [h for (cell_length, _), hs in hits.items() if cell_length == length for h in hs]
        metrics[f"acc@{length}"] = sum(cells) / len(cells)
    every = [h for hs in hits.values() for h in hs]
    metrics["acc"] = sum(every) / len(every)
    return metrics


@torch.inference_mode()
def perplexity_by_length(model: Any, tokens: torch.Tensor, lengths: list[int], windows: int = 4,
                         ) -> dict[str, float]:
    """Perplexity (exp of the mean loss over every position) of ``windows`` consecutive windows of each length of
    the 1-D token stream ``tokens`` (``ppl@<length>``; ``ppl``: at the longest), the measure of the
    position-interpolation papers."""
    import math

    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = {}
    for length in lengths:
        if tokens.numel() < windows * (length + 1):
            raise UserError(f"{tokens.numel()} tokens cannot fill {windows} windows of {length + 1}")
        rows = tokens[:windows * (length + 1)].view(windows, length + 1).to(device)
        nats = 0.0
        for row in rows:  # one window at a time keeps the attention memory of long windows bounded
            logits = model(row[None, :-1])
            nats += float(F.cross_entropy(logits[0].float(), row[1:], reduction="sum"))
        out[f"ppl@{length}"] = math.exp(nats / (windows * length))
    out["ppl"] = out[f"ppl@{max(lengths)}"]  # the headline: the longest context
    return out


# ---------------------------------------------------------------------------------------------- lm-eval tasks


def task_name(kind: str, length: int, depth: float) -> str:
    return f"omnilm_{kind}_{length}_d{round(depth * 100)}"


def write_retrieval_tasks(out: str | Path, tokenizer: Any, config: RetrievalConfig) -> list[str]:
    """One lm-eval generate_until task per (length, depth) cell with its jsonl data, in ``out``; returns the task
    names. Each carries the tag ``omnilm_<kind>``; exact match of the key read from the continuation."""
    import yaml

    from omnilm.data.synth.io import write_jsonl
    from omnilm.utils.atomic import write_text_atomic

    out = Path(out).resolve()
    cells: dict[str, list[dict[str, Any]]] = {}
    for doc in retrieval_docs(tokenizer, config):
        cells.setdefault(task_name(config.kind, doc["length"], doc["depth"]), []).append(doc)
    for name, docs in cells.items():
        write_jsonl(out / "data" / f"{name}.jsonl", docs)
        task = {
            "task": name, "tag": [f"omnilm_{config.kind}"], "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(out / "data" / f"{name}.jsonl")},
                               "cache_dir": str(out / "data" / ".datasets-cache")},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "context",
            "doc_to_target": "answer",
            "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0},
            "filter_list": [{"name": "key", "filter": [
                {"function": "regex", "regex_pattern": "^\\s*(\\d+)", "group_select": 0},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
        write_text_atomic(out / f"{name}.yaml", yaml.safe_dump(task, sort_keys=False))
    return list(cells)


def cells_from_results(metrics: dict[str, float]) -> dict[str, dict[tuple[int, float], float]]:
    """Per kind, accuracy per (length, depth) from lm-eval's flat metrics (``<task>/exact_match_key``) or from
    ``score_retrieval``'s (``acc@<length>_d<depth%>``, kind ``passkey``)."""
    cells: dict[str, dict[tuple[int, float], float]] = {}
    for key, value in metrics.items():
        task, _, metric = key.partition("/")
        match = TASK_NAME.match(task)
        if match and metric.startswith("exact_match"):
            cells.setdefault(match.group(1), {})[(int(match.group(2)), int(match.group(3)) / 100)] = value
        own = re.match(r"^acc@(\d+)_d(\d+)$", key)
        if own:
            cells.setdefault("passkey", {})[(int(own.group(1)), int(own.group(2)) / 100)] = value
    return cells


def plot_heatmap(cells: dict[tuple[int, float], float], out_png: str | Path, title: str = "passkey retrieval",
                 ) -> Path:
    """Accuracy over context length (x) and needle depth (y)."""
    from omnilm.eval.plots import headless_pyplot, save_figure

    plt = headless_pyplot()
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    grid = [[cells.get((length, depth), float("nan")) for length in lengths] for depth in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{round(d * 100)}%" for d in depths])
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=title)
    fig.colorbar(image, ax=ax, label="accuracy")
    return save_figure(fig, out_png)
