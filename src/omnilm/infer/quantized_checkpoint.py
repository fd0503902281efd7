"""Model folders holding quantized linear layers.

The folder is an ordinary omnilm model folder (config.json, safetensors, tokenizer) whose config.json adds
``quantization_config = {"quant_method": "omnilm", "bits", "group_size", "modules"}`` (``modules``: omnilm
module paths). Unquantized tensors keep their Hugging Face names and layouts; each quantized layer is stored as
``<HF module path>.qweight`` and ``.scales`` in ``QuantizedLinear``'s (out, in) layout (its bias, if any, under
the usual HF bias name). GPT-2's q/k/v projections, fused into ``c_attn`` in Hugging Face's layout, keep their
own paths (``transformer.h.<i>.attn.q_proj``). ``omnilm.model.hf.load_pretrained`` reads these folders; the
transformers library does not (its own quantization formats differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.adapters.naming import hf_module_name
from omnilm.infer.quantize import SUPPORTED_BITS, replace_linears
from omnilm.model.hf import DEFAULT_MAX_SHARD_BYTES, CheckpointError, save_pretrained
from omnilm.model.transformer import Transformer

QUANT_METHOD = "omnilm"
QUANT_TENSORS = ("qweight", "scales")


def quantized_tensor_prefix(family: str, name: str) -> str:
    """Where the tensors of quantized module ``name`` are stored (its Hugging Face path where it has one)."""
    hf = hf_module_name(family, name)
    if hf is not None:
        return hf
    _, layer, rest = name.split(".", 2)  # blocks.<i>.attn.q_proj
    return f"transformer.h.{layer}.{rest}"


def _check_gpt2_fused(model: Transformer, modules: list[str]) -> None:
    if model.config.family != "gpt2":
        return
    chosen = set(modules)
    for i in range(model.config.n_layer):
        qkv = [f"blocks.{i}.attn.{p}_proj" for p in "qkv"]
        if 0 < sum(n in chosen for n in qkv) < 3:
            raise ValueError(f"gpt2 stores q/k/v fused in c_attn: quantize all of {qkv} or none of them")


def save_quantized(model: Transformer, folder: str | Path, tokenizer: Any = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a model quantized by ``quantize_model`` (and its tokenizer) as a model folder (atomic writes)."""
    qconfig = getattr(model, "quantization", None)
    if not qconfig:
        raise ValueError("the model is not quantized; call omnilm.infer.quantize.quantize_model first")
    modules = dict(model.named_modules())
    _check_gpt2_fused(model, qconfig["modules"])
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, torch.Tensor] = {}
    for name in qconfig["modules"]:
        layer = modules[name]
        # A shape-only placeholder lets save_pretrained lay out the remaining weights; it is not written.
        state[f"{name}.weight"] = torch.empty(layer.out_features, layer.in_features, device="meta")
        prefix = quantized_tensor_prefix(model.config.family, name)
        quantized |= {f"{prefix}.{t}": getattr(layer, t) for t in QUANT_TENSORS}
    for key, tensor in model.state_dict().items():
        module, _, suffix = key.rpartition(".")
        if not (module in qconfig["modules"] and suffix in QUANT_TENSORS):
            state[key] = tensor
    return save_pretrained(model, folder, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, state=state,
                           extra_tensors=quantized, config_updates={"quantization_config": dict(qconfig)})


def prepare_quantized(model: Transformer, qconfig: dict[str, Any], tensors: dict[str, torch.Tensor],
                      source: str) -> dict[str, torch.Tensor]:
    """Swap empty ``QuantizedLinear`` layers into ``model`` (a meta-device skeleton) as ``qconfig`` says.

    Takes the quantized tensors out of ``tensors`` (Hugging Face names) and returns them under omnilm's names,
    for ``load_pretrained`` to load along with the rest.
    """
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method != QUANT_METHOD:
        raise CheckpointError(f"{source}: unsupported quantization_config quant_method {method!r}; omnilm reads "
                              f"only its own {QUANT_METHOD!r} format")
    bits, group_size, names = qconfig.get("bits"), qconfig.get("group_size") or 0, qconfig.get("modules")
    if bits not in SUPPORTED_BITS or not isinstance(names, list):
        raise CheckpointError(f"{source}: quantization_config needs bits in {SUPPORTED_BITS} and a modules list")
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(names) - linears)
    if unknown:
        raise CheckpointError(f"{source}: quantization_config names module(s) that are no linear layer of this "
                              f"model: {unknown}")
    try:
        replace_linears(model, names, bits, group_size, quantize=False)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err
    quantized, missing = {}, []
    for name in names:
        prefix = quantized_tensor_prefix(model.config.family, name)
        for suffix in QUANT_TENSORS:
            if f"{prefix}.{suffix}" in tensors:
                quantized[f"{name}.{suffix}"] = tensors.pop(f"{prefix}.{suffix}")
            else:
                missing.append(f"{prefix}.{suffix}")
    if missing:
        raise CheckpointError(f"{source}: missing quantized tensor(s) {missing}")
    return quantized


def safetensors_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) of a model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))

