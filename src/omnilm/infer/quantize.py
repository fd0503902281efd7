"""Weight-only quantization of linear layers, dequantised on the fly.

Two schemes, both symmetric (no zero point) and both round-to-nearest:

- **int8 per output channel**: each row of the ``(out, in)`` weight has one scale ``absmax / 127``; codes are
  int8 in ``[-127, 127]``.
- **int4 group-wise**: each row is cut into groups of ``group_size`` consecutive input features, each group
  has its own scale ``absmax / 7``; codes in ``[-7, 7]`` are stored offset by 8 as unsigned nibbles, two per
  uint8 byte (even column in the low nibble), so the weights take 4 bits each plus one scale per group.

Scales are kept in float32: at group size 128 that is 0.25 extra bits per weight, and it avoids float16
underflow for near-zero groups. Only the weights are stored quantized; the CPU decoding kernels round the
activations to int8 on the fly where the processor has integer dot products (see ``INT8_ACTIVATIONS``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.adapters.naming import matches_target
from omnilm.kernels import qlinear as qlinear_kernels

SUPPORTED_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
_QMAX = {8: 127, 4: 7}
#: Up to this many rows of activations (tokens in the batch), a CPU float32 forward uses the native kernels
#: (``omnilm.kernels``), which read each weight byte once; beyond it the work is compute-bound and dequantising
#: once for a BLAS matmul is faster.
KERNEL_MAX_ROWS = 16
#: In the kernels, quantize the activations to int8 too (per int4 weight group; per block of 64 features for int8
#: weights) and take integer dot products, as llama.cpp pairs q4/q8 weights with q8 activations: faster than
#: widening the codes to float, at under 1 % relative error on a layer's output. Only where the kernels have integer
#: dot products (AVX512-VNNI); ``OMNILM_KERNEL_ACTIVATIONS=float`` keeps float activations everywhere.
INT8_ACTIVATIONS = os.environ.get("OMNILM_KERNEL_ACTIVATIONS", "int8") != "float"
#: Features per activation block of the int8 x int8 kernel (``int8_q8_linear`` in qlinear.cpp).
Q8_BLOCK = 64


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported quantization width {bits} bits; choose one of {SUPPORTED_BITS}")


def _check_group(in_features: int, group_size: int, where: str = "") -> None:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"int4 group size must be a positive even number, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the {in_features} input features"
                         f"{' of ' + where if where else ''}; choose a group size that divides it "
                         f"(one of {GROUP_SIZES})")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (values 0..15, last dim even) two per uint8: even index in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The uint8 codes (0..15) packed by ``pack_int4``; the last dim doubles."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _scales(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    # An all-zero row/group would divide by zero; any positive scale reproduces it exactly.
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 128) -> dict[str, torch.Tensor]:
    """Quantize an ``(out, in)`` weight: ``{"qweight", "scales"}`` as stored by ``QuantizedLinear``.

    int8: ``qweight`` int8 ``(out, in)``, ``scales`` ``(out,)``. int4: ``qweight`` uint8 ``(out, in / 2)``,
    ``scales`` ``(out, in / group_size)``.
    """
    _check_bits(bits)
    w = weight.detach().float()
    qmax = _QMAX[bits]
    if bits == 8:
        scales = _scales(w.abs().amax(dim=1), qmax)
        codes = torch.round(w / scales[:, None]).clamp(-qmax, qmax)
        return {"qweight": codes.to(torch.int8), "scales": scales}
    out_features, in_features = w.shape
    _check_group(in_features, group_size)
    groups = w.view(out_features, in_features // group_size, group_size)
    scales = _scales(groups.abs().amax(dim=2), qmax)
    codes = torch.round(groups / scales[..., None]).clamp(-qmax, qmax) + 8
    return {"qweight": pack_int4(codes.view(out_features, in_features)), "scales": scales}


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 ``(out, in)`` weight that ``quantize_weight``'s tensors stand for."""
    if bits == 8:
        return qweight.float() * scales[:, None].float()
    codes = unpack_int4(qweight).float() - 8
    out_features, n_groups = scales.shape
    groups = codes.view(out_features, n_groups, -1) * scales[..., None].float()
    return groups.view(out_features, -1)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized (see the module docstring).

    Small float32 CPU batches (decoding) run the native kernels of ``omnilm.kernels``, which widen the codes in
    registers. Everything else takes ``reference_forward``: the weight is dequantised for one matmul in the
    activation's dtype and not cached, so memory holds only the packed codes.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 bias: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_bits(bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else None
        if bits == 8:
            qshape, sshape, qdtype = (out_features, in_features), (out_features,), torch.int8
        else:
            _check_group(in_features, group_size)
            qshape, sshape, qdtype = (out_features, in_features // 2), (out_features, in_features // group_size), \
                torch.uint8
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(sshape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> QuantizedLinear:
        """A quantized copy of ``linear`` (on its device; the bias is kept as it is)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
                    device=weight.device)
        packed = quantize_weight(weight, bits, group_size)
        layer.qweight.copy_(packed["qweight"])
        layer.scales.copy_(packed["scales"])
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight (out, in) these codes stand for."""
        return dequantize_weight(self.qweight, self.scales, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding calls this dozens of times a token: the checks are ordered cheapest first, and the kernel is
        # chosen once per layer (``_kernel``), since a tiny product costs only a few microseconds.
        if x.dtype == torch.float32 and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            rows = x.numel() // self.in_features if self.in_features else 0
            kernel = self._kernel()
            if kernel is not None and 0 < rows <= KERNEL_MAX_ROWS:
                y = kernel(x.reshape(rows, self.in_features), self.qweight, self.scales)
                if self.bias is not None:
                    y += self.bias
                return y.view(*x.shape[:-1], self.out_features)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantise the whole weight, then one matmul: any dtype, device, batch, and differentiable in x."""
        weight = self.dequantized_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"

    def _kernel(self) -> Callable[..., torch.Tensor] | None:
        """The native kernel for this layer's codes (None without kernels), resolved on first use."""
        if not hasattr(self, "_kernel_fn"):
            self._kernel_fn = select_kernel(qlinear_kernels(), self.bits, self.in_features)
        return self._kernel_fn


def select_kernel(kernels: ModuleType | None, bits: int, in_features: int) -> Callable[..., torch.Tensor] | None:
    """The kernel for ``bits``-bit codes: integer dot products with int8 activations where the build has them
    (VNNI; int8 codes also need rows of whole 64-feature blocks), else float activations."""
    if kernels is None:
        return None
    integer_dots = INT8_ACTIVATIONS and kernels.integer_dot_products()  # without VNNI it would be scalar code
    if bits == 8:
        return kernels.int8_q8_linear if integer_dots and in_features % Q8_BLOCK == 0 else kernels.int8_linear
    return kernels.int4_q8_linear if integer_dots else kernels.int4_linear




def quantizable_linears(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> list[str]:
    """Names of the ``nn.Linear`` modules ``quantize_model`` replaces: all but ``skip``.

    ``skip`` entries match a module path or a dot-separated suffix of it. A head tied to the embedding may be
    quantized too (``skip=()``): it then becomes a quantized copy, and the embedding keeps its full-precision
    table for lookups (more memory, but the head is the largest matrix a decode step reads).
    """
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(matches_target(name, s) for s in skip)]


def replace_linears(model: nn.Module, names: Sequence[str], bits: int, group_size: int,
                    quantize: bool = True) -> nn.Module:
    """Swap the named ``nn.Linear`` modules for ``QuantizedLinear`` (quantized from them, or empty shells
    of the same shape when ``quantize`` is False, to be filled from a checkpoint). Records
    ``model.quantization``."""
    modules = dict(model.named_modules())
    for name in names:  # validate everything before changing anything
        linear = modules[name]
        if bits == 4:
            _check_group(linear.in_features, group_size, where=name)
    for name in names:
        linear = modules[name]
        if quantize:
            layer = QuantizedLinear.from_linear(linear, bits, group_size)
        else:
            layer = QuantizedLinear(linear.in_features, linear.out_features, bits, group_size,
                                    bias=linear.bias is not None, device=linear.weight.device)
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, layer)
    model.quantization = {"quant_method": "omnilm", "bits": bits, "group_size": group_size if bits == 4 else None,
                          "modules": list(names)}
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int = 128,
                   skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Quantize ``model``'s linear layers in place (weights only) and return it.

    Embeddings are never quantized (they are lookups, not matmuls), and the LM head is skipped by default: it
    is the layer whose error reaches the logits most directly. ``skip=()`` quantizes it as well (a tied head
    becomes a quantized copy of the embedding): for decoding speed, since in small models it is the largest
    matrix read per token.
    ``group_size`` applies to int4 and must divide every quantized layer's input features.
    """
    _check_bits(bits)
    if getattr(model, "quantization", None):
        raise ValueError("the model is already quantized")
    return replace_linears(model, quantizable_linears(model, skip), bits, group_size)
