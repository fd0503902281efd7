"""The T5 encoder–decoder (v1.0 with ReLU feed-forward, v1.1 with gated GELU).

What sets T5 apart from the decoder in ``transformer.py``:
- positions enter only as a learned bias on the attention scores, looked up by a bucket of the relative
  distance key − query (exact for short distances, logarithmic up to ``max_distance``); bidirectional buckets
  in the encoder, causal ones in the decoder. The first layer of each stack owns the table; all layers reuse it;
- scores are not divided by sqrt(head_dim) (T5's initialisation absorbs that factor);
- RMS norms without bias before every sub-layer, no biases anywhere;
- the decoder block adds cross-attention over the encoder output (padding masked, no position bias);
- v1.0 ties the output head to the embedding and scales the decoder output by d_model^-0.5 first.

Interface shared with BART (``omnilm.infer.seq2seq`` relies on it): ``encode``, ``decode`` (with an optional
``EncDecCache``), ``forward`` (teacher forcing), ``new_cache`` and ``config.decoder_start_token_id``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ConfigError, from_preset_or_dict
from omnilm.model.mha import EncDecCache, EncoderDecoderLM, MultiHeadAttention, add_biases, causal_bias, padding_bias
from omnilm.model.transformer import RMSNorm


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5 model (names follow omnilm's decoder config; config.json spellings in ``hf_t5``)."""

    vocab_size: int = 2048
    d_model: int = 128
    #: Per-head width (T5's d_kv; heads × head_dim need not equal d_model).
    head_dim: int = 32
    #: Hidden width of the feed-forward block.
    d_ff: int = 512
    #: Encoder layers.
    n_layer: int = 2
    #: Decoder layers (None = n_layer).
    n_decoder_layer: int | None = None
    n_head: int = 4
    #: Relative-position buckets and the distance beyond which all share the last bucket.
    num_buckets: int = 32
    max_distance: int = 128
    #: RMS norm epsilon.
    norm_eps: float = 1e-6
    #: Feed-forward: "relu" (T5 v1.0) or "gated-gelu" (v1.1: gelu_tanh(wi_0 x) · wi_1 x).
    ff_kind: Literal["relu", "gated-gelu"] = "gated-gelu"
    #: Share the output head with the token embedding (v1.0).
    tie_embeddings: bool = False
    #: Multiply the decoder output by d_model^-0.5 before the head (None = as tie_embeddings, T5's pairing).
    scale_decoder_outputs: bool | None = None
    #: Dropout on residual branches, attention probabilities and the feed-forward hidden layer.
    dropout: float = 0.1
    #: Scale of T5's initialisation (1.0 as published).
    init_factor: float = 1.0
    #: Longest encoder input / decoder output used by default for caches and training windows.
    max_seq_len: int = 512
    pad_token_id: int = 0
    eos_token_id: int = 1
    #: The token the decoder starts from (T5: the padding id).
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        if self.ff_kind not in ("relu", "gated-gelu"):
            raise ConfigError(f"unknown T5 ff_kind {self.ff_kind!r}; expected relu or gated-gelu")
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_embeddings)

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket index of each relative distance (key − query).

    Bidirectional: half the buckets for keys after the query, half for keys at or before. Causal: only
    keys at or before count (later ones fall in bucket 0). Within a half, distances below half of it get their
    own bucket; larger ones share buckets spaced logarithmically up to ``max_distance``.
    """
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # distance.clamp(min=1) only keeps log() finite where the exact branch is taken anyway.
    log_bucket = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """Learned per-head score bias by relative-position bucket: (1, H, T, S) for queries at past..past+T−1."""

    def __init__(self, config: T5Config, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = config.num_buckets, config.max_distance
        self.weight = nn.Parameter(torch.zeros(config.num_buckets, config.n_head))

    def forward(self, q_len: int, k_len: int, past: int = 0) -> torch.Tensor:
        device = self.weight.device
        queries = torch.arange(past, past + q_len, device=device)
        keys = torch.arange(k_len, device=device)
        buckets = relative_position_bucket(keys[None, :] - queries[:, None], self.bidirectional,
                                           self.num_buckets, self.max_distance)  # (T, S)
        return F.embedding(buckets, self.weight).permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)


class T5FeedForward(nn.Module):
    """relu: down(relu(up(x))); gated-gelu: down(gelu_tanh(gate(x)) · up(x)). No biases."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        d, f = config.d_model, config.d_ff
        self.gate_proj = nn.Linear(d, f, bias=False) if config.ff_kind == "gated-gelu" else None
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            h = F.relu(self.up_proj(x))
        else:
            h = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        return self.down_proj(self.drop(h))


class T5Block(nn.Module):
    """Pre-norm self-attention, (decoder only) pre-norm cross-attention, pre-norm feed-forward."""

    def __init__(self, config: T5Config, cross: bool) -> None:
        super().__init__()
        attn = lambda: MultiHeadAttention(config.d_model, config.n_head, config.head_dim, bias=False,  # noqa: E731
                                          scale=1.0, dropout=config.dropout)
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = attn()
        self.cross_norm = RMSNorm(config.d_model, config.norm_eps) if cross else None
        self.cross_attn = attn() if cross else None
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = T5FeedForward(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, memory: torch.Tensor | None = None,
                memory_bias: torch.Tensor | None = None, cache: EncDecCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), bias, cache=cache, layer=layer))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.cross_norm(x), memory_bias, memory=memory, cache=cache,
                                              layer=layer))
        return x + self.drop(self.mlp(self.norm2(x)))


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention) of T5."""

    def __init__(self, config: T5Config, decoder: bool) -> None:
        super().__init__()
        n = config.decoder_layers if decoder else config.n_layer
        self.rel_bias = RelativePositionBias(config, bidirectional=not decoder)
        self.blocks = nn.ModuleList(T5Block(config, cross=decoder) for _ in range(n))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None, memory: torch.Tensor | None = None,
                memory_bias: torch.Tensor | None = None, cache: EncDecCache | None = None) -> torch.Tensor:
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        bias = add_biases(self.rel_bias(T, past + T, past), mask_bias)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, bias, memory, memory_bias, cache, i)
        return self.drop(self.norm_f(x))


class T5(EncoderDecoderLM):
    """T5 for conditional generation: ``forward(input_ids, attention_mask, decoder_input_ids)`` → logits."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.cache_head_dim = config.head_dim
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, decoder=False)
        self.decoder = T5Stack(config, decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """T5's initialisation: embeddings N(0, 1); q N(0, (d·D)^-½), k/v N(0, d^-½), o N(0, (H·D)^-½);
        feed-forward in N(0, d^-½), out N(0, d_ff^-½); position tables N(0, d^-½); norms 1."""
        c, f = self.config, self.config.init_factor
        nn.init.normal_(self.tok_emb.weight, std=f)
        nn.init.normal_(self.lm_head.weight, std=f)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                nn.init.normal_(module.q_proj.weight, std=f * (c.d_model * c.head_dim) ** -0.5)
                nn.init.normal_(module.k_proj.weight, std=f * c.d_model ** -0.5)
                nn.init.normal_(module.v_proj.weight, std=f * c.d_model ** -0.5)
                nn.init.normal_(module.o_proj.weight, std=f * (c.n_head * c.head_dim) ** -0.5)
            elif isinstance(module, T5FeedForward):
                for proj in (module.gate_proj, module.up_proj):
                    if proj is not None:
                        nn.init.normal_(proj.weight, std=f * c.d_model ** -0.5)
                nn.init.normal_(module.down_proj.weight, std=f * c.d_ff ** -0.5)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.weight, std=f * c.d_model ** -0.5)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, d_model); ``attention_mask`` (B, S) 1 = token, 0 = padding."""
        x = self.tok_emb(input_ids)
        return self.encoder(x, padding_bias(attention_mask, x.dtype))

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               attention_mask: torch.Tensor | None = None, cache: EncDecCache | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab) of the decoder inputs given the encoder output ``memory``; with
        ``cache`` the inputs continue the cached positions and the cache advances by T."""
        x = self.tok_emb(decoder_input_ids)
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        h = self.decoder(x, causal_bias(T, past, x.device, x.dtype), memory, padding_bias(attention_mask, x.dtype),
                         cache)
        if cache is not None:
            cache.advance(T)
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5
        return self.lm_head(h)

    def save_pretrained(self, folder: str | Path, tokenizer: object = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        from omnilm.model.hf_t5 import save_t5

        return save_t5(self, folder, tokenizer, state)

    def read_state(self, folder: str | Path) -> dict[str, torch.Tensor]:
        from omnilm.model.hf_t5 import read_t5_state

        return read_t5_state(folder, self)

    def num_flops_per_token(self) -> float:
        """Training FLOPs per (encoder + decoder) token ≈ 6 × the weights a token passes through (half the
        stacks' weights each side, the head on the decoder side), attention's context terms left out."""
        c = self.config
        attn = 4 * c.d_model * c.n_head * c.head_dim
        ff = (3 if c.ff_kind == "gated-gelu" else 2) * c.d_model * c.d_ff
        enc, dec = c.n_layer * (attn + ff), c.decoder_layers * (2 * attn + ff) + c.d_model * c.vocab_size
        return 6 * (enc + dec) / 2

    def flops_per_example(self, input_len: int, target_len: int) -> float:
        """Training FLOPs of one (input, target) pair: 6 × the weights each encoder token and each decoder token
        passes through (the head on the decoder side), plus attention's 12 · layers · width · context per token
        (the decoder attends to its own prefix and to the whole input)."""
        c = self.config
        width = c.n_head * c.head_dim
        attn = 4 * c.d_model * width
        ff = (3 if c.ff_kind == "gated-gelu" else 2) * c.d_model * c.d_ff
        encoder = input_len * (6 * c.n_layer * (attn + ff) + 12 * c.n_layer * width * input_len)
        decoder = target_len * (6 * (c.decoder_layers * (2 * attn + ff) + c.d_model * c.vocab_size)
                                + 12 * c.decoder_layers * width * (target_len + input_len))
        return encoder + decoder


PRESETS: dict[str, T5Config] = {
    # A CPU-sized T5 v1.1 (gated GELU, untied) for tests and small runs.
    "t5-tiny": T5Config(vocab_size=2048, d_model=128, head_dim=32, d_ff=384, n_layer=2, n_head=4),
    # t5-small (v1.0): https://huggingface.co/google-t5/t5-small/blob/main/config.json
    "t5-small": T5Config(vocab_size=32128, d_model=512, head_dim=64, d_ff=2048, n_layer=6, n_head=8,
                         ff_kind="relu", tie_embeddings=True),
    # t5-base (v1.0): https://huggingface.co/google-t5/t5-base/blob/main/config.json
    "t5-base": T5Config(vocab_size=32128, d_model=768, head_dim=64, d_ff=3072, n_layer=12, n_head=12,
                        ff_kind="relu", tie_embeddings=True),
    # t5-v1_1-base: https://huggingface.co/google/t5-v1_1-base/blob/main/config.json
    "t5-v1_1-base": T5Config(vocab_size=32128, d_model=768, head_dim=64, d_ff=2048, n_layer=12, n_head=12),
}


def load_t5_config(values: dict | str | Path) -> T5Config:
    """A T5Config from a mapping or YAML/JSON file; a ``preset`` key starts from that preset."""
    return from_preset_or_dict(T5Config, PRESETS, values, "t5")
