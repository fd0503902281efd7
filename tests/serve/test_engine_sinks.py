"""Attention sinks in the serving engine: a request streams past the context with a bounded number of KV blocks and
gets exactly ``generate``'s tokens with the same sinks settings (alone, batched with other requests, and for
hypothesis-drawn prompt lengths, windows, block sizes and arrival steps)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import small_model
from helpers import solo_tokens as alone
from omnilm.infer.sampling import SamplingParams
from omnilm.serve.engine import Engine, Request
from omnilm.serve.paged_cache import PagedKVCache
from omnilm.serve.speculative_engine import SpeculativeEngine

CONTEXT = 48
FAMILIES = {"llama": {}, "qwen2": {}, "gpt2": {}, "bloom": dict(alibi=True, embedding_norm=True)}


def make(family: str, tokenizer, blocks: int = 60, block_size: int = 4) -> Engine:  # noqa: ANN001
    overrides = dict(FAMILIES.get(family, {}))
    model = small_model("gpt2" if family == "bloom" else family, vocab_size=tokenizer.vocab_size,
                        max_seq_len=CONTEXT, **overrides)
    per_block = PagedKVCache.bytes_per_block(model.config, block_size, torch.float32)
    return Engine(model, tokenizer, block_size=block_size, kv_budget_bytes=(blocks + 1) * per_block)


def sinks(n: int, sink_count: int, window: int, **extra: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, attention_sinks=sink_count, sink_window=window, **extra)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(5, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_tracking_blocks(engine: Engine, submissions: dict[int, list[Request]]) -> dict[int, int]:
    """Step until idle, submitting ``submissions[step]`` before that step; the most blocks each request held."""
    most: dict[int, int] = {}
    step = 0
    while engine.busy or step <= max(submissions):
        engine.submit_all(submissions.get(step, []))
        engine.step()
        engine.pool.check()
        for seq in engine.running:
            most[seq.request.request_id] = max(most.get(seq.request.request_id, 0), len(seq.blocks))
        step += 1
    return most


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_stream_three_times_the_context_equals_generate(family: str, tokenizer) -> None:  # noqa: ANN001
    engine = make(family, tokenizer)
    request = Request(prompt(10, 1), sinks(3 * CONTEXT, 4, 16))
    most = run_tracking_blocks(engine, {0: [request]})
    assert request.output_ids == alone(engine.model, request.prompt_ids, request.params, engine.eos_ids)
    assert len(request.output_ids) == 3 * CONTEXT or request.finish_reason == "stop"
    assert most[request.request_id] <= engine.pool.blocks_for(4 + 16 + 1)  # 6 blocks, not 158 positions' 40
    assert engine.pool.num_in_use == 0


def test_batched_with_other_requests_each_gets_its_solo_tokens(tokenizer) -> None:  # noqa: ANN001
    """A sink request with a prompt longer than its sinks + window (prefilled in chunks, then cut down), a second
    one with the default window, and two ordinary requests, arriving at different steps."""
    engine = make("llama", tokenizer, blocks=80)
    engine.prefill_chunk = 8
    long_prompt = Request(prompt(30, 2), sinks(100, 2, 12))
    default_window = Request(prompt(5, 3), sinks(90, 1, 0))
    plain = [Request(prompt(7, 4), SamplingParams(max_new_tokens=30, temperature=0)),
             Request(prompt(20, 5), SamplingParams(max_new_tokens=12, temperature=0))]
    most = run_tracking_blocks(engine, {0: [plain[0]], 1: [long_prompt], 3: [default_window, plain[1]]})
    for request in (long_prompt, default_window, *plain):
        assert request.output_ids == alone(engine.model, request.prompt_ids, request.params, engine.eos_ids)
    assert len(long_prompt.output_ids) > CONTEXT or long_prompt.finish_reason == "stop"
    assert most[long_prompt.request_id] == engine.pool.blocks_for(30)  # the prompt, then at most 15 positions
    assert most[default_window.request_id] <= engine.pool.blocks_for(CONTEXT)
    assert engine.pool.num_in_use == 0


def test_blocks_after_the_prompt_stay_at_sinks_plus_window(tokenizer) -> None:  # noqa: ANN001
    engine = make("qwen2", tokenizer)
    engine.prefill_chunk = 8
    request = engine.submit(Request(prompt(30, 6), sinks(60, 2, 9)))
    held = []
    while engine.busy:
        engine.step()
        held += [len(seq.blocks) for seq in engine.running]
    assert max(held) == engine.pool.blocks_for(30)
    assert set(held[-40:]) == {engine.pool.blocks_for(2 + 9 + 1)}
    assert request.output_ids == alone(engine.model, request.prompt_ids, request.params, engine.eos_ids)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt_len=st.integers(1, 40), sink_count=st.integers(1, 6), window=st.integers(1, 30),
       block_size=st.sampled_from([1, 3, 4, 16]), chunk=st.integers(1, 40), arrive=st.integers(0, 5))
def test_any_layout_equals_generate(tokenizer, prompt_len, sink_count, window, block_size, chunk,  # noqa: ANN001
                                    arrive) -> None:
    window = min(window, CONTEXT - sink_count - 1)
    engine = make("llama", tokenizer, blocks=200 // block_size + 20, block_size=block_size)
    engine.prefill_chunk = chunk
    other = Request(prompt(9, 7), SamplingParams(max_new_tokens=25, temperature=0))
    request = Request(prompt(prompt_len, prompt_len), sinks(70, sink_count, window))
    most = run_tracking_blocks(engine, {0: [other], arrive: [request]})
    assert request.output_ids == alone(engine.model, request.prompt_ids, request.params, engine.eos_ids)
    assert most[request.request_id] <= engine.pool.blocks_for(max(prompt_len, sink_count + window + 1))


def test_requests_that_cannot_stream_are_refused(tokenizer) -> None:  # noqa: ANN001
    engine = make("llama", tokenizer)
    with pytest.raises(ValueError, match="must fit the context of 48"):
        engine.submit(Request([1, 2, 3], sinks(10, 4, 44)))
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit(Request(list(range(5, 55)), sinks(10, 4, 8)))
    windowed = Engine(small_model("llama", vocab_size=tokenizer.vocab_size, max_seq_len=CONTEXT, sliding_window=8),
                      tokenizer)
    with pytest.raises(ValueError, match="sliding-window"):
        windowed.submit(Request([1, 2, 3], sinks(10, 2, 8)))
    speculative = SpeculativeEngine(engine.model, engine.model, tokenizer)
    with pytest.raises(ValueError, match="batching engine only"):
        speculative.submit(Request([1, 2, 3], sinks(10, 2, 8)))
    assert not engine.waiting and not speculative.waiting
