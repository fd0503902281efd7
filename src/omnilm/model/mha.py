"""Multi-head attention for encoders and encoder–decoders, and the decoder-side cache of an encoder–decoder.

The decoder-only model keeps its own rotary, grouped-query attention (``attention.py``); encoders (BERT,
ELECTRA) and encoder–decoders (T5, BART) share this one instead. What differs between those families is a
parameter, not a subclass: projection biases, the score scale (1/sqrt(head_dim) for BERT/BART, 1 for T5, whose
initialisation absorbs it) and an additive bias on the scores (padding, causality, T5's relative positions).

Notation: B batch, T query positions, S key positions, H heads, D per-head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.model.attention import KVCache


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive score bias (B, 1, 1, S): 0 for real keys, the dtype's lowest value for padding (mask 0).

    The lowest finite value rather than -inf keeps a fully padded row finite (it attends uniformly).
    """
    if attention_mask is None:
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_bias(q_len: int, past: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias (1, 1, T, past+T) that hides keys after each query (query i sits at position past+i)."""
    keys = torch.arange(past + q_len, device=device)
    queries = torch.arange(past, past + q_len, device=device)
    hidden = keys[None, :] > queries[:, None]
    return (hidden.to(dtype) * torch.finfo(dtype).min)[None, None]


def add_biases(*biases: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of the given additive biases (broadcast), clamped at the dtype's lowest value; None if all are None."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    total = present[0]
    for b in present[1:]:
        total = total + b
    return total.clamp(min=torch.finfo(total.dtype).min)


class EncDecCache(KVCache):
    """Keys/values of an encoder–decoder's decoder during incremental decoding.

    Self-attention keys/values live in ``KVCache``'s preallocated buffers, (layers, B, H, max_len, D), filled up to
    ``length`` and advanced by the model after each forward pass. Cross-attention keys/values depend only on the
    encoder output, so each layer computes them once, on the first step, and stores them in ``cross[layer]``
    (B, H, S, D).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self._allocate((n_layer, batch_size, n_head, max_len, head_dim), device, dtype)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows by ``index`` (beam search), cross-attention entries included."""
        super().reorder(index)
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]


class EncoderDecoderLM(nn.Module):
    """What T5 and BART share around their own ``encode`` / ``decode``: teacher forcing, the decoder cache, and the
    trainer's FLOPs hook. A subclass sets ``cache_head_dim`` and defines ``num_flops_per_token``."""

    cache_head_dim: int

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, vocab) for ``decoder_input_ids`` (the targets shifted right)."""
        if decoder_input_ids is None:
            raise ValueError(f"{type(self).__name__} needs decoder_input_ids (the targets shifted right)")
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def flops_per_token(self, seq_len: int) -> float:
        return self.num_flops_per_token()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> EncDecCache:
        p, c = self.tok_emb.weight, self.config
        return EncDecCache(c.decoder_layers, batch_size, c.n_head, self.cache_head_dim, max_len or c.max_seq_len,
                           p.device, p.dtype)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention: softmax(scale · q kᵀ + bias) v over H heads of width D.

    ``forward(x)`` is self-attention; ``forward(x, memory=enc)`` attends over the encoder output ``enc``.
    """

    def __init__(self, d_model: int, n_head: int, head_dim: int, bias: bool, scale: float | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        inner = n_head * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.o_proj = nn.Linear(inner, d_model, bias=bias)
        #: None = 1/sqrt(D) (SDPA's default).
        self.scale = scale
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                cache: EncDecCache | None = None, layer: int = 0) -> torch.Tensor:
        """``bias`` broadcasts to (B, H, T, S). With ``cache``: self-attention appends this step's keys/values;
        cross-attention computes them from ``memory`` on the first call and reuses them after."""
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x))
        if memory is None:
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            if cache is not None:
                k, v = cache.update(layer, k, v)
        elif cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]
        else:
            k, v = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
            if cache is not None:
                cache.cross[layer] = (k, v)
        if bias is not None:
            bias = bias.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H·D) -> (B, T, d_model)
