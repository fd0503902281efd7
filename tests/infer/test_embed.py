"""Text embeddings: mean-pooled final hidden states, equal unbatched, batched and in transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CORPUS, small_model
from omnilm.infer.embed import embed_ids, embed_texts
from omnilm.model.hf import save_pretrained
from omnilm.tokenizer import Tokenizer

TEXTS = [*CORPUS, "a", "short one", "Alice Moreau studied physics."]


def brute_force(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """One text alone, no mask: mean of the hidden states, normalised with numpy."""
    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor([ids]))[0].double().numpy()
    mean = hidden.mean(axis=0)
    return mean / np.linalg.norm(mean)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_batched_equals_one_at_a_time(family: str, tokenizer: Tokenizer) -> None:
    model = small_model(family, vocab_size=tokenizer.vocab_size)
    got = embed_texts(model, tokenizer, TEXTS, batch_size=3)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), model.config.d_model)
    for row, text in enumerate(TEXTS):
        np.testing.assert_allclose(got[row], brute_force(model, tokenizer.encode(text, special=False)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_padding_and_batch_size_change_nothing(tokenizer: Tokenizer) -> None:
    model = small_model("llama", vocab_size=tokenizer.vocab_size)
    alone = np.stack([embed_texts(model, tokenizer, [t])[0] for t in TEXTS])
    for batch_size in (1, 2, len(TEXTS)):
        np.testing.assert_allclose(embed_texts(model, tokenizer, TEXTS, batch_size=batch_size), alone, atol=1e-5)
    # the pad id is never read: any pad id gives the same vectors
    ids = [tokenizer.encode(t) for t in TEXTS]
    np.testing.assert_allclose(embed_ids(model, ids, pad_id=0), embed_ids(model, ids, pad_id=5), atol=1e-6)


def test_equal_to_transformers_last_hidden_state(tmp_path: Path, tokenizer: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    model = small_model("llama", vocab_size=tokenizer.vocab_size)
    folder = save_pretrained(model, tmp_path / "m", tokenizer=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    got = embed_texts(model, tokenizer, TEXTS)
    for row, text in enumerate(TEXTS):
        with torch.no_grad():
            out = hf(torch.tensor([tokenizer.encode(text)]), output_hidden_states=True)
        mean = out.hidden_states[-1][0].mean(dim=0)
        np.testing.assert_allclose(got[row], (mean / mean.norm()).numpy(), atol=1e-5)


def test_long_texts_are_cut_and_empty_ones_refused(tokenizer: Tokenizer) -> None:
    model = small_model("gpt2", vocab_size=tokenizer.vocab_size, max_seq_len=16)
    long_ids = tokenizer.encode(CORPUS[0] * 3)
    assert len(long_ids) > 16
    np.testing.assert_allclose(embed_ids(model, [long_ids])[0], brute_force(model, long_ids[:16]), atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        embed_texts(model, tokenizer, ["fine", ""])
    assert embed_texts(model, tokenizer, []).shape == (0, model.config.d_model)
