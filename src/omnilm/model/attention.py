"""Causal self-attention: rotary embeddings, grouped-query attention, KV cache and padding masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.model.config import ModelConfig


class KVCache:
    """Preallocated key/value buffers of every layer, for incremental decoding.

    Buffers have shape (layers, batch, kv_heads, max_len, head_dim). ``length`` counts the positions
    already written; a forward pass writes its new keys/values after them and then advances it.
    Preallocation keeps each decode step free of concatenations and reallocations.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.dim_per_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of ``layer``; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative decoding drops rejected tokens this way).

        The buffers are not cleared: the next update overwrites the forgotten positions.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows by ``index`` (beam search)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 mrope_section: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (B, 1, T, head_dim) for the given positions (B, T).

    Uses the "rotate half" layout (first half of each head pairs with the second half), the
    layout of Hugging Face's Llama/Qwen2 weights, so checkpoints need no permutation.
    Multimodal RoPE: with 3-D positions (3, B, T) and ``mrope_section`` (t, h, w) the first t frequencies turn
    with the temporal component, the next h with the height one and the last w with the width one.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2) or (3, B, T, hd/2)
    if position_ids.dim() == 3:
        if mrope_section is None:
            raise ValueError("3-D position ids need a model with mrope_section")
        parts = freqs.split(list(mrope_section), dim=-1)
        freqs = torch.cat([part[axis] for axis, part in enumerate(parts)], dim=-1)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def build_attention_mask(attention_mask: torch.Tensor | None, past: int, q_len: int,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B, 1, q_len, past+q_len) that is True where a query may attend a key.

    ``attention_mask`` is (B, past+q_len) with 1 for real tokens and 0 for padding. Returns None
    when plain causal attention suffices (the caller then uses SDPA's ``is_causal``). A padding
    query would see no key at all and give NaNs, so every query may always attend to itself.
    A ready (B, 1, q_len, keys) boolean mask is returned as it is (the serving engine's paged batches,
    whose rows each have their own length, build their own).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0 or q_len == 1:
            return None
        attention_mask = torch.ones(1, past + q_len, dtype=torch.bool, device=device)
    keys = torch.arange(past + q_len, device=device)
    queries = torch.arange(past, past + q_len, device=device)
    causal = keys[None, :] <= queries[:, None]
    allowed = causal[None] & attention_mask[:, None, :].bool()
    allowed |= keys[None, :] == queries[:, None]
    return allowed[:, None]


class Attention(nn.Module):
    """Multi-head causal self-attention with optional grouped-query K/V heads."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.dim_per_head
        d, q_dim, kv_dim = config.d_model, config.n_head * config.dim_per_head, config.kv_heads * config.dim_per_head
        self.q_proj = nn.Linear(d, q_dim, bias=config.attn_qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=config.attn_qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=config.attn_qkv_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=config.linear_bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1 and k.shape[2] == T,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
