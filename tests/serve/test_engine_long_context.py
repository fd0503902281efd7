"""The paged serving engine on sliding-window and ALiBi models: each request's tokens equal its solo tokens."""

from __future__ import annotations

import pytest
import torch

from helpers import small_model
from helpers import solo_tokens as alone
from omnilm.infer.sampling import SamplingParams
from omnilm.serve.engine import Engine, Request
from omnilm.serve.paged_cache import PagedKVCache

KINDS = {
    "mistral": dict(family="llama", sliding_window=6),
    "qwen2-window": dict(family="qwen2", sliding_window=5, window_from_layer=1),
    "bloom": dict(family="gpt2", alibi=True, embedding_norm=True),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_interleaved_requests_get_their_solo_tokens(kind, tokenizer) -> None:  # noqa: ANN001
    overrides = dict(KINDS[kind])
    model = small_model(overrides.pop("family"), vocab_size=tokenizer.vocab_size, max_seq_len=64, **overrides)
    per_block = PagedKVCache.bytes_per_block(model.config, 4, torch.float32)
    engine = Engine(model, tokenizer, max_len=64, block_size=4, kv_budget_bytes=33 * per_block)
    torch.manual_seed(0)
    a = engine.submit(Request(torch.randint(5, 300, (9,)).tolist(), SamplingParams(max_new_tokens=30, temperature=0)))
    engine.step()
    b = engine.submit(Request(torch.randint(5, 300, (20,)).tolist(), SamplingParams(max_new_tokens=12, temperature=0)))
    engine.run_until_idle()
    for request in (a, b):
        assert request.output_ids == alone(model, request.prompt_ids, request.params, engine.eos_ids)
    assert len(a.output_ids) > 12 or a.finish_reason == "stop"
