"""Strategies: prompts, retrieved exemplars against a brute force, and the lm-eval task with its vote filter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import small_model
from omnilm.errors import UserError
from omnilm.infer.embed import embed_texts
from omnilm.infer.text import TextGenerator
from omnilm.prompting import COT_TRIGGER, Demonstration
from omnilm.prompting.prompts import text_prompt
from omnilm.prompting.responder import Responder
from omnilm.prompting.strategy import make_strategy, prompts
from omnilm.tokenizer import Tokenizer

POOL = [Demonstration(f"{name} has {n} coins. How many coins does {name} have now?", f"The answer is {n}.")
        for name, n in [("Mia", 3), ("Tom", 4), ("Ava", 12), ("Omar", 7), ("Zoe", 9)]]
QUESTIONS = ["Tom has 5 coins. How many coins does Tom have now?", "Lena has 2 stamps. Then Lena gets 1 more."]


@pytest.fixture
def responder(tokenizer: Tokenizer) -> Responder:
    return Responder(TextGenerator(small_model("llama", vocab_size=tokenizer.vocab_size), tokenizer), chat=True)


def test_named_strategies_and_bad_settings() -> None:
    assert make_strategy("cot").trigger == COT_TRIGGER
    assert make_strategy("self-consistency", samples=10).samples == 10
    for bad in (dict(name="nope"), dict(name="self-consistency", temperature=0.0), dict(name="few-shot", shots=0)):
        with pytest.raises(UserError):
            make_strategy(**bad)


def test_greedy_and_cot_prompts(responder: Responder) -> None:
    greedy, _ = prompts(make_strategy("greedy"), responder, QUESTIONS)
    cot, _ = prompts(make_strategy("cot"), responder, QUESTIONS)
    assert greedy[0] == [{"role": "user", "content": QUESTIONS[0]}]
    assert cot[1] == [{"role": "user", "content": f"{QUESTIONS[1]} {COT_TRIGGER}"}]
    assert text_prompt(cot[0]) == f"Question: {QUESTIONS[0]} {COT_TRIGGER}\nAnswer:"


def test_retrieved_exemplars_are_the_most_similar_questions(responder: Responder) -> None:
    messages, shared = prompts(make_strategy("few-shot", shots=2), responder, QUESTIONS, POOL)
    assert shared == []
    model, tok = responder.generator.model, responder.tokenizer
    for question, got in zip(QUESTIONS, messages, strict=True):
        # brute force: cosine of each pool question embedded alone
        q = embed_texts(model, tok, [question])[0]
        sims = [float(embed_texts(model, tok, [d.question])[0] @ q) for d in POOL]
        best = sorted(range(len(POOL)), key=lambda i: -sims[i])[:2][::-1]  # most similar last
        assert [m["content"] for m in got[:-1]] == [x for i in best for x in (
            f"{POOL[i].question} {COT_TRIGGER}", POOL[i].reply)]
        assert got[-1]["content"] == f"{question} {COT_TRIGGER}"


def test_chosen_exemplars_are_shared(responder: Responder) -> None:
    messages, shared = prompts(make_strategy("few-shot", shots=2, exemplars="chosen"), responder, QUESTIONS, POOL)
    assert shared == POOL[:2] and messages[0][:4] == messages[1][:4]


def test_vote_filter_in_lm_eval(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """The prompted task through lm-eval: k replies per problem, filtered to the majority answer."""
    pytest.importorskip("lm_eval")
    from omnilm.eval.harness import OmniLM, evaluate
    from omnilm.eval.prompted import INVALID, VoteFilter, prepare
    from omnilm.prompting import AnswerReader, majority_vote

    assert VoteFilter().apply([["The answer is 4.", "x", "The answer is 5.", "the answer is 5"], ["no"]], []) == [
        "5", INVALID]
    lm = OmniLM(model=small_model("llama", vocab_size=tokenizer.vocab_size), tokenizer=tokenizer, max_gen_toks=8)
    from omnilm.data.synth.arithmetic import ArithmeticConfig, write_arithmetic

    write_arithmetic(ArithmeticConfig(problems=60, direct_fraction=0.5, cot_trigger=COT_TRIGGER), tmp_path / "arith")
    strategy = make_strategy("self-consistency", samples=3)
    tasks = prepare(tmp_path / "tasks", ["omnilm_arithmetic"], strategy, lm, arithmetic=tmp_path / "arith", chat=True)
    assert tasks == ["omnilm_arithmetic_self_consistency_k3"]
    results = evaluate(lm, tasks, task_dir=tmp_path / "tasks", arithmetic=tmp_path / "arith", limit=4,
                       log_samples=True, bootstrap_iters=0)
    samples = results["samples"][tasks[0]]
    assert len(samples) == 4
    for sample in samples:
        replies = sample["resps"][0]  # the one request's k replies
        assert len(replies) == 3
        assert sample["filtered_resps"][0] == (majority_vote([AnswerReader()(r) for r in replies]).answer or INVALID)
        assert sample["arguments"][0][0].startswith("<|im_start|>user\n")  # (context, generation kwargs)
    assert 0.0 <= results["results"][tasks[0]]["exact_match,vote"] <= 1.0
    json.dumps(results["configs"][tasks[0]]["metadata"])  # the strategy is recorded
    assert np.isfinite(results["results"][tasks[0]]["exact_match,vote"])
