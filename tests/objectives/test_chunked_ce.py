"""Chunked linear cross-entropy against the plain path (full logits + F.cross_entropy), and the decoder's memory
options (chunked loss, activation checkpointing) against its plain forward."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import small_model
from omnilm.objectives.chunked_ce import IGNORE_INDEX, linear_cross_entropy
from omnilm.objectives.lm import causal_lm_loss, masked_lm_loss

REL = 1e-6
ULPS = 4  # the roundings in a row on the way to one gradient entry: exp, sum, divide, subtract


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    """Relative error ‖actual − expected‖ / ‖expected‖ within ``rel`` (float32 rounding, summed in another
    order, is ~1e-7 of it)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = relative_error(actual, expected)
    assert error <= rel, f"relative error {error:.3g}"


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 48), d=st.integers(1, 24), vocab=st.integers(2, 70), chunk=st.integers(1, 60),
       ignored=st.floats(0.0, 0.9), reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2**16))
@example(tokens=1, d=21, vocab=2, chunk=1, ignored=0.0, reduction="mean", seed=1219)  # a confident, tiny loss
@example(tokens=1, d=1, vocab=31, chunk=1, ignored=0.0, reduction="mean", seed=240)  # a cancelling gradient
def test_chunked_loss_and_gradients_equal_the_plain_path(tokens, d, vocab, chunk, ignored, reduction, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, d, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[torch.rand(tokens, generator=generator) < ignored] = IGNORE_INDEX
    targets[0] = 0  # one scored target at least: with none the mean is NaN on both paths
    upstream = 0.37  # a loss scaled afterwards (accumulation, weights) scales the gradients
    ours = linear_cross_entropy(hidden, weight, targets, chunk, reduction)
    ours_grads = torch.autograd.grad(ours * upstream, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    plain_grads = torch.autograd.grad(plain * upstream, (hidden, weight))
    exact_inputs = (hidden.double(), weight.double())
    exact = F.cross_entropy(exact_inputs[0] @ exact_inputs[1].T, targets, ignore_index=IGNORE_INDEX,
                            reduction=reduction)
    exact_grads = torch.autograd.grad(exact * upstream, exact_inputs)
    # ours is no farther from the float64 truth than the plain path, plus 1e-6 of the truth, plus a few float32
    # ulps of the magnitudes summed (where a result is a difference of near-equal terms, as the gradient of a
    # confident prediction, softmax − 1, or of a 1-wide hidden state, that floor is far above the result and
    # no float32 path can do better; which path rounds luckier then is chance: the plain path was seen 3×
    # closer on one input and ours 10× on another, with a median ratio of 1.0 over 400 confident inputs).
    scales = rounding_scales(*(x.detach() for x in exact_inputs), targets, reduction, upstream)
    for a, b, c, scale in zip((ours, *ours_grads), (plain, *plain_grads), (exact, *exact_grads), scales,
                              strict=True):
        assert a.dtype == b.dtype == torch.float32
        c = c.detach()
        error, plain_error = (float((x.detach().double() - c).norm()) for x in (a, b))
        bound = REL * float(c.norm()) + plain_error + ULPS * torch.finfo(torch.float32).eps * float(scale.norm())
        assert error <= bound, (error, plain_error, bound)


def rounding_scales(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                    upstream: float) -> tuple[torch.Tensor, ...]:
    """The loss and its gradients computed on absolute values (float64): what float32 rounding is relative to."""
    valid = targets != IGNORE_INDEX
    logits = hidden @ weight.T
    safe = torch.where(valid, targets, 0)
    loss_terms = (logits.logsumexp(1).abs() + logits.gather(1, safe[:, None]).squeeze(1).abs()) * valid
    # softmax − one_hot is a subtraction: its rounding is relative to the operands, softmax + one_hot
    per_logit = (logits.softmax(1) + F.one_hot(safe, weight.shape[0]).double()) * valid[:, None]
    divisor = valid.sum() if reduction == "mean" else 1
    per_logit = per_logit * upstream / divisor
    return loss_terms.sum() / divisor, per_logit @ weight.abs(), per_logit.T @ hidden.abs()


def test_batched_hidden_states_and_no_grad():
    """(B, T, d) hidden states are flattened; under no_grad the loss is the same and no graph is built."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    targets[1, 2:] = IGNORE_INDEX
    plain = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 4)
    assert loss.grad_fn is None
    assert_close_rel(loss, plain.detach())
    all_ignored = torch.full((3, 5), IGNORE_INDEX)
    assert linear_cross_entropy(hidden, weight, all_ignored, 4).isnan()  # as F.cross_entropy's mean
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(hidden, weight, targets, 0)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, 4, "none")  # type: ignore[arg-type]


def test_second_backward_is_refused():
    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 3]), 2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters()], strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # llama: untied head; qwen2: tied to the embeddings
def test_decoder_loss_options_give_the_plain_loss_and_gradients(family):
    """Through the decoder and the pretraining/SFT objectives: the loss chunked over tokens and the blocks
    recomputed in backward give the loss and every parameter's gradient of the plain logits path."""
    model = small_model(family, dropout=0.0).train()
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (3, 13))
    mask = torch.ones_like(tokens)
    mask[0, :6] = 0
    mask[2, 9:] = 0
    targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    logits = model(tokens[:, :-1])
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    expected = grads_of(model, plain)
    for chunk, recompute in ((0, False), (5, False), (7, True), (0, True)):
        model.set_memory_options(chunk, recompute)
        loss, _ = masked_lm_loss(model, {"tokens": tokens, "loss_mask": mask})
        assert_close_rel(loss.detach(), plain.detach())
        # Deep in the network the rounding of the head's gradient compounds: 1e-5 there, 1e-6 at the head.
        for name, grad in grads_of(model, loss).items():
            assert_close_rel(grad, expected[name], REL if name == "lm_head.weight" else 1e-5)
    summed, _ = causal_lm_loss(model, tokens, reduction="sum")
    full = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    assert_close_rel(summed.detach(), full.detach())


def test_activation_checkpointing_keeps_dropout_and_router_losses():
    """Recomputed blocks replay the same dropout masks (RNG state restored) and an MoE's router losses."""
    model = small_model("llama", dropout=0.2, n_experts=4, n_experts_per_tok=2, d_ff=48).train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        model.set_memory_options(0, recompute)
        torch.manual_seed(5)
        loss, logs = causal_lm_loss(model, tokens)
        results.append((loss.detach(), logs, grads_of(model, loss)))
    (loss_a, logs_a, grads_a), (loss_b, logs_b, grads_b) = results
    assert "moe_z_loss" in logs_a and logs_a == pytest.approx(logs_b, rel=1e-6)
    assert_close_rel(loss_b, loss_a)
    for name, grad in grads_a.items():
        assert_close_rel(grads_b[name], grad, 1e-5)


@pytest.mark.slow
def test_compiled_decoder_with_chunked_loss_gives_the_eager_loss_and_gradients():
    """``train.compile`` and ``train.loss_chunk_tokens`` together: the compiled forward (inductor on CPU) gives
    the eager chunked loss and gradients."""
    model = small_model("qwen2", dropout=0.0).train()
    model.set_memory_options(8, True)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = tokens[:, 1:].clone()
    targets[0, :4] = IGNORE_INDEX
    eager = model(tokens[:, :-1], targets=targets)
    expected = grads_of(model, eager)
    compiled = torch.compile(model)
    loss = compiled(tokens[:, :-1], targets=targets)
    assert_close_rel(loss.detach(), eager.detach(), 1e-5)
    for name, grad in grads_of(model, loss).items():
        assert_close_rel(grad, expected[name], 1e-4)
