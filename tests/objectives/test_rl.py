import math

import numpy as np
import pytest
import torch

from omnilm.objectives.logprobs import token_logprobs
from omnilm.objectives.rl import (
    gae,
    grpo_advantages,
    grpo_loss,
    k3_kl,
    kl_penalty_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

REWARDS = [[0.0, 0.5, -0.2, 1.0, 9.0], [0.3, 0.0, 7.0, 0.4, 0.0], [1.0, -1.0, 0.0, 0.0, 0.0]]
VALUES = [[5.0, 0.1, 0.7, 0.4, 9.0], [0.2, 0.6, 8.0, -0.3, 3.0], [0.5, 0.2, 4.0, 4.0, 4.0]]
# Row 0: prompt then response; row 1: a non-policy token inside the response; row 2: right padding.
MASK = [[0, 1, 1, 1, 0], [1, 1, 0, 1, 0], [1, 1, 0, 0, 0]]


def _gae_reference(rewards: list[float], values: list[float], mask: list[int], gamma: float,
                   lam: float) -> list[float]:
    """GAE over just the response steps, in plain floats, scattered back to their positions."""
    steps = [t for t, m in enumerate(mask) if m]
    out = [0.0] * len(mask)
    running = 0.0
    for i in range(len(steps) - 1, -1, -1):
        t = steps[i]
        next_value = values[steps[i + 1]] if i + 1 < len(steps) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        out[t] = running
    return out


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_a_reverse_loop_over_response_steps(gamma, lam):
    adv, ret = gae(torch.tensor(REWARDS), torch.tensor(VALUES), torch.tensor(MASK), gamma=gamma, lam=lam)
    for b in range(3):
        expected = _gae_reference(REWARDS[b], VALUES[b], MASK[b], gamma, lam)
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-6)
        expected_returns = [a + v if m else 0.0 for a, v, m in zip(expected, VALUES[b], MASK[b], strict=True)]
        assert ret[b].tolist() == pytest.approx(expected_returns, abs=1e-6)


def test_gae_with_unit_gamma_and_lambda_is_future_reward_minus_value():
    adv, ret = gae(torch.tensor(REWARDS), torch.tensor(VALUES), torch.tensor(MASK), gamma=1.0, lam=1.0)
    for b in range(3):
        for t in range(5):
            if not MASK[b][t]:
                assert adv[b, t].item() == 0.0
                continue
            future = sum(r for r, m in zip(REWARDS[b][t:], MASK[b][t:], strict=True) if m)
            assert adv[b, t].item() == pytest.approx(future - VALUES[b][t], abs=1e-6)
            assert ret[b, t].item() == pytest.approx(future, abs=1e-6)


def test_ppo_policy_gradient_is_zero_on_the_clipped_side_only():
    eps = 0.2
    # ratio:      1.5 (above)  0.5 (below)  1.5 (above)  0.5 (below)  1.1 (inside)
    # advantage:  +1 clipped   +1 free      −1 free      −1 clipped   +2 free
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]])
    old = torch.full((1, 5), -2.0)
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.ones(1, 5)
    loss, metrics = ppo_policy_loss(logp, old, adv, mask, clip=eps)

    pairs = zip(ratios[0].tolist(), adv[0].tolist(), strict=True)
    objectives = [min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r, a in pairs]
    assert loss.item() == pytest.approx(-sum(objectives) / 5, abs=1e-6)
    assert metrics["clipfrac"] == pytest.approx(2 / 5)
    log_r = ratios.log()[0].tolist()
    assert metrics["approx_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in log_r) / 5, abs=1e-6)

    loss.backward()
    # d(−A·ρ)/d logp = −A·ρ on unclipped tokens, 0 where the clip is active.
    expected = [0.0, -1.0 * 0.5 / 5, 1.0 * 1.5 / 5, 0.0, -2.0 * 1.1 / 5]
    assert logp.grad[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_ppo_policy_loss_ignores_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(logp, logp.detach(), torch.tensor([[1.0, 5.0, 100.0]]), torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(-(1.0 + 5.0) / 2)
    loss.backward()
    assert logp.grad[0, 2].item() == 0.0


def test_ppo_value_loss_takes_the_larger_error():
    values = torch.tensor([[1.0, 0.0, 0.5, 9.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.4, 0.0]])
    returns = torch.tensor([[2.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: clipped V = 0.7 → errors 1.0 vs 1.69 → 1.69 (clipped, no gradient)
    # token 1: clipped V = 0.3 → errors 1.0 vs 1.69 → 1.69 (clipped)
    # token 2: inside the clip → 0.25
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 0.25) / 3, abs=1e-6)
    assert metrics["clipfrac"] == pytest.approx(2 / 3)
    loss.backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.0, 0.5 / 3, 0.0], abs=1e-6)


def test_kl_penalty_rewards_put_the_score_on_the_last_response_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-0.3, -0.1, -0.2, -0.4], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -3.0], [-0.3, -0.6, -0.2, -0.9], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    score = torch.tensor([2.0, -1.0, 5.0])
    rewards = kl_penalty_rewards(score, logp, ref, mask, kl_coef=0.1)
    expected = [[0.0, -0.1 * -1.0, 0.0 + 2.0, 0.0],
                [0.0, -0.1 * 0.5, 0.0, -0.1 * 0.5 - 1.0],
                [0.0, 0.0, 0.0, 0.0]]  # no response tokens: nowhere to put the score
    for b in range(3):
        assert rewards[b].tolist() == pytest.approx(expected[b], abs=1e-6)


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = masked_whiten(x, mask)
    values = np.array([1.0, 2.0, 3.0, 4.0])
    expected = (values - values.mean()) / values.std()
    np.testing.assert_allclose(out[:, :2].flatten().numpy(), expected, atol=1e-5)
    assert out[:, 2].tolist() == [0.0, 0.0]


def test_grpo_advantages_match_numpy_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
    adv = grpo_advantages(rewards, group_size=4)
    groups = rewards.numpy().astype(np.float64).reshape(3, 4)
    expected = np.concatenate([(g - g.mean()) / (g.std(ddof=0) + 1e-6) for g in groups])
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-5)
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards carry no signal

    centred = grpo_advantages(rewards, group_size=4, scale=False)
    np.testing.assert_allclose(centred.numpy(), np.concatenate([g - g.mean() for g in groups]), atol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(rewards, group_size=5)


def test_grpo_loss_matches_a_per_sequence_loop():
    torch.manual_seed(0)
    logp = -torch.rand(3, 4) * 2
    old = logp + torch.randn(3, 4) * 0.3
    ref = logp + torch.randn(3, 4) * 0.3
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    eps, beta = 0.2, 0.04
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, clip=eps, kl_coef=beta)
    token_loss, token_metrics = grpo_loss(logp, old, ref, adv, mask, clip=eps, kl_coef=beta, aggregation="token")

    per_seq, per_seq_kl, all_tokens, all_kl = [], [], [], []
    for i in range(3):
        terms, kls = [], []
        for t in range(4):
            if not mask[i, t]:
                continue
            ratio = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
            d = ref[i, t].item() - logp[i, t].item()
            kl = math.exp(d) - d - 1
            terms.append(-min(ratio * a, clipped_ratio * a) + beta * kl)
            kls.append(kl)
        per_seq.append(sum(terms) / len(terms))
        per_seq_kl.append(sum(kls) / len(kls))
        all_tokens += terms
        all_kl += kls
    assert loss.item() == pytest.approx(sum(per_seq) / 3, abs=1e-6)
    assert metrics["kl"] == pytest.approx(sum(per_seq_kl) / 3, abs=1e-6)
    assert token_loss.item() == pytest.approx(sum(all_tokens) / len(all_tokens), abs=1e-6)
    assert token_metrics["kl"] == pytest.approx(sum(all_kl) / len(all_kl), abs=1e-6)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert k3_kl(logp, logp).tolist() == [0.0, 0.0, 0.0]
    assert (k3_kl(logp, logp + torch.tensor([0.3, -0.3, 1.0])) > 0).all()


def test_one_grpo_step_raises_positive_and_lowers_negative_advantage_samples():
    torch.manual_seed(3)
    logits = torch.randn(4, 3, 6, requires_grad=True)
    labels = torch.randint(0, 6, (4, 3))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)  # samples 0 and 3 are better
    before = token_logprobs(logits, labels).detach()
    logp = token_logprobs(logits, labels)
    loss, metrics = grpo_loss(logp, before, before, adv, mask)
    assert metrics["clipfrac"] == 0.0 and metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
        after = token_logprobs(logits, labels)
    change = ((after - before) * mask).sum(dim=1)
    assert change[0] > 0 and change[3] > 0
    assert change[1] < 0 and change[2] < 0
