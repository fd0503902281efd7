"""Serving with the model's own multi-token heads as the draft (``--mtp``): each request the model's greedy output."""

from __future__ import annotations

import pytest

from helpers import small_model
from helpers import solo_tokens as alone
from omnilm.errors import UserError
from omnilm.infer.sampling import SamplingParams
from omnilm.model.hf import load_pretrained, save_pretrained
from omnilm.model.mtp import MTPConfig, MultiTokenModel
from omnilm.serve.server import Service


def test_serving_with_mtp_heads_gives_the_models_greedy_output(tokenizer, tmp_path) -> None:  # noqa: ANN001
    model = MultiTokenModel(small_model("llama", vocab_size=tokenizer.vocab_size), MTPConfig(n_heads=3,
                                                                                               variant="sequential"))
    folder = model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    service = Service(folder, mtp=True, speculative_k=3, engine_process=False)
    assert type(service.engine).__name__ == "SpeculativeEngine"
    decoder = load_pretrained(folder).eval()
    body = {"prompt": "Alice was born in", "max_tokens": 24, "temperature": 0}
    first, second = (service.submit(service.parse(body, chat=False))[0] for _ in range(2))
    for request in (first, second):
        assert request.done.wait(60)
        assert request.output_ids == alone(decoder, tokenizer.encode("Alice was born in"),
                                           SamplingParams(max_new_tokens=24, temperature=0), service.engine.eos_ids)
    service.close()


def test_mtp_serving_needs_heads(tokenizer, tmp_path) -> None:  # noqa: ANN001
    plain = save_pretrained(small_model("llama", vocab_size=tokenizer.vocab_size), tmp_path / "p", tokenizer=tokenizer)
    with pytest.raises(UserError, match="no multi-token-prediction heads"):
        Service(plain, mtp=True, engine_process=False)
    with pytest.raises(UserError, match="not both"):
        Service(plain, mtp=True, draft_model=str(plain), engine_process=False)
