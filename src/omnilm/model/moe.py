"""Mixture-of-experts feed-forward: a top-k router over SwiGLU experts, optional shared experts, router losses.

Notation: N tokens (batch × time flattened), D model width, E routed experts, K experts per token, F expert width.

Each token's router logits (E) become scores by softmax (Mixtral, Qwen2-MoE) or sigmoid; its K best experts
run on it and their outputs are summed weighted by the scores (renormalised over the K when ``norm_topk_prob``).
Shared experts run on every token and are added, optionally scaled by a sigmoid gate (Qwen2-MoE).

Routing is dropless: no capacity limit, no token is dropped. The N·K (token, expert) assignments are sorted by
expert, so every expert processes one contiguous slice with one matmul per projection (a loop over experts, never
over tokens), and the outputs are scattered back with ``index_add``.

Each forward records its router statistics (``RouterStats``): the Switch load-balancing loss
E · Σ_i f_i · P_i (f_i share of assignments sent to expert i, P_i mean normalised score of expert i; 1 when
perfectly balanced), the router z-loss mean(logsumexp(logits)²) and the per-expert assignment counts.
``router_aux_loss`` adds them up over the layers with the config's coefficients for the training objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.model.config import ModelConfig


@dataclass
class RouterStats:
    """What one MoE layer's last forward measured."""

    #: Switch load-balancing loss E · Σ f_i P_i (differentiable through P).
    load_balance: torch.Tensor
    #: Router z-loss mean(logsumexp(logits)²).
    z_loss: torch.Tensor
    #: Assignments per expert (E,), detached.
    counts: torch.Tensor


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: gate_proj / up_proj (E, F, D), down_proj (E, D, F)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.gate_proj, std=std)
        nn.init.normal_(self.up_proj, std=std)
        nn.init.normal_(self.down_proj, std=residual_std)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), experts / weights (N, K) -> Σ_k weights[:, k] · expert_{experts[:, k]}(x)  (N, D)."""
        n_experts = self.gate_proj.shape[0]
        top_k = experts.shape[1]
        flat = experts.flatten()  # (N·K,) assignment a = token a // K, slot a % K
        order = flat.argsort(stable=True)  # assignments grouped by expert
        token = order // top_k
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        rows = x[token]  # (N·K, D) in expert order
        outputs = []
        for e, (start, count) in enumerate(zip(_offsets(counts), counts, strict=True)):
            if count == 0:
                continue
            seg = rows[start:start + count]  # (n_e, D)
            h = F.silu(seg @ self.gate_proj[e].t()) * (seg @ self.up_proj[e].t())  # (n_e, F)
            outputs.append(h @ self.down_proj[e].t())  # (n_e, D)
        y = torch.cat(outputs) * weights.flatten()[order, None].to(x.dtype)  # (N·K, D)
        return torch.zeros_like(x).index_add_(0, token, y)


def _offsets(counts: list[int]) -> list[int]:
    starts, total = [], 0
    for c in counts:
        starts.append(total)
        total += c
    return starts


class MoE(nn.Module):
    """The mixture-of-experts feed-forward of one layer (see the module docstring)."""

    def __init__(self, config: ModelConfig, shared: nn.Module | None = None) -> None:
        """``shared``: the shared experts' feed-forward (a dense SwiGLU MLP), required when the config has some."""
        super().__init__()
        if bool(config.n_shared_experts) != (shared is not None):
            raise ValueError("pass the shared experts' MLP exactly when config.n_shared_experts > 0")
        d = config.d_model
        self.top_k = config.n_experts_per_tok
        self.gate_kind = config.router_gate
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_coef, self.z_loss_coef = config.router_aux_loss_coef, config.router_z_loss_coef
        self.router = nn.Linear(d, config.n_experts, bias=False)
        self.experts = Experts(config.n_experts, d, config.expert_dim)
        self.shared = shared
        self.shared_gate = nn.Linear(d, 1, bias=False) if config.n_shared_experts and config.shared_expert_gate \
            else None
        self.stats: RouterStats | None = None

    def init_weights(self, std: float, residual_std: float) -> None:
        """Experts like the dense MLP (down projections scaled as residual outputs); the router and gates
        are plain linears, initialised by the model's loop."""
        self.experts.init_weights(std, residual_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> (logits (N, E), scores (N, E), top-k weights (N, K), top-k experts (N, K)); scores and
        weights in fp32 at least."""
        logits = self.router(x)
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # scores in fp32 at least
        scores = wide.softmax(-1) if self.gate_kind == "softmax" else wide.sigmoid()
        weights, experts = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        logits, scores, weights, experts = self.route(x)
        y = self.experts(x, experts, weights)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        self.stats = router_stats(logits, scores, experts)
        return y.reshape(shape)


def router_stats(logits: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor) -> RouterStats:
    """Load-balancing loss, z-loss and counts of one routing decision (logits/scores (N, E), experts (N, K))."""
    n_experts = scores.shape[-1]
    counts = torch.bincount(experts.flatten(), minlength=n_experts)
    share = counts.to(scores.dtype) / experts.numel()  # f_i, no gradient (argmax-like)
    # P_i: mean normalised score (softmax scores already sum to 1; sigmoid ones are normalised per token).
    mean_prob = (scores / scores.sum(-1, keepdim=True)).mean(0)
    load_balance = n_experts * (share * mean_prob).sum()
    z_loss = torch.logsumexp(logits.to(scores.dtype), dim=-1).square().mean()
    return RouterStats(load_balance, z_loss, counts.detach())


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE feed-forwards of a model (through wrappers such as DDP), in layer order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_aux_loss(model: nn.Module) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The router losses of the last forward, averaged over MoE layers and weighted by the config's
    ``router_aux_loss_coef`` / ``router_z_loss_coef`` (None for a dense model), and the unweighted means to log
    (``moe_load_balance``, ``moe_z_loss``)."""
    layers = [m for m in moe_layers(model) if m.stats is not None]
    if not layers:
        return None, {}
    balance = torch.stack([m.stats.load_balance for m in layers]).mean()
    z_loss = torch.stack([m.stats.z_loss for m in layers]).mean()
    loss = layers[0].aux_loss_coef * balance + layers[0].z_loss_coef * z_loss
    return loss, {"moe_load_balance": balance.item(), "moe_z_loss": z_loss.item()}


def expert_load(model: nn.Module) -> list[list[int]]:
    """Per MoE layer, how many token assignments each expert received in the last forward."""
    return [m.stats.counts.tolist() for m in moe_layers(model) if m.stats is not None]


def residual_std(config: ModelConfig) -> float:
    """Initial std of residual output projections (GPT-2's 1/sqrt(2·layers) scaling)."""
    return config.init_std / math.sqrt(2 * config.n_layer)


def active_params(model: nn.Module, include_embeddings: bool = False) -> int:
    """Parameters one token passes through: routed experts count k/E of theirs (the compute of a forward pass
    is about 2 FLOPs per active parameter per token). Embedding tables are left out unless asked for."""
    total = 0
    for name, p in model.named_parameters():
        if not include_embeddings and "emb" in name:
            continue
        total += p.numel()
    for moe in moe_layers(model):
        experts = sum(p.numel() for p in moe.experts.parameters())
        total -= experts - experts * moe.top_k // moe.experts.gate_proj.shape[0]
    return total
