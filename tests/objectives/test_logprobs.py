import math

import numpy as np
import pytest
import torch

from helpers import small_model
from omnilm.objectives.logprobs import (
    entropy_from_logits,
    masked_mean,
    sequence_logprobs,
    shifted_token_logprobs,
    token_logprobs,
)


def _log_prob(row: list[float], index: int) -> float:
    """log softmax(row)[index] by explicit float64 sums."""
    top = max(row)
    return row[index] - top - math.log(sum(math.exp(z - top) for z in row))


def test_token_logprobs_matches_explicit_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7) * 3
    labels = torch.tensor([[0, 6, 3], [2, 2, 5]])
    out = token_logprobs(logits, labels)
    for b in range(2):
        for t in range(3):
            assert out[b, t].item() == pytest.approx(_log_prob(logits[b, t].tolist(), int(labels[b, t])), abs=1e-6)


def test_token_logprobs_upcasts_low_precision_logits_and_tolerates_ignore_labels():
    logits = (torch.randn(1, 4, 11) * 5).bfloat16()
    labels = torch.tensor([[1, -100, 4, 10]])
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    expected = _log_prob(logits[0, 2].float().tolist(), 4)
    assert out[0, 2].item() == pytest.approx(expected, abs=1e-6)


def _masked_sum_by_loop(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor) -> list[float]:
    """Σ over positions t ≥ 1 with loss_mask[t] = 1 of log p(ids[t]) read from the full log-softmax at t − 1."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    totals = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if loss_mask[b, t]:
                total += log_probs[b, t - 1, ids[b, t]].item()
        totals.append(total)
    return totals


def test_sequence_logprobs_sums_the_response_tokens_of_a_real_model():
    model = small_model("llama")
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (2, 9))
    attention = torch.ones_like(ids)
    attention[1, :3] = 0  # left padding
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 0]])
    with torch.no_grad():
        out = sequence_logprobs(model, ids, attention, loss_mask)
        logits = model(ids, attention_mask=attention)
    expected = _masked_sum_by_loop(logits, ids, loss_mask)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx(expected, abs=1e-5)

    # The padded row scores the same as the sequence alone, without padding.
    with torch.no_grad():
        alone = sequence_logprobs(model, ids[1:, 3:], None, loss_mask[1:, 3:])
    assert alone.item() == pytest.approx(out[1].item(), abs=1e-4)

    with torch.no_grad():
        averaged = sequence_logprobs(model, ids, attention, loss_mask, average=True)
    assert averaged.tolist() == pytest.approx([expected[0] / 5, expected[1] / 2], abs=1e-6)


def test_first_mask_entry_is_ignored_and_shift_is_one_token():
    model = small_model("gpt2")
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        with_first = sequence_logprobs(model, ids, None, torch.ones_like(ids))
        without_first = sequence_logprobs(model, ids, None, torch.tensor([[0, 1, 1, 1, 1]]))
        per_token = shifted_token_logprobs(model, ids)
    assert with_first.item() == without_first.item()
    assert per_token.shape == (1, 4)
    assert per_token.sum().item() == pytest.approx(with_first.item(), abs=1e-5)


def test_masked_mean_over_all_and_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 3) / 2)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 0.0])  # empty row → 0, not NaN
    assert masked_mean(x, torch.ones_like(mask), dim=0).tolist() == pytest.approx([2.5, 3.5, 4.5])


def test_entropy_matches_numpy():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6) * 2
    out = entropy_from_logits(logits)
    z = logits.double().numpy()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=0)
    uniform = entropy_from_logits(torch.zeros(1, 1, 8))
    assert uniform.item() == pytest.approx(math.log(8), abs=1e-6)
