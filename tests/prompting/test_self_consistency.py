"""Self-consistency: k seeded samples of one prompt in one batch, each equal to sampling that prompt alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helpers import small_model
from omnilm.infer.sampling import SamplingParams
from omnilm.infer.text import TextGenerator
from omnilm.prompting import AnswerReader, majority_vote
from omnilm.prompting.prompts import chat_messages
from omnilm.prompting.responder import Responder
from omnilm.prompting.self_consistency import sample_replies, self_consistency
from omnilm.tokenizer import Tokenizer

MESSAGES = chat_messages("Mia has 3 apples. How many apples does Mia have now?", trigger="Let's think step by step.")
PARAMS = SamplingParams(max_new_tokens=12, temperature=1.0)


@pytest.fixture(params=["llama", "gpt2"])
def responder(request: pytest.FixtureRequest, tokenizer: Tokenizer) -> Responder:
    model = small_model(request.param, vocab_size=tokenizer.vocab_size, init_std=0.02)
    return Responder(TextGenerator(model, tokenizer), chat=True)


def test_k_samples_in_one_batch_equal_independent_sampling(responder: Responder) -> None:
    calls = []
    generate = responder.generator.generate
    responder.generator.generate = lambda *a, **kw: calls.append(len(a[0])) or generate(*a, **kw)  # count batches
    replies = sample_replies(responder, MESSAGES, 6, PARAMS, seed=11)
    assert calls == [6]  # one batched call with the k rows
    prompt = responder.prompt_ids(MESSAGES)
    alone = [generate([prompt], replace(PARAMS, seed=11 + i))[0].strip() for i in range(6)]
    assert replies == alone
    assert len(set(replies)) > 1  # distinct seeds, distinct samples
    assert sample_replies(responder, MESSAGES, 6, PARAMS, seed=11) == replies  # reproducible


def test_consensus_reply_states_the_vote(responder: Responder) -> None:
    result = self_consistency(responder, MESSAGES, 4, PARAMS, seed=0)
    assert result.answers == [AnswerReader()(r) for r in result.replies]
    assert result.vote == majority_vote(result.answers)
    assert result.reply == result.replies[result.vote.first or 0]


def test_refuses_greedy_and_zero_samples(responder: Responder) -> None:
    with pytest.raises(ValueError, match="temperature"):
        sample_replies(responder, MESSAGES, 3, replace(PARAMS, temperature=0.0))
    with pytest.raises(ValueError, match="k >= 1"):
        sample_replies(responder, MESSAGES, 0, PARAMS)
