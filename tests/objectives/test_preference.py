import math

import pytest
import torch

from helpers import small_model
from omnilm.objectives.logprobs import sequence_logprobs
from omnilm.objectives.preference import bradley_terry_loss, dpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def _loop_logprob(model, ids: list[int], response_start: int) -> float:
    """log π(response | prompt) for one unpadded sequence: a Python loop over the full log-softmax."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).double()[0], dim=-1)
    return sum(log_probs[t - 1, ids[t]].item() for t in range(response_start, len(ids)))


def test_dpo_on_a_real_model_matches_plain_python():
    policy, reference = small_model("llama", seed=0), small_model("llama", seed=1)
    prompts = [[5, 17, 42], [7, 99, 3]]
    chosen = [[11, 12, 13, 14], [200, 201]]
    rejected = [[21, 22], [250, 251, 252, 253]]
    beta = 0.1

    def batch(responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Right-padded to a common length; the response mask marks the response tokens.
        rows = [p + r for p, r in zip(prompts, responses, strict=True)]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        loss_mask = torch.zeros_like(ids)
        for b, (p, row) in enumerate(zip(prompts, rows, strict=True)):
            ids[b, :len(row)] = torch.tensor(row)
            attention[b, :len(row)] = 1
            loss_mask[b, len(p):len(row)] = 1
        return ids, attention, loss_mask

    with torch.no_grad():
        pc, pr, rc, rr = (sequence_logprobs(model, *batch(resp))
                          for model in (policy, reference) for resp in (chosen, rejected))
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta)

    expected_losses, chosen_rewards, rejected_rewards = [], [], []
    for b, prompt in enumerate(prompts):
        lp = {(name, side): _loop_logprob(model, prompt + resp[b], len(prompt))
              for name, model in (("pi", policy), ("ref", reference))
              for side, resp in (("w", chosen), ("l", rejected))}
        assert pc[b].item() == pytest.approx(lp["pi", "w"], abs=1e-4)
        assert rr[b].item() == pytest.approx(lp["ref", "l"], abs=1e-4)
        h = (lp["pi", "w"] - lp["ref", "w"]) - (lp["pi", "l"] - lp["ref", "l"])
        expected_losses.append(-_log_sigmoid(beta * h))
        chosen_rewards.append(beta * (lp["pi", "w"] - lp["ref", "w"]))
        rejected_rewards.append(beta * (lp["pi", "l"] - lp["ref", "l"]))
    assert loss.item() == pytest.approx(sum(expected_losses) / 2, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen_rewards) / 2, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected_rewards) / 2, abs=1e-6)
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)]
    assert metrics["rewards/margin"] == pytest.approx(sum(margins) / 2, abs=1e-6)
    assert metrics["rewards/accuracy"] == sum(m > 0 for m in margins) / 2


def test_dpo_hand_values_label_smoothing_and_gradient():
    pc = torch.tensor([-10.0, -4.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-12.0, -3.0]), torch.tensor([-11.0, -4.5]), torch.tensor([-11.0, -3.0])
    # h = (pc − rc) − (pr − rr) = [1 − (−1), 0.5 − 0] = [2, 0.5]; β = 0.5 → βh = [1, 0.25]
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(-(_log_sigmoid(1.0) + _log_sigmoid(0.25)) / 2, abs=1e-7)
    assert metrics["rewards/chosen"] == pytest.approx((0.5 + 0.25) / 2)
    assert metrics["rewards/rejected"] == pytest.approx((-0.5 + 0.0) / 2)
    assert metrics["rewards/accuracy"] == 1.0
    loss.backward()
    # ∂/∂pc of −log σ(βh)/B = −β·σ(−βh)/B: raising the chosen log-prob lowers the loss.
    expected_grad = [-0.5 / (1 + math.exp(x)) / 2 for x in (1.0, 0.25)]
    assert pc.grad.tolist() == pytest.approx(expected_grad, abs=1e-7)

    eps = 0.2
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=eps)
    expected = sum(-(1 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x) for x in (1.0, 0.25)) / 2
    assert smoothed.item() == pytest.approx(expected, abs=1e-7)


def test_ipo_is_squared_distance_to_half_inverse_beta():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    rc, rr = torch.tensor([-1.2, -2.0]), torch.tensor([-1.2, -1.5])
    beta = 0.25  # target margin 1/(2β) = 2
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    h = [(-1.0 + 1.2) - (-1.5 + 1.2), (-2.0 + 2.0) - (-1.0 + 1.5)]  # [0.5, −0.5]
    assert loss.item() == pytest.approx(((h[0] - 2) ** 2 + (h[1] - 2) ** 2) / 2, abs=1e-6)
    at_target, _ = dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                            beta=beta, loss_type="ipo")
    assert at_target.item() == 0.0


def test_dpo_rejects_bad_arguments():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)


def test_bradley_terry_loss_and_metrics():
    rw = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rl = torch.tensor([1.0, 0.5, -3.0])
    loss, metrics = bradley_terry_loss(rw, rl)
    margins = [1.0, -0.5, 2.0]
    assert loss.item() == pytest.approx(-sum(_log_sigmoid(m) for m in margins) / 3, abs=1e-7)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["margin"] == pytest.approx(2.5 / 3)
    loss.backward()
    assert rw.grad.tolist() == pytest.approx([-1 / (1 + math.exp(m)) / 3 for m in margins], abs=1e-7)
