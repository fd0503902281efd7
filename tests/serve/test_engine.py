"""Continuous batching: requests joining and leaving mid-flight compute exactly what they compute alone."""

from __future__ import annotations

import pytest
import torch

from helpers import small_model
from omnilm.infer.generate import FINISHED, generate_ids
from omnilm.infer.sampling import SamplingParams
from omnilm.serve.engine import Engine, Request, kv_bytes_per_slot


def alone(model, prompt: list[int], params: SamplingParams, eos: set[int]) -> list[int]:  # noqa: ANN001
    tokens = []
    for step in generate_ids(model, [prompt], params, sorted(eos), 0):
        token = int(step[0])
        if token == FINISHED or token in eos:
            break
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_staggered_requests_equal_their_solo_generation(family: str, tokenizer) -> None:  # noqa: ANN001
    model = small_model(family, vocab_size=tokenizer.vocab_size, max_seq_len=48)
    engine = Engine(model, tokenizer, max_len=48, max_slots=3)
    torch.manual_seed(0)
    specs = [(torch.randint(5, 300, (n,)).tolist(), SamplingParams(max_new_tokens=m, temperature=temp, seed=s))
             for n, m, temp, s in [(7, 20, 0.0, None), (12, 30, 1.0, 3), (3, 25, 0.0, None), (20, 15, 0.8, 11),
                                   (5, 40, 1.0, 5)]]
    requests, steps = [], 0
    # Two requests now, the others join while earlier ones are mid-generation (more requests than slots, and a
    # buffer small enough that the slots must be shifted left).
    for prompt, params in specs[:2]:
        requests.append(engine.submit(Request(prompt, params)))
    while engine.busy or len(requests) < len(specs):
        if len(requests) < len(specs) and steps % 6 == 5:
            requests.append(engine.submit(Request(*specs[len(requests)])))
        engine.step()
        steps += 1
    for request, (prompt, params) in zip(requests, specs, strict=True):
        assert request.done.is_set() and request.finish_reason in ("stop", "length")
        assert request.output_ids == alone(model, prompt, params, engine.eos_ids), request.request_id
        assert request.text == tokenizer.decode(request.output_ids, skip_special_tokens=True)


def test_stop_strings_cancellation_and_budget(tokenizer) -> None:  # noqa: ANN001
    model = small_model("qwen2", vocab_size=tokenizer.vocab_size)
    per_slot = kv_bytes_per_slot(model, 64)
    engine = Engine(model, tokenizer, max_len=64, kv_budget_bytes=2 * per_slot + 1)
    assert engine.capacity == 2
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
    assert engine.waiting == [waiting]  # two slots, both taken
    engine.cancel(cancelled)
    assert cancelled.finish_reason == "cancelled" and cancelled.done.is_set()
    engine.run_until_idle()
    assert stopped.text == text[: text.index(stop)] == "".join(pieces) and stopped.finish_reason == "stop"
    assert waiting.finish_reason == "length" and len(waiting.output_ids) == 5
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit(Request([1] * 60, SamplingParams(max_new_tokens=10)))


@pytest.mark.parametrize("family", ["llama"])
def test_serving_with_a_draft_model_gives_the_targets_greedy_output(model_dir, tokenizer, tmp_path) -> None:  # noqa: ANN001
    from omnilm.model.hf import load_pretrained, save_pretrained
    from omnilm.serve.server import Service

    draft = small_model("llama", seed=5, vocab_size=tokenizer.vocab_size, n_layer=1)
    draft_dir = save_pretrained(draft, tmp_path / "draft", tokenizer=tokenizer)
    service = Service(model_dir, draft_dir=draft_dir, speculative_k=3)
    target = load_pretrained(model_dir).eval()
    body = {"prompt": "Alice was born in", "max_tokens": 24, "temperature": 0}
    first, second = (service.submit(service.parse(body, chat=False))[0] for _ in range(2))
    cancelled = service.submit(service.parse(body | {"max_tokens": 30}, chat=False))[0]
    service.cancel([cancelled])
    for request in (first, second):
        assert request.done.wait(60)
        assert request.output_ids == alone(target, tokenizer.encode("Alice was born in"),
                                           SamplingParams(max_new_tokens=24, temperature=0), service.engine.eos_ids)
    assert cancelled.finish_reason == "cancelled" and not service.engine.busy
