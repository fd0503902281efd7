"""Continuous batching over paged KV blocks: whatever the arrival pattern, every request computes exactly what it
computes alone (a brute-force reference: ``generate_ids`` on that request only, with a contiguous cache)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import small_model
from helpers import solo_tokens as alone
from omnilm.infer.detokenize import StreamingDecoder
from omnilm.infer.sampling import SamplingParams
from omnilm.serve.engine import Engine, QueueFull, Request
from omnilm.serve.paged_cache import PagedKVCache


def expected(model, tokenizer, request: Request, eos: set[int]) -> tuple[list[int], str]:  # noqa: ANN001
    """Tokens and text the request must end with: its solo tokens, cut after the token that completes a stop
    string (which is not part of the text)."""
    tokens = alone(model, request.prompt_ids, request.params, eos)
    decoder = StreamingDecoder(tokenizer, request.params.stop)
    text = ""
    for count, token in enumerate(tokens, 1):
        text += decoder.push(token)
        if decoder.stopped:
            return tokens[:count], text
    return tokens, text + decoder.finish()


def budget(model, blocks: int, block_size: int) -> int:  # noqa: ANN001
    """A KV budget of exactly ``blocks`` usable blocks (one more is the reserved null block)."""
    per_block = PagedKVCache.bytes_per_block(model.config, block_size, torch.float32)
    return (blocks + 1) * per_block


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_regression_a_long_prompt_joining_a_running_request_does_not_corrupt_it(family: str, tokenizer) -> None:  # noqa: ANN001
    """The reported case: a 48-position context; A (3-token prompt, 40 greedy tokens) runs; one step later B
    (30-token prompt, 2 tokens) arrives. A shared-write-position cache lost A's positions from token 20 on."""
    model = small_model(family, vocab_size=tokenizer.vocab_size, max_seq_len=48)
    engine = Engine(model, tokenizer, max_len=48, block_size=4, kv_budget_bytes=budget(model, 24, 4))
    torch.manual_seed(0)
    a = engine.submit(Request(torch.randint(5, 300, (3,)).tolist(), SamplingParams(max_new_tokens=40, temperature=0)))
    engine.step()
    b = engine.submit(Request(torch.randint(5, 300, (30,)).tolist(), SamplingParams(max_new_tokens=2, temperature=0)))
    engine.run_until_idle()
    for request in (a, b):
        assert request.finish_reason in ("length", "stop")
        assert request.output_ids == alone(model, request.prompt_ids, request.params, engine.eos_ids)
    assert len(a.output_ids) > 20 or a.finish_reason == "stop"
    assert engine.pool.num_in_use == 0
    engine.pool.check()


MODEL_CONTEXT = 64


@pytest.fixture(scope="module")
def served_model(tokenizer):  # noqa: ANN001, ANN201
    return small_model("llama", vocab_size=tokenizer.vocab_size, max_seq_len=MODEL_CONTEXT)


@st.composite
def arrival_patterns(draw: st.DrawFn) -> dict:
    """Engine settings and requests: prompts from 1 token to nearly the context, some sharing prefixes, greedy
    or seeded sampling, stop strings, arrival steps and cancellations."""
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    prefixes = [draw(st.lists(st.integers(5, 300), min_size=1, max_size=40)) for _ in range(2)]
    requests = []
    for _ in range(draw(st.integers(1, 6))):
        prefix = draw(st.sampled_from([[], *prefixes]))
        suffix_max = MODEL_CONTEXT - 1 - len(prefix)
        prompt = prefix + draw(st.lists(st.integers(5, 300), min_size=0 if prefix else 1, max_size=suffix_max))
        max_tokens = draw(st.integers(1, min(24, MODEL_CONTEXT - len(prompt))))
        sampling = draw(st.sampled_from(["greedy", "sample", "filtered", "penalty"]))
        knobs = {"greedy": dict(temperature=0.0),
                 "sample": dict(temperature=1.0, seed=draw(st.integers(0, 99))),
                 "filtered": dict(temperature=0.8, top_k=draw(st.integers(0, 20)), top_p=draw(st.floats(0, 1)),
                                  min_p=draw(st.sampled_from([0.0, 0.05])), seed=draw(st.integers(0, 99))),
                 "penalty": dict(temperature=0.0, repetition_penalty=1.3)}[sampling]
        stop = tuple(draw(st.lists(st.text("aeinorst ", min_size=1, max_size=2), max_size=2)))
        requests.append(dict(prompt=prompt, params=SamplingParams(max_new_tokens=max_tokens, stop=stop, **knobs),
                             arrive=draw(st.integers(0, 12)),
                             cancel=draw(st.one_of(st.none(), st.integers(0, 20)))))
    largest = max(-(-(len(r["prompt"]) + r["params"].max_new_tokens - 1) // block_size) for r in requests)
    return dict(block_size=block_size, requests=requests, max_batch=draw(st.integers(1, 4)),
                prefill_chunk=draw(st.sampled_from([1, 3, 8, 64])),
                blocks=largest + draw(st.integers(0, 2 * largest)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.data_too_large])
@given(pattern=arrival_patterns())
def test_any_arrival_pattern_gives_every_request_its_solo_tokens(served_model, tokenizer, pattern: dict) -> None:  # noqa: ANN001
    model = served_model
    engine = Engine(model, tokenizer, block_size=pattern["block_size"], max_batch=pattern["max_batch"],
                    prefill_chunk=pattern["prefill_chunk"],
                    kv_budget_bytes=budget(model, pattern["blocks"], pattern["block_size"]))
    specs = sorted(pattern["requests"], key=lambda r: r["arrive"])
    submitted: list[tuple[Request, dict]] = []
    step = 0
    while engine.busy or len(submitted) < len(specs):
        while len(submitted) < len(specs) and specs[len(submitted)]["arrive"] <= step:
            spec = specs[len(submitted)]
            submitted.append((engine.submit(Request(list(spec["prompt"]), spec["params"])), spec))
        for request, spec in submitted:
            if spec["cancel"] is not None and spec["arrive"] + spec["cancel"] == step:
                engine.cancel(request)
        if engine.waiting and engine.running:
            event("a request waited while others ran")
        engine.step()
        engine.pool.check()
        step += 1
        assert step < 2000, "the engine stopped making progress"
    if engine.pool.hits:
        event("prefix-cache hit")
    for request, spec in submitted:
        tokens, text = expected(model, tokenizer, request, engine.eos_ids)
        event(f"finish: {request.finish_reason}")
        assert request.done.is_set()
        if request.finish_reason == "cancelled":
            assert request.output_ids == tokens[: len(request.output_ids)]
        else:
            assert request.finish_reason in ("stop", "length"), request.error
            assert request.output_ids == tokens, spec
            assert request.text == text
    assert engine.pool.num_in_use == 0 and not engine.running


def test_prefix_caching_prefills_a_shared_system_prompt_once(served_model, tokenizer) -> None:  # noqa: ANN001
    model = served_model
    engine = Engine(model, tokenizer, block_size=4, prefill_chunk=64)
    system = list(range(10, 34))  # 24 tokens: 6 full blocks
    first = engine.submit(Request(system + [40, 41], SamplingParams(max_new_tokens=6, temperature=0)))
    engine.run_until_idle()
    computed_before = engine.pool.hits
    others = [engine.submit(Request(system + tail, SamplingParams(max_new_tokens=6, temperature=0)))
              for tail in ([50], [60, 61, 62], [70, 71, 72, 73, 74])]
    engine.run_until_idle()
    assert engine.pool.hits - computed_before == 3 * 6  # every later request reused all six system blocks
    for request in [first, *others]:
        assert request.output_ids == alone(model, request.prompt_ids, request.params, engine.eos_ids)
    # A prompt that is exactly the cached blocks still computes its last token (its logits are needed).
    exact = engine.submit(Request(list(system), SamplingParams(max_new_tokens=4, temperature=0)))
    engine.run_until_idle()
    assert exact.output_ids == alone(model, exact.prompt_ids, exact.params, engine.eos_ids)
    engine.pool.check()


def test_chunked_prefill_keeps_running_streams_going(served_model, tokenizer) -> None:  # noqa: ANN001
    model = served_model
    engine = Engine(model, tokenizer, block_size=4, prefill_chunk=8)
    stream = engine.submit(Request([11, 12], SamplingParams(max_new_tokens=30, temperature=0)))
    engine.step()  # prefilled, first token sampled
    long_prompt = engine.submit(Request(list(range(20, 76)), SamplingParams(max_new_tokens=3, temperature=0)))
    produced = []
    while not long_prompt.output_ids:
        before = len(stream.output_ids)
        engine.step()
        produced.append(len(stream.output_ids) - before)
    assert len(produced) == 56 // 8 and all(n == 1 for n in produced)  # one token per step during 7 chunks
    engine.run_until_idle()
    for request in (stream, long_prompt):
        assert request.output_ids == alone(model, request.prompt_ids, request.params, engine.eos_ids)


def test_a_request_waits_for_blocks_and_the_queue_is_bounded(served_model, tokenizer) -> None:  # noqa: ANN001
    model = served_model
    engine = Engine(model, tokenizer, block_size=4, kv_budget_bytes=budget(model, 10, 4), max_queue=2)
    big = engine.submit(Request(list(range(10, 30)), SamplingParams(max_new_tokens=17, temperature=0)))  # 9 blocks
    second = engine.submit(Request([5, 6, 7], SamplingParams(max_new_tokens=6, temperature=0)))  # 2 blocks
    engine.step()
    assert engine.active() == [big] and list(engine.waiting) == [second]
    third = engine.submit(Request([8], SamplingParams(max_new_tokens=2, temperature=0)))
    with pytest.raises(QueueFull):
        engine.submit(Request([9], SamplingParams(max_new_tokens=2, temperature=0)))
    with pytest.raises(QueueFull):  # all or nothing
        engine.submit_all([Request([9], SamplingParams(max_new_tokens=2)) for _ in range(2)])
    with pytest.raises(ValueError, match="KV blocks"):
        engine.submit(Request(list(range(10, 40)), SamplingParams(max_new_tokens=20)))  # 13 blocks > 10
    engine.run_until_idle()
    for request in (big, second, third):
        assert request.output_ids == alone(model, request.prompt_ids, request.params, engine.eos_ids)
    assert engine.pool.num_in_use == 0


def test_stop_strings_and_cancellation(tokenizer) -> None:  # noqa: ANN001
    model = small_model("qwen2", vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_len=64, max_batch=2, block_size=4)
    pieces: list[str] = []
    free_run = engine.submit(Request([10, 20, 30], SamplingParams(max_new_tokens=30, temperature=0)))
    engine.run_until_idle()
    text = free_run.text
    assert len(text) > 6
    stop = text[3:6]
    stopped = engine.submit(Request([10, 20, 30], SamplingParams(max_new_tokens=30, temperature=0, stop=(stop,)),
                                    on_text=pieces.append))
    cancelled = engine.submit(Request([40, 50], SamplingParams(max_new_tokens=30, temperature=0)))
    waiting = engine.submit(Request([60, 70], SamplingParams(max_new_tokens=5, temperature=0)))
    engine.step()
    assert list(engine.waiting) == [waiting]  # at most two at once
    in_use = engine.pool.num_in_use
    engine.cancel(cancelled)
    assert cancelled.finish_reason == "cancelled" and cancelled.done.is_set()
    assert engine.pool.num_in_use == in_use - 8  # its 2 + 30 - 1 positions in blocks of 4 were freed
    engine.run_until_idle()
    assert stopped.text == text[: text.index(stop)] == "".join(pieces) and stopped.finish_reason == "stop"
    assert waiting.finish_reason == "length" and len(waiting.output_ids) == 5
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit(Request([1] * 60, SamplingParams(max_new_tokens=10)))


POISON = 7  # a prompt token whose embedding the fault-injection hooks act on


def test_a_failing_step_fails_only_the_requests_it_touched(served_model, tokenizer, caplog) -> None:  # noqa: ANN001
    model = served_model
    engine = Engine(model, tokenizer, block_size=4, prefill_chunk=64)

    def explode(module, args) -> None:  # noqa: ANN001
        if bool((args[0] == POISON).any()):
            raise RuntimeError("injected fault")

    healthy = engine.submit(Request([11, 12, 13], SamplingParams(max_new_tokens=20, temperature=0)))
    engine.step()
    handle = model.tok_emb.register_forward_pre_hook(explode)
    try:
        poisoned = engine.submit(Request([POISON, 20, 21], SamplingParams(max_new_tokens=5, temperature=0)))
        with caplog.at_level("ERROR"):
            engine.run_until_idle()
    finally:
        handle.remove()
    assert poisoned.finish_reason == "error" and "injected fault" in poisoned.error
    assert "Traceback" in caplog.text and "injected fault" in caplog.text
    assert healthy.finish_reason == "length"
    assert healthy.output_ids == alone(model, healthy.prompt_ids, healthy.params, engine.eos_ids)
    after = engine.submit(Request([POISON, 20, 21], SamplingParams(max_new_tokens=5, temperature=0)))
    engine.run_until_idle()
    assert after.output_ids == alone(model, after.prompt_ids, after.params, engine.eos_ids)
    assert engine.pool.num_in_use == 0


def test_non_finite_logits_fail_their_request_and_leave_no_trace(served_model, tokenizer) -> None:  # noqa: ANN001
    model = served_model
    engine = Engine(model, tokenizer, block_size=4, kv_budget_bytes=budget(model, 12, 4))

    def nan_rows(module, args, output: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.where((args[0] == POISON)[..., None], float("nan"), output)

    handle = model.tok_emb.register_forward_hook(nan_rows)
    healthy = engine.submit(Request([11, 12, 13], SamplingParams(max_new_tokens=12, temperature=0)))
    poisoned = engine.submit(Request([POISON, 20, 21, 22, 23], SamplingParams(max_new_tokens=30, temperature=1.0)))
    engine.run_until_idle()
    handle.remove()
    assert poisoned.finish_reason == "error" and "non-finite" in poisoned.error
    assert healthy.output_ids == alone(model, healthy.prompt_ids, healthy.params, engine.eos_ids)
    # The poisoned request's blocks (full of NaN) are reused: their new owners must not see any of it.
    reused = [engine.submit(Request([30 + i, 31, 32], SamplingParams(max_new_tokens=12, temperature=0)))
              for i in range(3)]
    engine.run_until_idle()
    for request in reused:
        assert request.output_ids == alone(model, request.prompt_ids, request.params, engine.eos_ids)


def test_a_cancellation_during_a_step_is_applied_when_it_ends(served_model, tokenizer) -> None:  # noqa: ANN001
    """Cancelling from another thread never waits for a running step; the step's end applies it."""
    import threading

    model = served_model
    engine = Engine(model, tokenizer, block_size=4)
    keep = engine.submit(Request([11, 12, 13], SamplingParams(max_new_tokens=10, temperature=0)))
    drop = engine.submit(Request([21, 22], SamplingParams(max_new_tokens=20, temperature=0)))
    engine.step()
    inside, release = threading.Event(), threading.Event()

    def pause(module, args) -> None:  # noqa: ANN001
        inside.set()
        release.wait(10)

    handle = model.tok_emb.register_forward_pre_hook(pause)
    stepping = threading.Thread(target=engine.step)
    stepping.start()
    assert inside.wait(10)
    engine.cancel(drop)  # returns at once although the step holds the engine
    assert not drop.done.is_set() and drop in engine.active()
    handle.remove()
    release.set()
    stepping.join(10)
    assert drop.finish_reason == "cancelled" and drop not in engine.active()
    engine.run_until_idle()
    assert keep.output_ids == alone(model, keep.prompt_ids, keep.params, engine.eos_ids)
    assert engine.pool.num_in_use == 0
