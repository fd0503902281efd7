"""The arithmetic task under a prompting strategy, scored by lm-evaluation-harness.

:func:`write_prompted_task` writes the lm-eval task ``omnilm_arithmetic_<strategy>`` (tag ``omnilm_prompting``):
every test problem's prompt is built by :mod:`omnilm.prompting` (demonstrations, trigger; chat-formatted for a chat
model) and stored in its doc, so lm-eval's own machinery does the rest: ``repeats: k`` asks for k samples per
problem (the model class generates them in the same batches), the filter ``omnilm_vote`` reads each reply's answer
(:class:`omnilm.prompting.AnswerReader`) and keeps the majority (:func:`omnilm.prompting.majority_vote`; replies
without an answer abstain), and ``exact_match`` compares it with the true answer. With one sample the filter is
simply the reply's answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lm_eval.api.filter import Filter
from lm_eval.api.registry import register_filter

from omnilm.prompting.answers import ANSWER_PATTERN, AnswerReader, majority_vote
from omnilm.prompting.prompts import Demonstration
from omnilm.prompting.responder import TEXT_STOP, Responder
from omnilm.prompting.strategy import Strategy, label, prompts
from omnilm.tokenizer.chat import IM_END

FILTER = "omnilm_vote"
TAG = "omnilm_prompting"
INVALID = "[invalid]"  # what a reply without an answer becomes (lm-eval's regex filter says the same)


@register_filter(FILTER)
class VoteFilter(Filter):
    """Each doc's replies → the majority answer (``INVALID`` when no reply states one): what lm-eval's
    ``majority_vote`` then ``take_first`` give, except that replies without an answer abstain."""

    def __init__(self, regex_pattern: str = ANSWER_PATTERN.pattern, **unused: Any) -> None:
        self.reader = AnswerReader.from_regex(regex_pattern)

    def apply(self, resps: Iterable[list[str]], docs: list[dict]) -> list[str]:
        return [majority_vote([self.reader(r) for r in replies]).answer or INVALID for replies in resps]


def read_pool(path: str | Path) -> list[Demonstration]:
    """Demonstrations from an arithmetic ``train.jsonl``: the bare question and its worked solution (older files
    without those fields: the first user turn and the last reply)."""
    from omnilm.eval.attributes import read_jsonl

    return [Demonstration(r.get("question") or r["messages"][0]["content"],
                          r.get("solution") or r["messages"][-1]["content"]) for r in read_jsonl(Path(path))]


def task_name(strategy: Strategy) -> str:
    return f"omnilm_arithmetic_{label(strategy)}"


def write_prompted_task(task_dir: str | Path, strategy: Strategy, responder: Responder, test_docs: list[dict],
                        pool: list[Demonstration], max_gen_toks: int = 96, seed: int = 0) -> str:
    """Write the task (YAML and its data) into ``task_dir`` for ``test_docs`` (``question``, ``answer``); returns its
    name. The demonstrations used (chosen or Auto-CoT) are recorded in the YAML's metadata."""
    import yaml

    from omnilm.data.synth.io import write_jsonl
    from omnilm.utils.atomic import write_text_atomic

    task_dir = Path(task_dir).resolve()
    name = task_name(strategy)
    messages, shared = prompts(strategy, responder, [d["question"] for d in test_docs], pool)
    docs = [{"question": d["question"], "answer": str(d["answer"]), "prompt": responder.render(m)}
            for d, m in zip(test_docs, messages, strict=True)]
    data = task_dir / "data" / f"{name}.jsonl"
    write_jsonl(data, docs)
    sampled = strategy.samples > 1 or strategy.temperature > 0
    config = {
        "task": name, "tag": [TAG], "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(task_dir / "data" / ".datasets-cache")},
        "test_split": "test", "output_type": "generate_until", "num_fewshot": 0,
        "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
        "repeats": strategy.samples,
        "generation_kwargs": {"until": [IM_END] if responder.chat else list(TEXT_STOP), "max_gen_toks": max_gen_toks,
                              "do_sample": sampled, "temperature": strategy.temperature, "seed": seed},
        "filter_list": [{"name": "vote" if strategy.samples > 1 else "answer",
                         "filter": [{"function": FILTER, "regex_pattern": ANSWER_PATTERN.pattern}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "strategy": asdict(strategy), "chat": responder.chat,
                     "demonstrations": [asdict(d) for d in shared]},
    }
    write_text_atomic(task_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return name


def prepare(task_dir: str | Path, tasks: list[str], strategy: Strategy, lm: Any, *,
            bios: str | Path | None = None, arithmetic: str | Path | None = None, chat: bool = False,
            seed: int = 0) -> list[str]:
    """For ``omnilm eval --prompting`` and the recipe evaluation ``prompting``: write the local tasks and the prompted
    arithmetic task into ``task_dir`` (building the prompts with ``lm``, lm-eval's ``OmniLM``) and return ``tasks``
    with ``omnilm_arithmetic`` replaced by the prompted task (the only task a strategy applies to)."""
    from omnilm.errors import UserError
    from omnilm.eval.attributes import read_jsonl
    from omnilm.eval.lm_tasks import write_tasks
    from omnilm.infer.text import TextGenerator

    if "omnilm_arithmetic" not in tasks:
        raise UserError("--prompting applies to the task omnilm_arithmetic: add it to --tasks")
    task_dir = write_tasks(task_dir, bios=bios, arithmetic=arithmetic, seed=seed)
    pool = read_pool(Path(arithmetic or task_dir / "data" / "arithmetic") / "train.jsonl")
    try:
        responder = Responder(TextGenerator(lm.net, lm.omni_tokenizer), chat=chat)
    except ValueError as err:
        raise UserError(f"--apply-chat-template: {err}") from err
    name = write_prompted_task(task_dir, strategy, responder, read_jsonl(task_dir / "data" / "arithmetic_test.jsonl"),
                               pool, seed=seed)
    return [name if t == "omnilm_arithmetic" else t for t in tasks]
