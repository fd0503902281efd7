"""Serving with a draft model: requests one at a time, each the target's own greedy output."""

from __future__ import annotations

import json

import pytest

from helpers import small_model
from helpers import solo_tokens as alone
from omnilm.errors import UserError
from omnilm.infer.sampling import SamplingParams
from omnilm.model.hf import load_pretrained, save_pretrained
from omnilm.serve.server import Service


def test_serving_with_a_draft_model_gives_the_targets_greedy_output(tokenizer, tmp_path) -> None:  # noqa: ANN001
    target = small_model("llama", vocab_size=tokenizer.vocab_size)
    target_dir = save_pretrained(target, tmp_path / "target", tokenizer=tokenizer)
    draft = small_model("llama", seed=5, vocab_size=tokenizer.vocab_size, n_layer=1)
    draft_dir = save_pretrained(draft, tmp_path / "draft", tokenizer=tokenizer)
    service = Service(target_dir, draft_model=str(draft_dir), speculative_k=3, engine_process=False)
    target = load_pretrained(target_dir).eval()
    body = {"prompt": "Alice was born in", "max_tokens": 24, "temperature": 0}
    first, second = (service.submit(service.parse(body, chat=False))[0] for _ in range(2))
    cancelled = service.submit(service.parse(body | {"max_tokens": 30}, chat=False))[0]
    service.cancel([cancelled])
    for request in (first, second):
        assert request.done.wait(60)
        assert request.output_ids == alone(target, tokenizer.encode("Alice was born in"),
                                           SamplingParams(max_new_tokens=24, temperature=0), service.engine.eos_ids)
    assert cancelled.finish_reason == "cancelled" and not service.engine.busy
    service.close()


def test_an_incompatible_draft_is_refused_when_the_server_starts(tokenizer, tmp_path) -> None:  # noqa: ANN001
    from tokenizers import Tokenizer as BackendTokenizer

    from omnilm.tokenizer import Tokenizer, train_bpe

    target_dir = save_pretrained(small_model("llama", vocab_size=tokenizer.vocab_size), tmp_path / "target",
                                 tokenizer=tokenizer)
    other = train_bpe(["an entirely different corpus for a different vocabulary"] * 20, vocab_size=300)
    wrong_vocab = save_pretrained(small_model("llama", vocab_size=other.vocab_size), tmp_path / "small",
                                  tokenizer=other)
    with pytest.raises(UserError, match="vocabulary"):
        Service(target_dir, draft_model=str(wrong_vocab))
    # Same size, other ids: two entries of the vocabulary swapped.
    spec = json.loads(tokenizer.backend.to_str())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[100], list(vocab)[101]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    swapped = Tokenizer(BackendTokenizer.from_str(json.dumps(spec)))
    same_size = save_pretrained(small_model("llama", vocab_size=swapped.vocab_size), tmp_path / "same-size",
                                tokenizer=swapped)
    assert swapped.vocab_size == tokenizer.vocab_size
    with pytest.raises(UserError, match="tokenizer differs"):
        Service(target_dir, draft_model=str(same_size))


def test_a_failing_draft_fails_its_request_and_the_next_one_is_served(tokenizer, tmp_path) -> None:  # noqa: ANN001
    from omnilm.serve.engine import Request
    from omnilm.serve.speculative_engine import SpeculativeEngine

    target = small_model("llama", vocab_size=tokenizer.vocab_size)
    draft = small_model("llama", seed=5, vocab_size=tokenizer.vocab_size, n_layer=1)
    engine = SpeculativeEngine(target, draft, tokenizer, k=3)

    def broken(module, args) -> None:  # noqa: ANN001
        raise RuntimeError("draft exploded")

    handle = draft.tok_emb.register_forward_pre_hook(broken)
    failed = engine.submit(Request([10, 11, 12], SamplingParams(max_new_tokens=8, temperature=0)))
    engine.run_until_idle()
    handle.remove()
    assert failed.finish_reason == "error" and "draft exploded" in failed.error
    served = engine.submit(Request([10, 11, 12], SamplingParams(max_new_tokens=8, temperature=0)))
    engine.run_until_idle()
    assert served.output_ids == alone(target, [10, 11, 12], served.params, engine.eos_ids)
