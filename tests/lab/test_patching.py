"""Attention patching: recorded patterns are the model's own, and patching in a model's own patterns is a no-op."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import small_model
from omnilm.lab.knowledge.patching import AttentionPatch, attention_pattern, mix_values, snapshot_steps
from omnilm.model.attention import build_attention_mask, rope_cos_sin


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("padded", [False, True])
def test_pattern_times_values_is_the_attention_output(family: str, padded: bool) -> None:
    model = small_model(family)
    attn = model.blocks[0].attn
    torch.manual_seed(0)
    x = torch.randn(2, 7, model.config.d_model)
    positions = torch.arange(7).expand(2, 7)
    rope = rope_cos_sin(positions, model.config.dim_per_head, model.config.rope_theta, x.dtype) \
        if model.config.uses_rope else None
    mask = None
    if padded:
        mask = build_attention_mask(torch.tensor([[1] * 7, [1] * 5 + [0] * 2]), 0, 7, x.device)
    pattern = attention_pattern(attn, x, rope, mask)
    assert torch.allclose(pattern.sum(-1), torch.ones(2, attn.n_head, 7), atol=1e-6)
    assert (pattern.triu(1) == 0).all()  # causal
    with torch.no_grad():
        assert torch.allclose(mix_values(attn, x, pattern), attn(x, rope, mask, None), atol=1e-5)


def test_patching_in_own_patterns_changes_nothing_and_other_patterns_do() -> None:
    model = small_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
    patch = AttentionPatch(model, copy.deepcopy(model))
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask), expected, atol=1e-5)
    patch.remove()

    other = small_model("llama", seed=1)
    patch = AttentionPatch(model, other)
    with torch.no_grad():
        patched = model(ids)
    patch.remove()
    assert not torch.allclose(patched, expected[:, :, :], atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask), expected, atol=1e-6)  # hooks removed


def test_patched_model_trains_values_but_not_queries_and_keys() -> None:
    model = small_model("llama").train()
    reference = small_model("llama", seed=1)
    AttentionPatch(model, reference)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    attn = model.blocks[1].attn
    assert attn.q_proj.weight.grad is None or not attn.q_proj.weight.grad.any()
    assert attn.v_proj.weight.grad is not None and attn.v_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in reference.parameters())


def test_snapshot_steps() -> None:
    steps = [10, 20, 30, 40, 50, 60]
    assert snapshot_steps(steps, {"drop_end": 20, "emergence_step": 50}) == {"before": 10, "during": 30, "after": 50}
    # Knowledge never emerged: "after" is the last evaluation.
    assert snapshot_steps(steps, {"drop_end": 20, "emergence_step": None}) == {"before": 10, "during": 40,
                                                                                "after": 60}
