"""Sparse upcycling: turn a dense llama/qwen2 checkpoint into a mixture-of-experts one that computes the same
function on its first forward (Komatsuzaki et al. 2023; fine-grained variant as in He et al. 2024).

With granularity G the dense SwiGLU's hidden units are split into G slices (shards) of d_ff / G units; the sum
of the shards' outputs is the dense output. The E routed experts are R = E / G replicas of the G shards: expert
e = r·G + g holds shard g, and its down projection is multiplied by G. The router row of expert e is the random
row of its replica r, shared by the G shards of that replica; the k = m·G best scores are therefore always m
whole replicas (ties inside a replica, none across), and with the top-k scores renormalised each replica
weighs s_r / (G·Σ s) per shard, so the output is Σ_r s_r/Σ s · dense(x) = dense(x) exactly. G = 1 gives plain
copies. Renormalisation of the top-k scores is required (Mixtral always does it).

A qwen2 model becomes a Qwen2-MoE, which always has a gated shared expert: it is added with a zero down
projection (it contributes nothing until trained), so the folder still loads in transformers.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from omnilm.errors import UserError
from omnilm.model.config import ModelConfig
from omnilm.model.transformer import Transformer


def upcycle_config(config: ModelConfig, n_experts: int, top_k: int, granularity: int = 1) -> ModelConfig:
    """The MoE config an upcycled ``config`` gets (every layer an MoE layer)."""
    if config.family == "gpt2":
        raise UserError("upcycling needs a SwiGLU model (llama or qwen2), not gpt2")
    if config.n_experts:
        raise UserError("the model already is a mixture of experts")
    g = granularity
    if g < 1 or config.ff_dim % g:
        raise UserError(f"granularity {g} must be ≥ 1 and divide the MLP width {config.ff_dim}")
    if n_experts < g or n_experts % g:
        raise UserError(f"--experts {n_experts} must be a multiple of the granularity {g}")
    if top_k < 1 or top_k % g or top_k > n_experts:
        raise UserError(f"--top-k {top_k} must be a multiple of the granularity {g} and at most --experts")
    shared = dict(n_shared_experts=1, shared_expert_gate=True) if config.family == "qwen2" else {}
    return replace(config, n_experts=n_experts, n_experts_per_tok=top_k, moe_d_ff=config.ff_dim // g,
                   router_gate="softmax", norm_topk_prob=True, moe_every=1, dense_layers=(), **shared)


@torch.no_grad()
def upcycle(model: Transformer, n_experts: int, top_k: int, granularity: int = 1, seed: int = 0) -> Transformer:
    """An MoE copy of the dense ``model`` whose logits equal the dense model's (see the module docstring)."""
    config = upcycle_config(model.config, n_experts, top_k, granularity)
    g, replicas = granularity, n_experts // granularity
    with torch.random.fork_rng():  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        sparse = Transformer(config).to(model.tok_emb.weight.dtype)
        routers = torch.randn(config.n_layer, replicas, config.d_model) * config.init_std
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i in range(config.n_layer):
        dense = f"blocks.{i}.mlp."
        gate, up, down = (model.state_dict()[f"{dense}{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
        state[f"{dense}experts.gate_proj"] = _experts(gate, 0, g, replicas)  # (E, width, D)
        state[f"{dense}experts.up_proj"] = _experts(up, 0, g, replicas)
        state[f"{dense}experts.down_proj"] = _experts(down, 1, g, replicas) * g  # (E, D, width)
        state[f"{dense}router.weight"] = routers[i].repeat_interleave(g, dim=0).to(gate.dtype)
        if config.n_shared_experts:
            shared = sparse.blocks[i].mlp.shared
            state[f"{dense}shared.gate_proj.weight"] = shared.gate_proj.weight
            state[f"{dense}shared.up_proj.weight"] = shared.up_proj.weight
            state[f"{dense}shared.down_proj.weight"] = torch.zeros_like(shared.down_proj.weight)
            state[f"{dense}shared_gate.weight"] = sparse.blocks[i].mlp.shared_gate.weight
    sparse.load_state_dict(state)
    return sparse.eval()


def _experts(weight: torch.Tensor, dim: int, granularity: int, replicas: int) -> torch.Tensor:
    """A dense projection split into ``granularity`` shards along its hidden dimension ``dim``, stacked and
    repeated ``replicas`` times: expert e = r·G + s holds shard s (hidden units [s·w, (s+1)·w))."""
    return torch.stack(weight.chunk(granularity, dim=dim)).repeat(replicas, 1, 1)
