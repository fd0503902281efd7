"""omnilm's decoder-only transformer: one implementation for the GPT-2 and Llama/Qwen2 families.

Written by hand on purpose: the model is the point of the project. A block is pre-norm attention
plus pre-norm MLP, each added to the residual stream; the family (see ModelConfig) picks the norm,
the MLP, and how positions enter.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnilm.model.attention import Attention, KVCache, RollingKVCache, layer_masks, rope_cos_sin
from omnilm.model.config import ModelConfig
from omnilm.model.moe import MoE, residual_std
from omnilm.objectives.chunked_ce import IGNORE_INDEX, linear_cross_entropy


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama/Qwen2 do), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.family == "gpt2":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return RMSNorm(config.d_model, config.norm_eps)


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama/qwen2): down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, d_ff: int | None = None) -> None:
        """``d_ff`` overrides the config's hidden width (MoE shared experts)."""
        super().__init__()
        d, f, bias = config.d_model, d_ff or config.ff_dim, config.linear_bias
        self.swiglu = config.family != "gpt2"
        self.gate_proj = nn.Linear(d, f, bias=False) if self.swiglu else None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.norm2 = make_norm(config)
        # A mixture-of-experts feed-forward where the config asks for one (see omnilm.model.moe).
        if config.is_moe_layer(layer_idx):
            shared = MLP(config, config.shared_dim) if config.n_shared_experts else None
            self.mlp: nn.Module = MoE(config, shared)
        else:
            self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Decoder-only language model. ``forward`` returns next-token logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        learned = not (config.uses_rope or config.alibi)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if learned else None
        self.emb_norm = make_norm(config) if config.embedding_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        #: Training-time memory options (set from TrainConfig by the trainer, see ``set_memory_options``):
        #: tokens per chunk of the loss's head matmul and softmax when ``forward`` gets targets (0 = all at once),
        #: and whether blocks recompute their activations in backward instead of keeping them.
        self.loss_chunk_tokens = 0
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2·layers) (GPT-2)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, MoE):
                module.init_weights(std, residual_std(self.config))
            elif isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else 1
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    @staticmethod
    def default_positions(attention_mask: torch.Tensor | None, past: int, q_len: int,
                          batch: int, device: torch.device) -> torch.Tensor:
        """Positions (B, q_len): counted over real tokens only, so left padding does not shift them."""
        if attention_mask is None:
            return torch.arange(past, past + q_len, device=device).expand(batch, q_len)
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, past:past + q_len]

    def hidden_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model).

        ``attention_mask`` (B, past+T) covers the cached positions too (1 = token, 0 = padding); a 4-D boolean
        mask (B, 1, T, keys) is used as it is (then pass ``position_ids`` too).
        With ``cache`` the new keys/values are appended and the cache advances by T.
        ``inputs_embeds`` (B, T, d_model) replaces the token-embedding lookup, so vectors that are no
        vocabulary entry (soft prompts) can be fed; pass it or ``input_ids``, not both.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = self.default_positions(attention_mask, past, T, B, x.device)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        elif self.config.uses_rope:
            rope = rope_cos_sin(position_ids, self.config.dim_per_head, self.config.rope_theta, x.dtype,
                                self.config.mrope_section, self.config.rope_scaling, self.config.max_seq_len)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        masks = layer_masks(self.config, attention_mask, position_ids, past, T, cache, x.dtype)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block, mask in zip(self.blocks, masks, strict=True):
            if recompute:
                x = checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, inputs_embeds: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """Logits (B, T, vocab); with ``last_only`` just the last position's (B, 1, vocab).

        With ``targets`` (B, T: the token each position should predict, ``IGNORE_INDEX`` where none) the fp32
        cross-entropy (mean over the scored targets, or their sum) is returned instead of the logits; with
        ``loss_chunk_tokens`` set it is computed chunk by chunk and the full logits never exist. Going through
        ``forward`` keeps DDP, FSDP and torch.compile wrappers in the loop."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if targets is not None and self.loss_chunk_tokens > 0:
            return linear_cross_entropy(h, self.lm_head.weight, targets, self.loss_chunk_tokens, reduction)
        if targets is not None:
            return F.cross_entropy(self.lm_head(h).float().flatten(0, 1), targets.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction=reduction)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def set_memory_options(self, loss_chunk_tokens: int, activation_checkpointing: bool) -> None:
        """Trade compute for memory in training (see the attributes set in ``__init__``); results are unchanged."""
        self.loss_chunk_tokens, self.activation_checkpointing = loss_chunk_tokens, activation_checkpointing

    def new_cache(self, batch_size: int, max_len: int | None = None, sinks: int | None = None,
                  window: int | None = None, rolling: bool = False) -> KVCache | RollingKVCache:
        """An empty KV cache on this model's device and dtype: a full one of ``max_len`` positions, or a rolling
        constant-memory one: with ``sinks``, attention sinks plus ``window`` recent tokens (default: the rest of
        max_seq_len); with ``rolling`` on a model whose every layer slides (``sliding_window``,
        window_from_layer 0), the window. Rolling caches cannot be truncated (speculative decoding)."""
        p = self.tok_emb.weight
        config = self.config
        if sinks:
            return RollingKVCache(config, batch_size, window or config.max_seq_len - sinks, sinks, p.device, p.dtype)
        if rolling and config.sliding_window is not None and config.window_from_layer == 0:
            return RollingKVCache(config, batch_size, config.sliding_window, 0, p.device, p.dtype)
        return KVCache(config, batch_size, max_len or config.max_seq_len, p.device, p.dtype)
