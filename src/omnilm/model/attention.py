"""Causal self-attention: rotary embeddings, grouped-query attention, KV cache and padding masks."""

from __future__ import annotations

import math
from typing import Any

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
        self._allocate((config.n_layer, batch_size, config.kv_heads, max_len, config.dim_per_head), device, dtype)

    def _allocate(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> None:
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


class RollingKVCache:
    """A constant-memory KV cache for unbounded decoding: the first ``sinks`` positions plus a recent window.

    Two uses, one class:
    - Sliding-window models (``sinks`` = 0; Mistral, Qwen2 with every layer windowed): the keys of the last
      ``window`` positions are kept with their absolute positions; ``length`` counts every position seen, so
      positions and biases stay those of the full sequence, and the model's logits equal a full cache's.
    - Attention sinks (StreamingLLM; ``sinks`` ≥ 1, any model): the first ``sinks`` tokens stay forever and
      the ``window`` most recent ones after them; positions are slots in the cache (``length`` = slots in use),
      as the paper prescribes, so a query never sees a distance beyond sinks + window. When tokens are evicted
      the kept window keys move down by that many slots and are rotated back by as many RoPE positions
      (RoPE rotations compose), instead of being recomputed. Rows may not be padded in this mode. A
      learned-position (gpt2) model cannot move a key's position: its kept keys keep the slot they were written
      at, and new tokens take the next slot, so it streams past its position table but less faithfully.

    During a forward pass of T new tokens the layers attend stored + T keys; ``advance`` then evicts, so memory
    is bounded by (sinks + window + T) positions whatever the length of the stream.
    """

    def __init__(self, config: ModelConfig, batch_size: int, window: int, sinks: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if window < 1 or sinks < 0:
            raise ValueError(f"a rolling cache needs window ≥ 1 and sinks ≥ 0, got window={window}, sinks={sinks}")
        if sinks and config.mrope_section is not None:
            raise ValueError("attention sinks do not support multimodal RoPE")
        self.window, self.sinks = window, sinks
        empty = torch.zeros(batch_size, config.kv_heads, 0, config.dim_per_head, device=device, dtype=dtype)
        self.k = [empty] * config.n_layer
        self.v = [empty] * config.n_layer
        self.key_pos = torch.zeros(0, dtype=torch.long, device=device)  # absolute position of each kept key
        self.valid = torch.ones(batch_size, 0, dtype=torch.bool, device=device)  # (B, kept): real token or pad
        self._new_valid: torch.Tensor | None = None
        self.length = 0
        self.inv_freq = sink_rotation_freq(config, device) if sinks else None

    @property
    def kept(self) -> int:
        return self.k[0].shape[2]

    def mask_for(self, attention_mask: torch.Tensor | None, q_len: int, device: torch.device) -> torch.Tensor:
        """The boolean (B, 1, q_len, kept + q_len) mask of the next forward pass (padding from the last q_len
        columns of ``attention_mask``, which may cover the whole history)."""
        batch = self.valid.shape[0]
        if attention_mask is None:
            new_valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
        else:
            new_valid = attention_mask[:, -q_len:].bool()
            if self.sinks and not bool(attention_mask.all()):
                raise ValueError("attention sinks need unpadded rows (equal-length prompts)")
        self._new_valid = new_valid
        keys = torch.cat([self.key_positions(), torch.arange(self.length, self.length + q_len, device=device)])
        queries = keys[-q_len:]
        behind = queries[:, None] - keys[None, :]  # (T, S + T)
        if self.sinks:
            allowed = (behind >= 0) & ((torch.arange(len(keys), device=device) < self.sinks) | (behind <= self.window))
        else:
            allowed = (behind >= 0) & (behind < self.window)
        allowed = allowed[None] & torch.cat([self.valid, new_valid], dim=1)[:, None, :]
        allowed |= behind[None] == 0
        return allowed[:, None]

    def key_positions(self) -> torch.Tensor:
        """Positions (kept,) of the stored keys: absolute ones, or slots with sinks."""
        if self.sinks:
            return torch.arange(self.kept, device=self.key_pos.device)
        return self.key_pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this pass's keys/values of ``layer``; return the stored ones plus them."""
        self.k[layer] = torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        """Count the n new positions, then evict what falls out of the sinks + window."""
        device = self.key_pos.device
        new_valid = self._new_valid if self._new_valid is not None else torch.ones(
            self.valid.shape[0], n, dtype=torch.bool, device=device)
        self.valid = torch.cat([self.valid, new_valid[:, -n:]], dim=1)
        self.key_pos = torch.cat([self.key_pos, torch.arange(self.length, self.length + n, device=device)])
        self._new_valid = None
        total = self.kept
        if self.sinks:
            evict = max(0, total - self.sinks - self.window)
            head = min(self.sinks, total)  # a stream shorter than its sinks keeps everything
            keep = torch.cat([torch.arange(head, device=device), torch.arange(head + evict, total, device=device)])
            self.length = total - evict
        else:
            evict = max(0, total - self.window)
            keep = torch.arange(evict, total, device=device)
            self.length += n
        if evict:
            self.k = [self._shift(k.index_select(2, keep), evict) for k in self.k]
            self.v = [v.index_select(2, keep) for v in self.v]
            self.valid = self.valid[:, keep]
            self.key_pos = self.key_pos[keep]

    def _shift(self, k: torch.Tensor, evict: int) -> torch.Tensor:
        """Sink mode: the window keys move ``evict`` slots down; rotate them back by as many positions."""
        if not self.sinks or self.inv_freq is None:
            return k
        head = min(self.sinks, k.shape[2])
        return torch.cat([k[:, :, :head], rotate_keys(k[:, :, head:], -evict, self.inv_freq)], dim=2)

    def truncate(self, length: int) -> None:
        raise ValueError("a rolling KV cache cannot be truncated (speculative decoding needs a full KVCache)")

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows by ``index`` (beam search)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.valid = self.valid.index_select(0, index)


def sink_rotation_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The RoPE inverse frequencies (head_dim/2,) that move stored keys when attention sinks evict tokens (None
    for a model without RoPE). Plain or statically scaled ones: re-rotation must turn keys exactly as writing them
    did, and dynamic NTK's depend on the sequence length."""
    if not config.uses_rope:
        return None
    scaling = config.rope_scaling if (config.rope_scaling or {}).get("rope_type") != "dynamic" else None
    return rope_inv_freq(config.dim_per_head, config.rope_theta, scaling, config.max_seq_len, device=device)[0]


def rotate_keys(k: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE keys (..., head_dim) turned by ``shift`` positions (negative: back); rotations compose, so a key
    written at position p becomes the key of position p + shift."""
    angle = shift * inv_freq
    emb = torch.cat((angle, angle))
    return apply_rope(k, emb.cos().to(k.dtype), emb.sin().to(k.dtype))


def layer_masks(config: ModelConfig, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                past: int, q_len: int, cache: KVCache | RollingKVCache | None, dtype: torch.dtype,
                ) -> list[torch.Tensor | None]:
    """The attention mask of every layer: causal with padding, windowed on sliding-window layers, a rolling
    cache's own, and with ALiBi turned into additive biases (B, H, T, keys) of that dtype."""
    device = position_ids.device
    paged = attention_mask is not None and attention_mask.dim() == 4
    if isinstance(cache, RollingKVCache):
        full = window = cache.mask_for(attention_mask, q_len, device)
    elif paged:
        # A ready 4-D mask (the serving engine's paged batches): its key columns are positions 0..S−1.
        full = window = attention_mask.bool()
        if config.sliding_window is not None:
            keys = torch.arange(full.shape[-1], device=device)
            window = full & (keys > position_ids[:, None, :, None] - config.sliding_window)
    else:
        full = build_attention_mask(attention_mask, past, q_len, device)
        window = build_attention_mask(attention_mask, past, q_len, device, config.sliding_window) \
            if config.sliding_window is not None else full
    if config.alibi:
        if paged:
            keys = torch.arange(full.shape[-1], device=device)[None].expand(len(position_ids), -1)
        elif isinstance(cache, RollingKVCache):
            keys = torch.cat([cache.key_positions(), position_ids[0, -q_len:]])[None].expand(len(position_ids), -1)
        elif past == 0 and (attention_mask is None or attention_mask.dim() == 2):
            keys = position_ids
        elif attention_mask is None:
            keys = torch.arange(past + q_len, device=device)[None].expand(len(position_ids), -1)
        else:
            keys = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        slopes = alibi_slopes(config.n_head)
        full_bias = alibi_bias(slopes, position_ids, keys, full, dtype)
        window = full_bias if window is full else alibi_bias(slopes, position_ids, keys, window, dtype)
        full = full_bias
    windowed = config.sliding_window is not None
    return [window if windowed and i >= config.window_from_layer else full for i in range(config.n_layer)]


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                  max_position: int | None = None, seq_len: int | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies (head_dim/2,) and the factor cos/sin are multiplied by.

    ``scaling`` is a ModelConfig ``rope_scaling`` mapping; the rules are transformers' (modeling_rope_utils), so
    checkpoints configured for them give the same logits:
    - linear (position interpolation): every frequency divided by the factor s.
    - dynamic (NTK): for a sequence of ``seq_len`` > ``max_position`` positions the base becomes
      θ·(s·L/L_train − (s − 1))^{d/(d−2)}; unchanged up to the training length.
    - yarn: per frequency a ramp between interpolation (÷s, wavelengths longer than the context the model saw
      turn by fewer than beta_slow rotations) and extrapolation (more than beta_fast rotations); cos/sin scaled by
      0.1·ln s + 1 (or attention_factor / the mscale ratio).
    - llama3: wavelengths above original/low_freq_factor divided by s, below original/high_freq_factor kept,
      blended smoothly between.
    """
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        if max_position is None:
            raise ValueError("dynamic RoPE scaling needs the training length (max_position)")
        length = max(seq_len or max_position, max_position)
        base = theta * ((factor * length / max_position) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents), 1.0
    original = int(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    # yarn
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        """The dimension whose frequency turns ``rotations`` times over the original context."""
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    # ramp 0 = fast-turning dimensions, kept (extrapolated); ramp 1 = slow ones, interpolated by the factor.
    return inv_freq * (1 - ramp) + inv_freq / factor * ramp, float(attention)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 mrope_section: tuple[int, ...] | None = None, scaling: dict[str, Any] | None = None,
                 max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (B, 1, T, head_dim) for the given positions (B, T).

    Uses the "rotate half" layout (first half of each head pairs with the second half), the
    layout of Hugging Face's Llama/Qwen2 weights, so checkpoints need no permutation.
    Multimodal RoPE: with 3-D positions (3, B, T) and ``mrope_section`` (t, h, w) the first t frequencies turn
    with the temporal component, the next h with the height one and the last w with the width one.
    ``scaling`` / ``max_position``: RoPE scaling (see ``rope_inv_freq``); dynamic NTK reads the current length
    from the largest position.
    """
    seq_len = None
    if scaling is not None and scaling["rope_type"] == "dynamic":
        seq_len = int(position_ids.max()) + 1
    inv_freq, attention = rope_inv_freq(head_dim, theta, scaling, max_position, seq_len, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2) or (3, B, T, hd/2)
    if position_ids.dim() == 3:
        if mrope_section is None:
            raise ValueError("3-D position ids need a model with mrope_section")
        parts = freqs.split(list(mrope_section), dim=-1)
        freqs = torch.cat([part[axis] for axis, part in enumerate(parts)], dim=-1)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def build_attention_mask(attention_mask: torch.Tensor | None, past: int, q_len: int,
                         device: torch.device, window: int | None = None) -> torch.Tensor | None:
    """Boolean mask (B, 1, q_len, past+q_len) that is True where a query may attend a key.

    ``attention_mask`` is (B, past+q_len) with 1 for real tokens and 0 for padding. Returns None
    when plain causal attention suffices (the caller then uses SDPA's ``is_causal``). A padding
    query would see no key at all and give NaNs, so every query may always attend to itself.
    ``window``: sliding-window attention, a query sees only keys less than ``window`` positions back
    (transformers' rule ``key > query − window``, in columns of the mask).
    A ready (B, 1, q_len, keys) boolean mask is returned as it is (the serving engine's paged batches,
    whose rows each have their own length, build their own).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    windowed = window is not None and past + q_len > window
    if attention_mask is None or bool(attention_mask.all()):
        if (past == 0 or q_len == 1) and not windowed:
            return None
        attention_mask = torch.ones(1, past + q_len, dtype=torch.bool, device=device)
    keys = torch.arange(past + q_len, device=device)
    queries = torch.arange(past, past + q_len, device=device)
    causal = keys[None, :] <= queries[:, None]
    if windowed:
        causal &= keys[None, :] > queries[:, None] - window
    allowed = causal[None] & attention_mask[:, None, :].bool()
    allowed |= keys[None, :] == queries[:, None]
    return allowed[:, None]


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.; BLOOM's layout): 2^(−8h/n) for h = 1..n when n is a power of two;
    otherwise those of the largest power of two p < n, then the odd-numbered slopes of 2p."""
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = [2 ** (-8 * h / closest) for h in range(1, closest + 1)]
    slopes += [2 ** (-4 * h / closest) for h in range(1, 2 * (n_head - closest), 2)]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor,
               allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (B, H, T, S): −slope_h·(query position − key position) where allowed, −inf
    elsewhere. Positions (B, T) / (B, S) count real tokens, so left padding does not shift the biases.
    ``allowed`` is a boolean (B, 1, T, S) mask or None for plain causal attention."""
    distance = (query_pos[:, None, :, None] - key_pos[:, None, None, :]).to(torch.float32)  # (B, 1, T, S)
    bias = -slopes.to(distance.device)[None, :, None, None] * distance
    if allowed is None:
        T, S = query_pos.shape[1], key_pos.shape[1]
        allowed = torch.ones(T, S, dtype=torch.bool, device=bias.device).tril(S - T)[None, None]
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


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
