import math

import pytest
import torch

from omnilm.objectives.distill import distillation_loss


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(z / temperature) for z in row]
    total = sum(exps)
    return [e / total for e in exps]


def test_distillation_matches_explicit_sums_over_the_vocabulary():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5) * 2
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])
    tau, alpha = 2.0, 0.3
    loss, metrics = distillation_loss(student, teacher, labels, temperature=tau, alpha=alpha)

    kl_terms, ce_terms = [], []
    for b in range(2):
        for t in range(3):
            y = int(labels[b, t])
            if y == -100:
                continue
            p_t = _softmax(teacher[b, t].tolist(), tau)
            p_s = _softmax(student[b, t].tolist(), tau)
            kl_terms.append(sum(p * math.log(p / q) for p, q in zip(p_t, p_s, strict=True)))
            ce_terms.append(-math.log(_softmax(student[b, t].tolist(), 1.0)[y]))
    kl = sum(kl_terms) / len(kl_terms)
    ce = sum(ce_terms) / len(ce_terms)
    assert metrics["kl"] == pytest.approx(kl, abs=1e-6)
    assert metrics["ce"] == pytest.approx(ce, abs=1e-6)
    assert loss.item() == pytest.approx(alpha * tau ** 2 * kl + (1 - alpha) * ce, abs=1e-6)

    loss.backward()
    assert student.grad[0, 1].abs().sum().item() == 0.0  # ignored position gets no gradient


def test_identical_logits_give_zero_kl_and_teacher_gets_no_gradient():
    torch.manual_seed(1)
    student = torch.randn(1, 4, 6, requires_grad=True)
    teacher = student.detach().clone().requires_grad_(True)
    labels = torch.tensor([[0, 1, 2, 3]])
    loss, metrics = distillation_loss(student, teacher, labels, temperature=3.0, alpha=1.0)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    assert teacher.grad is None
    assert student.grad.abs().max().item() < 1e-6  # KL is at its minimum


def test_alpha_zero_is_plain_cross_entropy():
    torch.manual_seed(2)
    student, teacher = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    labels = torch.tensor([[3, 0, -100]])
    loss, _ = distillation_loss(student, teacher, labels, alpha=0.0)
    nll = [-math.log(_softmax(student[0, t].tolist(), 1.0)[y]) for t, y in ((0, 3), (1, 0))]
    assert loss.item() == pytest.approx(sum(nll) / 2, abs=1e-6)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.zeros(1, 2, 4), torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long))
