"""Masked language-modelling loss over rows grouped by length: the same sums and gradients as one padded pass."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import small_model
from omnilm.objectives.lm import cheapest_split, grouped_masked_lm_loss, length_groups, masked_lm_loss


def padded_cost(lengths: list[int], runs: list[tuple[int, int]]) -> int:
    return sum((stop - start) * lengths[stop - 1] for start, stop in runs)


def brute_force_cost(lengths: list[int], groups: int) -> int:
    """The least padded total over every way to cut ``lengths`` into at most ``groups`` contiguous runs."""
    n, best = len(lengths), None
    for cuts in range(min(groups, n)):
        for inner in itertools.combinations(range(1, n), cuts):
            bounds = (0, *inner, n)
            cost = padded_cost(lengths, list(itertools.pairwise(bounds)))
            best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(2, 400), min_size=1, max_size=9), st.integers(1, 5))
def test_cheapest_split_is_optimal_and_covers_every_row(lengths: list[int], groups: int) -> None:
    lengths = sorted(lengths)
    runs = cheapest_split(lengths, groups)
    assert 1 <= len(runs) <= groups
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs)) and all(s < e for s, e in runs)
    assert padded_cost(lengths, runs) == brute_force_cost(lengths, groups)


def mixed_batch(seed: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of very different lengths; two end with unscored tokens, one has no scored token."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 40, 7, 33, 6, 12, 3, 40]
    scored = [(2, 5), (10, 40), (3, 6), (20, 30), (1, 6), (4, 12), None, (39, 40)]
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, (length, span) in enumerate(zip(lengths, scored, strict=True)):
        tokens[row, :length] = torch.randint(3, 64, (length,), generator=g)
        if span:
            mask[row, span[0]:span[1]] = 1
    return {"tokens": tokens, "loss_mask": mask}


def test_length_groups_keep_every_scored_token_and_trim_the_rest() -> None:
    batch = mixed_batch(0)
    groups = length_groups(batch, 3)
    assert 1 < len(groups) <= 3
    assert sum(len(g["tokens"]) for g in groups) == len(batch["tokens"])
    assert sum(int(g["loss_mask"].sum()) for g in groups) == int(batch["loss_mask"].sum())
    # Far fewer token positions computed than the padded batch's 8 × 40.
    assert sum(g["tokens"].numel() for g in groups) < 0.7 * batch["tokens"].numel()
    # Rows stay intact: every group row is a prefix of a batch row.
    rows = {tuple(r.tolist()) for r in batch["tokens"]}
    for group in groups:
        for row in group["tokens"]:
            assert any(full[:len(row)] == tuple(row.tolist()) for full in rows)


def test_grouped_loss_and_gradient_equal_one_padded_pass() -> None:
    batch = mixed_batch(1)
    model = small_model("llama", vocab_size=64, init_std=0.02)
    model.zero_grad(set_to_none=True)
    expected, _ = masked_lm_loss(model, batch, reduction="sum")
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for groups in (2, 3, 8):
        model.zero_grad(set_to_none=True)
        got, extra = grouped_masked_lm_loss(model, batch, groups)
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert extra["loss_tokens"] == float(batch["loss_mask"][:, 1:].sum())
        for name, grad in expected_grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6,
                                       msg=name)
