"""Model growth: a trained model made deeper (depth up-scaling) or wider, optionally preserving its function.

Depth: the new layer stack is a sequence of copies of the old layers.
- ``interleave``: every layer followed by its copy (0, 0', 1, 1', ...).
- ``stack``: the stack twice, minus ``overlap`` layers at the seam (SOLAR's depth up-scaling: layers
  [0, n - m) then [m, n)).
With ``preserve`` every repeated occurrence of a layer gets zero output projections (attention o_proj and the
MLP's down projections): the block then adds nothing to the residual stream, so the grown model computes
exactly the old function, and training moves the zeros away (their gradients are not zero).

Width (llama/qwen2; gpt2 only grows ``d_ff``, LayerNorm's mean would change with ``d_model``): new residual
dimensions and new MLP hidden units start at zero and stay zero through the network at first, because every
tensor that writes them (embedding columns, o_proj / down_proj rows, down_proj columns of new hidden units)
is zero, while the tensors that read them start random so they can learn. RMSNorm averages over the width,
so with D → D' its weights are multiplied by sqrt(D/D') and its epsilon by D/D': the normalised values of the
old dimensions are then exactly the old ones. The head dimension is kept (the new config states it).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Literal

import torch

from omnilm.errors import UserError
from omnilm.model.transformer import Transformer

DepthMode = Literal["interleave", "stack"]
#: Parameters that write into the residual stream (zeroed in a preserved copy; their new parts zero in width
#: growth): attention and MLP output projections (biases too), MoE experts' and shared experts' down projections.
WRITERS = re.compile(r"(o_proj|down_proj)(\.weight|\.bias)?$")


def depth_order(n_layer: int, mode: DepthMode, overlap: int = 0) -> list[int]:
    """The old layer each new layer copies."""
    if mode == "interleave":
        if overlap:
            raise UserError("overlap applies to the stack mode only")
        return [i for i in range(n_layer) for _ in range(2)]
    if mode == "stack":
        if not 0 <= overlap < n_layer:
            raise UserError(f"overlap {overlap} must be in 0..{n_layer - 1}")
        return list(range(n_layer - overlap)) + list(range(overlap, n_layer))
    raise UserError(f"unknown depth mode {mode!r}; expected interleave or stack")


@torch.no_grad()
def grow_depth(model: Transformer, mode: DepthMode = "interleave", overlap: int = 0,
               preserve: bool = True) -> Transformer:
    """A deeper copy of ``model`` (see the module docstring); with ``preserve`` the same logits."""
    order = depth_order(model.config.n_layer, mode, overlap)
    config = replace(model.config, n_layer=len(order),
                     dense_layers=tuple(j for j, i in enumerate(order) if i in model.config.dense_layers))
    if config.n_experts and config.moe_every != 1:
        raise UserError("depth growth of an MoE model needs every layer's kind to be kept: use moe_every 1 "
                        "(dense_layers are carried over)")
    old = model.state_dict()
    state = {k: v.clone() for k, v in old.items() if not k.startswith("blocks.")}
    seen: set[int] = set()
    for j, i in enumerate(order):
        repeated = i in seen
        seen.add(i)
        prefix = f"blocks.{i}."
        for name, tensor in old.items():
            if name.startswith(prefix):
                new = tensor.clone()
                if preserve and repeated and WRITERS.search(name):
                    new.zero_()
                state[f"blocks.{j}." + name[len(prefix):]] = new
    grown = Transformer(config).to(model.tok_emb.weight.dtype)
    grown.load_state_dict(state)
    return grown.eval()


@torch.no_grad()
def grow_width(model: Transformer, d_model: int | None = None, d_ff: int | None = None,
               seed: int = 0) -> Transformer:
    """A wider copy of ``model`` with the same logits (see the module docstring)."""
    config = model.config
    d_model, d_ff = d_model or config.d_model, d_ff or config.ff_dim
    if d_model < config.d_model or d_ff < config.ff_dim:
        raise UserError(f"width growth cannot shrink: d_model {config.d_model} -> {d_model}, "
                        f"d_ff {config.ff_dim} -> {d_ff}")
    if d_model != config.d_model and config.family == "gpt2":
        raise UserError("gpt2 (LayerNorm) can only grow d_ff function-preservingly, not d_model")
    if config.n_experts and d_ff != config.ff_dim:
        raise UserError("an MoE model grows d_model only (its experts have their own width)")
    ratio = config.d_model / d_model
    new_config = replace(config, d_model=d_model, d_ff=d_ff, head_dim=config.dim_per_head,
                         norm_eps=config.norm_eps * ratio)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        grown = Transformer(new_config).to(model.tok_emb.weight.dtype)
    state = grown.state_dict()
    for name, old in model.state_dict().items():
        new = state[name]
        writer = WRITERS.search(name) is not None or name in ("tok_emb.weight", "pos_emb.weight")
        if writer:
            new.zero_()
        corner = tuple(slice(0, n) for n in old.shape)
        if config.family != "gpt2" and name.endswith(("norm1.weight", "norm2.weight", "norm_f.weight")):
            new.fill_(math.sqrt(ratio))
            old = old * math.sqrt(ratio)
        new[corner] = old
    grown.load_state_dict(state)
    if new_config.tie_embeddings:
        grown.lm_head.weight = grown.tok_emb.weight
    return grown.eval()

