"""The native int8/int4 linear kernels against the dequantising reference (``QuantizedLinear.reference_forward``).

Two properties, over hypothesis-drawn shapes (odd widths leave vector tails; 1..9 rows cover every tile size):
exact agreement when every product and partial sum is an integer a float32 holds exactly (integer activations,
power-of-two scales), and float32-rounding agreement (1e-5 of the output scale) on real weights and activations.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.infer import quantize
from omnilm.infer.quantize import KERNEL_MAX_ROWS, QuantizedLinear, quantize_weight
from omnilm.kernels import qlinear

kernels = qlinear()
pytestmark = pytest.mark.skipif(kernels is None, reason="native kernels could not be built here")


def _layer(in_features: int, out_features: int, bits: int, group_size: int, seed: int) -> QuantizedLinear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    return QuantizedLinear.from_linear(linear, bits, group_size)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), in_features=st.integers(1, 300), out_features=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_int8_integer_accumulation_is_exact(rows: int, in_features: int, out_features: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    scales = 2.0 ** torch.randint(-3, 3, (out_features,), generator=generator).float()
    x = torch.randint(-8, 9, (rows, in_features), generator=generator).float()
    expected = (x.double() @ codes.double().T) * scales.double()
    assert torch.equal(kernels.int8_linear(x, codes, scales).double(), expected)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), blocks=st.integers(1, 5), out_features=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_int8_with_int8_activations_accumulates_exactly(rows: int, blocks: int, out_features: int, seed: int) -> None:
    """Integer activations whose blocks each reach 127 are their own int8 codes (scale 1): the result is exact."""
    generator = torch.Generator().manual_seed(seed)
    in_features = blocks * quantize.Q8_BLOCK
    codes = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    scales = 2.0 ** torch.randint(-3, 3, (out_features,), generator=generator).float()
    x = torch.randint(-127, 128, (rows, blocks, quantize.Q8_BLOCK), generator=generator).float()
    x[:, :, 0] = -127.0
    x = x.view(rows, in_features)
    expected = (x.double() @ codes.double().T) * scales.double()
    assert torch.equal(kernels.int8_q8_linear(x, codes, scales).double(), expected)


@pytest.mark.parametrize("kernel", ["int4_linear", "int4_q8_linear"])
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 5), group_size=st.sampled_from([2, 8, 32, 64, 128, 256]),
       out_features=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_int4_integer_accumulation_is_exact(kernel: str, rows: int, groups: int, group_size: int, out_features: int,
                                            seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    in_features = groups * group_size
    nibbles = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    scales = 2.0 ** torch.randint(-3, 3, (out_features, groups), generator=generator).float()
    # Integer activations whose groups each reach 127: int4_q8_linear's activation scale is then 1 and its codes
    # are x itself, so both kernels must give the exact integer result.
    x = torch.randint(-127, 128, (rows, groups, group_size), generator=generator).float()
    x[:, :, 0] = 127.0
    x = x.view(rows, in_features)
    weight = (nibbles.double() - 8).view(out_features, groups, group_size) * scales.double()[..., None]
    expected = x.double() @ weight.view(out_features, in_features).T
    assert torch.equal(getattr(kernels, kernel)(x, packed, scales).double(), expected)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, KERNEL_MAX_ROWS), groups=st.integers(1, 4),
       group_size=st.sampled_from([32, 64, 128]), out_features=st.integers(1, 96), seed=st.integers(0, 2**16))
def test_quantized_linear_matches_the_reference_path(bits: int, rows: int, groups: int, group_size: int,
                                                     out_features: int, seed: int) -> None:
    # An int8 layer of odd width takes the float-activation kernel, a multiple of 64 the int8-activation one.
    odd = bits == 8 and seed % 2 == 0
    layer = _layer(groups * group_size + (3 if odd else 0), out_features, bits, group_size, seed)
    x = torch.randn(1, rows, layer.in_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fast, reference = layer(x), layer.reference_forward(x)
    assert fast.shape == reference.shape == (1, rows, out_features)
    if quantize.INT8_ACTIVATIONS and kernels.integer_dot_products():
        # activations rounded to int8 per weight group (int4) or per block of 64 features (int8) first
        block = group_size if bits == 4 else quantize.Q8_BLOCK
        if layer.in_features % block == 0:
            reference = layer.reference_forward(_quantize_groups(x[0], block))[None]
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5 * reference.abs().max().item() + 1e-7)


def test_large_batches_gradients_and_other_dtypes_take_the_reference_path() -> None:
    layer = _layer(64, 32, 8, 32, seed=0)
    for x in (torch.randn(KERNEL_MAX_ROWS + 1, 64), torch.randn(2, 64, dtype=torch.float64),
              torch.randn(2, 64, requires_grad=True)):
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=0, atol=0)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_kernels_read_the_layout_quantize_weight_writes() -> None:
    torch.manual_seed(1)
    weight, x = torch.randn(48, 256), torch.randn(4, 256)
    for bits in (8, 4):
        packed = quantize_weight(weight, bits, group_size=64)
        run = kernels.int8_linear if bits == 8 else kernels.int4_linear
        relative = ((run(x, packed["qweight"], packed["scales"]) - x @ weight.T).norm() / (x @ weight.T).norm())
        assert relative < (0.01 if bits == 8 else 0.15)  # quantization error only, of the expected size


def test_bad_inputs_are_refused() -> None:
    codes, scales = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.int8_linear(torch.zeros(2, 9), codes, scales)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.int8_linear(torch.zeros(2, 8, dtype=torch.float64), codes, scales)
    with pytest.raises(RuntimeError, match="divisible by 64"):
        kernels.int8_q8_linear(torch.zeros(2, 8), codes, scales)


def _quantize_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x with each group of ``group_size`` features rounded to int8 codes of scale absmax / 127 (brute force)."""
    groups = x.view(x.shape[0], -1, group_size)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(groups / scale) * scale).view_as(x)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]),
       out_features=st.integers(1, 96), seed=st.integers(0, 2**16))
def test_int8_activation_kernels_equal_quantizing_x_first(rows: int, groups: int, group_size: int,
                                                          out_features: int, seed: int) -> None:
    for bits, kernel, block in ((4, kernels.int4_q8_linear, group_size), (8, kernels.int8_q8_linear, 64)):
        if (groups * group_size) % block:
            continue
        layer = _layer(groups * group_size, out_features, bits, group_size, seed)
        x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(seed))
        fast = kernel(x, layer.qweight, layer.scales)
        reference = _quantize_groups(x, block) @ layer.dequantized_weight().T
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5 * reference.abs().max().item() + 1e-7)
