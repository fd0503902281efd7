"""omnilm's local lm-evaluation-harness tasks, written from the synthetic data (nothing is downloaded).

``write_tasks(out, bios=..., arithmetic=...)`` writes one YAML file per task and its jsonl data into ``out``;
pass ``out`` to lm-eval as an include path (``omnilm eval`` does it; ``lm_eval --include_path out`` does too).
Every task carries the tag ``omnilm``, so ``--tasks omnilm`` runs all of them.

``omnilm_bios_mc``     multiple choice (acc, acc_norm): the start of a sentence in a *held-out* wording
                       ("Megan Chang's city of birth is") and four values: the person's own and three other values of
                       the same kind (cities for the two city attributes, employers for the employer), for birth
                       city, employer and employer city of every person who appears in the biographies
``omnilm_bios_cloze``  generate_until, exact match: the same held-out sentence starts for all six attributes; the
                       greedy continuation up to the sentence's period must be the value
``omnilm_arithmetic``  generate_until, exact match of the final number: ``Question: ...\\nAnswer:`` over the
                       arithmetic test problems; few-shot examples (``--num-fewshot``) show worked answers ending in
                       ``The answer is N.``, the number is read back from that phrase
``omnilm_bios_ppl``    loglikelihood_rolling (word/byte perplexity, bits per byte): one biography per person written
                       entirely in held-out wording

Invariants: every held-out template has a space right before ``{value}`` (checked), so a context never ends in
a space and lm-eval's target delimiter " " puts it back; data files are shuffled with a fixed seed, so
``--limit N`` takes a mixed sample and reruns give the same one. Data file paths in the YAML are absolute (lm-eval
does not resolve them against the YAML's folder), so the folder is written where it is used.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from omnilm.data.synth.templates import TEMPLATES, TRAIN_TEMPLATES_PER_ATTRIBUTE
from omnilm.errors import UserError

TAG = "omnilm"
TASK_NAMES = ("omnilm_bios_mc", "omnilm_bios_cloze", "omnilm_arithmetic", "omnilm_bios_ppl")
MC_ATTRIBUTES = {"birth_city": "city", "employer": "employer", "employer_city": "city"}  # attribute -> value kind
CHOICES = 4
VERSION = 1.0


def is_local(name: str) -> bool:
    """Whether a task name (or the tag) given to lm-eval refers to these tasks (or to the arithmetic task under a
    prompting strategy, ``omnilm.eval.prompted``, written into the same folder, or to a retrieval task)."""
    return name == TAG or name in TASK_NAMES or name.startswith("omnilm_arithmetic_") or is_retrieval(name)


def is_retrieval(name: str) -> bool:
    """Whether a task name is one of the long-context retrieval tasks (``omnilm.eval.long_context``), written for
    a model's tokenizer by ``omnilm eval`` rather than here."""
    return name.startswith(("omnilm_passkey", "omnilm_needle"))


def offline_if_local(tasks: list[str]) -> None:
    """With only local tasks, tell datasets and huggingface_hub (unless told otherwise) not to use the network.
    They read these variables when first imported, so call this before importing lm_eval."""
    if tasks and all(is_local(t) for t in tasks):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def held_out_prefix(template: str, name: str) -> str:
    """The sentence of ``template`` about ``name`` up to its value, without the space before the value."""
    head = template.split("{value}")[0].format(name=name)
    if not head.endswith(" "):
        raise ValueError(f"template {template!r}: expected a space before {{value}}")
    return head[:-1]


def held_out_templates(attribute: str) -> list[str]:
    return TEMPLATES[attribute][TRAIN_TEMPLATES_PER_ATTRIBUTE:]


def read_people(bios: str | Path | None) -> list[dict[str, Any]]:
    """People with their attributes and ``seen`` flag: ``people.jsonl`` of a ``synth bios`` folder, or (None) the
    demo recipe's people, synthesised again (the same people the demo model read about)."""
    if bios is not None:
        from omnilm.eval.attributes import read_jsonl

        path = Path(bios) / "people.jsonl"
        if not path.is_file():
            raise UserError(f"{bios}: no people.jsonl (expected a folder written by `omnilm data synth bios`)")
        return read_jsonl(path)
    from omnilm.config import from_dict
    from omnilm.data.synth.bios import BiosConfig, make_people
    from omnilm.recipe.recipe import load_recipe

    spec = {k: v for k, v in load_recipe("demo").prepare["bios"].items() if k != "job"}
    people = make_people(from_dict(BiosConfig, spec, source="demo recipe: bios job"))
    return [p.record("") for p in people]


def bios_mc_docs(people: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    pools: dict[str, list[str]] = {}
    for attribute, kind in MC_ATTRIBUTES.items():
        pools.setdefault(kind, [])
        pools[kind].extend(p[attribute] for p in people)
    pools = {kind: sorted(set(values)) for kind, values in pools.items()}
    docs = []
    for person in (p for p in people if p["seen"]):
        for attribute, kind in MC_ATTRIBUTES.items():
            value = person[attribute]
            others = [v for v in pools[kind] if v != value]
            if len(others) < CHOICES - 1:
                raise UserError(f"bios_mc: only {len(others) + 1} distinct values of kind {kind!r}; need {CHOICES}")
            choices = [value, *rng.sample(others, CHOICES - 1)]
            rng.shuffle(choices)
            context = held_out_prefix(rng.choice(held_out_templates(attribute)), person["name"])
            docs.append({"context": context, "choices": choices, "gold": choices.index(value),
                         "attribute": attribute, "person_id": person["person_id"]})
    return docs


def bios_cloze_docs(people: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    from omnilm.data.synth.bios import ATTRIBUTES

    return [{"context": held_out_prefix(rng.choice(held_out_templates(a)), p["name"]), "value": p[a],
             "attribute": a, "person_id": p["person_id"]}
            for p in people if p["seen"] for a in ATTRIBUTES]


def bios_text_docs(people: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    from omnilm.data.synth.bios import ATTRIBUTES

    docs = []
    for person in (p for p in people if p["seen"]):
        order = list(ATTRIBUTES)
        rng.shuffle(order)
        text = " ".join(rng.choice(held_out_templates(a)).format(name=person["name"], value=person[a]) for a in order)
        docs.append({"text": text, "person_id": person["person_id"]})
    return docs


def arithmetic_docs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"question": r["messages"][0]["content"], "reply": r["messages"][-1]["content"],
             "answer": str(r["answer"])} for r in records]


def _dataset(files: dict[str, Path], cache: Path) -> dict[str, Any]:
    return {"dataset_path": "json",
            "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()},
                               "cache_dir": str(cache)}}


def task_configs(data: Path) -> dict[str, dict[str, Any]]:
    """The YAML content of every task, reading its jsonl from ``data`` (absolute)."""
    cache = data / ".datasets-cache"
    common = {"tag": [TAG], "test_split": "test", "metadata": {"version": VERSION}}
    exact = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
    return {
        "omnilm_bios_mc": common | _dataset({"test": data / "bios_mc.jsonl"}, cache) | {
            "task": "omnilm_bios_mc", "output_type": "multiple_choice", "fewshot_split": "test",
            "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "gold",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        "omnilm_bios_cloze": common | _dataset({"test": data / "bios_cloze.jsonl"}, cache) | {
            "task": "omnilm_bios_cloze", "output_type": "generate_until", "fewshot_split": "test",
            "doc_to_text": "context", "doc_to_target": "value",
            "generation_kwargs": {"until": [".", "\n"], "max_gen_toks": 24, "do_sample": False, "temperature": 0.0},
            "metric_list": [exact | {"regexes_to_ignore": ["^\\s+", "\\s+$"]}]},
        "omnilm_arithmetic": common | _dataset({"train": data / "arithmetic_train.jsonl",
                                                "test": data / "arithmetic_test.jsonl"}, cache) | {
            "task": "omnilm_arithmetic", "output_type": "generate_until", "fewshot_split": "train",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "reply",
            "generation_kwargs": {"until": ["\n", "Question:"], "max_gen_toks": 64, "do_sample": False,
                                  "temperature": 0.0},
            # The reference reply's number is what follows its last "answer is"; the response's is read the same way.
            "filter_list": [{"name": "answer", "filter": [
                {"function": "regex", "regex_pattern": "answer is\\s*(-?\\d+)", "group_select": -1},
                {"function": "take_first"}]}],
            "metric_list": [exact | {"regexes_to_ignore": ["(?s).*answer is\\s*", "\\.\\s*$"]}]},
        "omnilm_bios_ppl": common | _dataset({"test": data / "bios_text.jsonl"}, cache) | {
            "task": "omnilm_bios_ppl", "output_type": "loglikelihood_rolling", "num_fewshot": 0,
            "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in (
                ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"))]},
    }


def write_tasks(out: str | Path, bios: str | Path | None = None, arithmetic: str | Path | None = None,
                seed: int = 0) -> Path:
    """Write the task YAMLs and their data into ``out`` (see the module docstring); returns ``out``.

    ``bios``: a ``synth bios`` folder (None: the demo recipe's people). ``arithmetic``: a ``synth arithmetic``
    folder with train.jsonl and test.jsonl (None: the default problems, synthesised here).
    """
    import yaml

    from omnilm.data.synth.io import write_jsonl
    from omnilm.eval.attributes import read_jsonl
    from omnilm.utils.atomic import write_text_atomic

    out = Path(out).resolve()
    data = out / "data"
    if arithmetic is None:
        from omnilm.data.synth.arithmetic import ArithmeticConfig, write_arithmetic

        arithmetic = data / "arithmetic"
        write_arithmetic(ArithmeticConfig(seed=seed), arithmetic)
    arithmetic = Path(arithmetic)
    people = read_people(bios)
    files = {"bios_mc": bios_mc_docs(people, random.Random(seed)),
             "bios_cloze": bios_cloze_docs(people, random.Random(seed + 1)),
             "bios_text": bios_text_docs(people, random.Random(seed + 2)),
             "arithmetic_train": arithmetic_docs(read_jsonl(arithmetic / "train.jsonl")),
             "arithmetic_test": arithmetic_docs(read_jsonl(arithmetic / "test.jsonl"))}
    for name, docs in files.items():
        random.Random(seed + 3).shuffle(docs)
        write_jsonl(data / f"{name}.jsonl", docs)
    for name, config in task_configs(data).items():
        write_text_atomic(out / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out
