"""Named evaluations declared by recipe stages, run on any model folder.

Types:
  ``attributes``  biography attribute recall on held-out templates (``data``: eval.jsonl; ``seen``: a
                  train.jsonl whose ``person_id`` s restrict the probe to people the model saw; ``max_examples``)
  ``qa``          exact greedy answers to chat questions (``data``: jsonl of ``messages``; ``where``: keep
                  records whose fields equal these values; ``max_examples``); open-book with ``rag: {index: DIR,
                  top_k: K, match_field: person_id}``: the question carries its top-k passages
                  (:mod:`omnilm.rag`), and the result adds retrieval ``recall_at_k``
  ``omni_qa``     exact greedy answers of a Thinker to questions with audio, images and video (``data``: jsonl
                  of ``messages`` with media parts, paths relative to it; ``where``; ``max_examples``)
  ``omni_video_timeline`` the video question (``video_qa`` records of such a file) answered from the Thinker's own
                  greedy timeline of each video, "3 cat, 7, 1 dog, 5 red" (``where``; ``max_examples``)
  ``omni_video_answer`` the video question asked as it is, scored by the answer its greedy reply ends with (the digit
                  alone, or "… So 1." after the timeline written out; ``where``; ``max_examples``)
  ``speech_wer``  word error rate of a Thinker's spoken replies (its folder's talker/ and token2wav/), of the
                  recorded replies (the judge's floor) and of their codec round trip (``codec``: the ceiling);
                  latency (``data``: jsonl with ``reply_audio``; ``where``; ``max_examples``)
  ``tool_use``    arithmetic with and without the calculator tool, through the tool loop (``data``: jsonl with
                  ``question`` and ``answer``, e.g. a calculator job's test.jsonl; ``max_examples``;
                  ``max_new_tokens``): accuracy both ways, call rate, well-formed call rate
                  (:mod:`omnilm.eval.tool_use`)
  ``val_loss``    loss and bits per byte on the ``val`` split of a tokenised dataset (``data``; ``batches``,
                  ``batch_size``, ``seq_len``)
  ``copying``     loss on the first and the second copy of held-out repeated random sequences, and greedy
                  accuracy on the second (``data``: a repeats dataset; ``split``: val; ``max_examples``;
                  :mod:`omnilm.eval.copying`): whether the model copies from its context
  ``lm_eval``     lm-evaluation-harness tasks through ``omnilm.eval.harness`` (``tasks``: names, e.g. omnilm's local
                  ``omnilm_bios_mc``; ``data``: the biographies folder for the local tasks; ``limit``;
                  ``num_fewshot``; ``include_path``); metrics ``<task>/<metric>`` and ``acc``, the mean accuracy
                  of the tasks that report one (needs the eval extra: without lm-eval it says so and returns nothing)
  ``passkey``     passkey retrieval (``kind: passkey``) or needle in a haystack (``kind: needle``) at ``lengths``
                  × ``depths``, ``samples`` per cell (:mod:`omnilm.eval.long_context`); ``acc``, ``acc@<length>``,
                  ``acc@<length>_d<depth%>``; ``context``: context settings applied to the model first
                  (``omnilm.model.context``), e.g. a RoPE scaling without fine-tuning
  ``long_ppl``    perplexity against context length (``data``: a tokenised dataset's val split; ``lengths``;
                  ``windows``; ``context`` as for passkey): ``ppl@<length>``
  ``prompting``   the arithmetic task under a prompting strategy (``omnilm eval --prompting``; ``strategy``,
                  ``samples``, ``shots``, ``temperature``, ``data``: the arithmetic folder, ``chat`` (default true):
                  chat-formatted prompts, ``limit``); ``acc``: exact answers (after the vote for self-consistency)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from omnilm.config import ConfigError

EvalFn = Callable[[Any, Any, dict[str, Any]], dict[str, float]]
EVAL_TYPES: dict[str, EvalFn] = {}
HEADLINE = {"attributes": "accuracy", "val_loss": "val_loss"}  # the metric a retention table shows


def register_eval(name: str, headline: str) -> Callable[[EvalFn], EvalFn]:
    def decorate(fn: EvalFn) -> EvalFn:
        EVAL_TYPES[name] = fn
        HEADLINE[name] = headline
        return fn

    return decorate


def seen_people(train_jsonl: str | Path) -> set[int]:
    from omnilm.eval.attributes import read_jsonl

    return {r["person_id"] for r in read_jsonl(train_jsonl) if r.get("person_id") is not None}


@register_eval("attributes", "accuracy")
def attributes_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.eval.attributes import evaluate_attributes, read_jsonl

    records = read_jsonl(spec["data"])
    if spec.get("seen"):
        seen = seen_people(spec["seen"])
        records = [r for r in records if r.get("person_id") in seen]
    return evaluate_attributes(model, tokenizer, _limit(records, spec.get("max_examples")))


@register_eval("qa", "accuracy")
def qa_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.eval.attributes import read_jsonl
    from omnilm.eval.qa import evaluate_qa

    records = _matching(read_jsonl(spec["data"]), spec.get("where"))
    records = _limit(records, spec.get("max_examples"))
    retrieval: dict[str, float] = {}
    if spec.get("rag"):
        from omnilm.rag.index import RagIndex
        from omnilm.rag.records import open_book

        rag = spec["rag"]
        if not isinstance(rag, dict) or not rag.get("index"):
            raise ConfigError(f"qa: rag must be {{index: DIR, top_k: K}}, got {rag!r}")
        records, retrieval = open_book(records, RagIndex.load(rag["index"]), int(rag.get("top_k", 3)),
                                       rag.get("match_field", "person_id"))
    return evaluate_qa(model, tokenizer, records) | retrieval


@register_eval("omni_qa", "accuracy")
def omni_qa_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.eval.attributes import read_jsonl
    from omnilm.eval.omni import evaluate_omni

    records = _matching(read_jsonl(spec["data"]), spec.get("where"))
    return evaluate_omni(model, tokenizer, _limit(records, spec.get("max_examples")), Path(spec["data"]).parent)


@register_eval("omni_video_timeline", "accuracy")
def omni_video_timeline_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.eval.attributes import read_jsonl
    from omnilm.eval.omni import evaluate_video_timeline

    records = _matching(read_jsonl(spec["data"]), {"task": "video_qa"} | (spec.get("where") or {}))
    return evaluate_video_timeline(model, tokenizer, _limit(records, spec.get("max_examples")),
                                   Path(spec["data"]).parent)


@register_eval("omni_video_answer", "accuracy")
def omni_video_answer_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.eval.attributes import read_jsonl
    from omnilm.eval.omni import evaluate_video_answers

    records = _matching(read_jsonl(spec["data"]), {"task": "video_qa"} | (spec.get("where") or {}))
    return evaluate_video_answers(model, tokenizer, _limit(records, spec.get("max_examples")),
                                  Path(spec["data"]).parent)


@register_eval("speech_wer", "wer")
def speech_wer_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.eval.attributes import read_jsonl
    from omnilm.eval.speech import SpeechJudge
    from omnilm.eval.spoken_replies import evaluate_spoken_replies
    from omnilm.omni.speech import load_voice

    voice = load_voice(spec["model_dir"])
    if voice is None:
        raise ConfigError(f"speech_wer: {spec['model_dir']} has no voice (talker/ and token2wav/)")
    everything = read_jsonl(spec["data"])
    records = _matching(everything, spec.get("where"))
    # The judge's language model: the QA replies (not the fresh "say" texts), so its floor stays that of the domain.
    judge = SpeechJudge(sorted({r["messages"][-1]["content"] for r in everything if r.get("task") != "say"}))
    codec = None
    if spec.get("codec"):
        from omnilm.omni.codec import Codec

        codec = Codec.load(spec["codec"])
    return evaluate_spoken_replies(voice, _limit(records, spec.get("max_examples")), Path(spec["data"]).parent,
                                   judge, codec)


@register_eval("tool_use", "accuracy_with_tools")
def tool_use_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.eval.attributes import read_jsonl
    from omnilm.eval.tool_use import evaluate_tool_use

    records = _limit(read_jsonl(spec["data"]), spec.get("max_examples"))
    return evaluate_tool_use(model, tokenizer, records, int(spec.get("max_new_tokens", 64)))


def _matching(records: list[dict[str, Any]], where: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The records whose fields equal every value ``where`` names."""
    return [r for r in records if all(r.get(k) == v for k, v in (where or {}).items())]


def _limit(records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """A fixed random subset of at most ``limit`` records (all of them without a limit)."""
    if limit and len(records) > limit:
        return random.Random(0).sample(records, limit)
    return records


@register_eval("val_loss", "val_loss")
def val_loss_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.data.loader import BatchLoader, TokenDataset
    from omnilm.objectives.lm import evaluate_lm, token_byte_lengths

    dataset = TokenDataset.open(spec["data"], "val")
    seq_len = min(int(spec.get("seq_len", 256)), model.config.max_seq_len)
    loader = BatchLoader(dataset, int(spec.get("batch_size", 16)), seq_len, seed=int(spec.get("seed", 1)))
    batches = [loader.next_batch() for _ in range(int(spec.get("batches", 8)))]
    return evaluate_lm(model, batches, token_byte_lengths(tokenizer))


@register_eval("copying", "copy_accuracy")
def copying_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    from omnilm.eval.copying import evaluate_copying, repeated_sequences

    sequences = repeated_sequences(spec["data"], spec.get("split", "val"))
    return evaluate_copying(model, _limit(sequences, spec.get("max_examples")), int(spec.get("batch_size", 32)))


@register_eval("lm_eval", "acc")
def lm_eval_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    import tempfile

    from omnilm.eval.lm_tasks import offline_if_local

    tasks = spec.get("tasks") or []
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ConfigError("lm_eval: name the tasks (tasks: [omnilm_bios_mc, ...])")
    offline_if_local(tasks)
    try:
        from omnilm.eval.harness import OmniLM, evaluate, flat_metrics
    except ImportError as err:
        print(f"lm_eval: skipped, lm-evaluation-harness is not installed (pip install -e \".[eval]\"): {err}")
        return {}
    with tempfile.TemporaryDirectory(prefix="omnilm-tasks-") as task_dir:
        results = evaluate(OmniLM(model=model, tokenizer=tokenizer, batch_size=int(spec.get("batch_size", 32))),
                           tasks, task_dir=task_dir, include_path=spec.get("include_path") or (),
                           bios=spec.get("data"), limit=spec.get("limit"), num_fewshot=spec.get("num_fewshot"),
                           seed=int(spec.get("seed", 0)), bootstrap_iters=0)
    return flat_metrics(results)


@register_eval("prompting", "acc")
def prompting_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    """The arithmetic task under a prompting strategy, as ``omnilm eval --prompting`` scores it (lm-eval)."""
    import tempfile

    from omnilm.eval.lm_tasks import offline_if_local

    offline_if_local(["omnilm_arithmetic"])
    try:
        from omnilm.eval.harness import OmniLM, evaluate, flat_metrics
        from omnilm.eval.prompted import prepare
    except ImportError as err:
        print(f"prompting: skipped, lm-evaluation-harness is not installed (pip install -e \".[eval]\"): {err}")
        return {}
    from omnilm.prompting.strategy import make_strategy

    strategy = make_strategy(spec.get("strategy", "greedy"), samples=spec.get("samples"), shots=spec.get("shots"),
                             temperature=spec.get("temperature"))
    lm = OmniLM(model=model, tokenizer=tokenizer, batch_size=int(spec.get("batch_size", 64)))
    seed = int(spec.get("seed", 0))
    with tempfile.TemporaryDirectory(prefix="omnilm-tasks-") as task_dir:
        tasks = prepare(task_dir, ["omnilm_arithmetic"], strategy, lm, arithmetic=spec.get("data"),
                        chat=bool(spec.get("chat", True)), seed=seed)
        results = evaluate(lm, tasks, task_dir=task_dir, arithmetic=spec.get("data"), limit=spec.get("limit"),
                           seed=seed, bootstrap_iters=0)
    metrics = flat_metrics(results)
    return {"acc": next(v for k, v in metrics.items() if k.endswith("/exact_match_" + ("vote" if strategy.samples > 1
                                                                                     else "answer")))} | metrics


@register_eval("passkey", "acc")
def passkey_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    """Passkey retrieval / needle in a haystack scored by greedy decoding (``omnilm.eval.long_context``)."""
    from omnilm.eval.long_context import RetrievalConfig, retrieval_docs, score_retrieval

    keys = ("kind", "lengths", "depths", "samples", "seed")
    config = RetrievalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k in keys})
    model = _in_context(model, spec)
    return score_retrieval(model, tokenizer, retrieval_docs(tokenizer, config), int(spec.get("batch_size", 8)))


def _in_context(model: Any, spec: dict[str, Any]) -> Any:
    """The model under the eval's ``context`` settings (e.g. ``{rope_scaling: {rope_type: dynamic, factor: 8}}``:
    a context-extension method applied without fine-tuning), sharing its weights."""
    if not spec.get("context"):
        return model
    from omnilm.model.context import with_context

    return with_context(model, dict(spec["context"]), share=True)


@register_eval("long_ppl", "ppl")
def long_ppl_eval(model: Any, tokenizer: Any, spec: dict[str, Any]) -> dict[str, float]:
    """Perplexity against context length on the ``val`` split of a tokenised dataset (``data``; ``lengths``;
    ``windows`` per length)."""
    from omnilm.data.loader import TokenDataset
    from omnilm.eval.long_context import perplexity_by_length

    lengths = [int(x) for x in spec.get("lengths", [256, 512, 1024, 2048])]
    windows = int(spec.get("windows", 4))
    data = TokenDataset.open(spec["data"], "val")
    needed = min(len(data), windows * (max(lengths) + 1))
    tokens = torch.from_numpy(data.read(0, needed).astype("int64"))
    return perplexity_by_length(_in_context(model, spec), tokens, lengths, windows)


def run_evals(model_dir: str | Path, specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every eval in ``specs`` (name -> spec with ``type``) on the model folder ``model_dir``."""
    from omnilm.model.hf import load_pretrained
    from omnilm.omni.thinker import is_thinker_folder
    from omnilm.tokenizer import Tokenizer

    if not specs:  # nothing to evaluate: the folder need not be a model these evals can load (an encoder's)
        return {}
    if is_thinker_folder(model_dir):
        from omnilm.omni.thinker import load_thinker

        model = load_thinker(model_dir, dtype=torch.float32)
    else:
        model = load_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_dir(model_dir)
    results = {}
    for name, spec in specs.items():
        fn = EVAL_TYPES.get(spec.get("type", ""))
        if fn is None:
            raise ConfigError(f"eval {name!r}: unknown type {spec.get('type')!r} (known: {', '.join(EVAL_TYPES)})")
        results[name] = fn(model, tokenizer, spec | {"model_dir": str(model_dir)})
    return results
