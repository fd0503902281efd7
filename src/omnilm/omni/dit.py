"""Token2wav's DiT: speech codes → mel frames by flow matching (Qwen2.5-Omni layout), its sampler and streaming.

Model. :class:`DiT` predicts the velocity of a rectified flow that carries Gaussian noise (t = 0) to a mel
spectrogram (t = 1). Every mel frame is projected to the model's width together with its conditioning:

    x_t frame (mel_dim) | ECAPA(reference mel) (enc_dim) | embedding of its code (emb_dim) | speaker (enc_emb_dim)

Each code covers ``repeats`` consecutive frames (the code embedding is repeated to the mel rate); the ECAPA-TDNN
embedding of a reference mel and the speaker vector (Qwen's per-voice ``cond``) are the same for every frame. The
time t enters every block through adaLN-Zero (shift, scale and gate from an MLP over sinusoids of 1000·t).
Blocks are pre-norm attention + GELU MLP. Attention is limited to blocks of ``block_size`` frames: a frame sees
the frames of its own block, plus those of the previous block in the layers listed in ``look_backward_layers``
and those of the next block in the layers listed in ``look_ahead_layers``. Rotary positions are applied to the
first head only, on interleaved pairs (what the released checkpoints were trained with).

Dependence. With n_back look-back layers and n_ahead look-ahead layers, one evaluation of the DiT gives frames of
block b from the inputs of blocks b − n_back … b + n_ahead only (each such layer widens the reach by one block;
the other layers stay within the block; the reference, speaker and time are global but fixed). The ODE chains E
evaluations (Euler: steps − 1, RK4: 4·(steps − 1)), so a sampled block depends on the noise and codes of blocks
b − E·n_back … b + E·n_ahead. :func:`sample_stream` builds on exactly this; see its docstring.

Sampling (:func:`sample`, equal to transformers' ``Qwen2_5OmniToken2WavDiTModel.sample`` for the same noise):
the ODE dx/dt = v(t, x) runs from noise at t = 0 to t = 1 on the grid ``linspace(0, 1, steps)`` bent by sway
sampling (t + s·(cos(πt/2) − 1 + t), s = −1 gives 1 − cos(πt/2): small steps near the noise), with
classifier-free guidance v = v_c + g·(v_c − v_u), the unconditional branch having no reference mel, no speaker
and every code set to 0. Solvers: Euler and the fourth-order Runge–Kutta 3/8 rule (transformers' "RK4").

Training (:func:`flow_matching_loss`): x_t = (1 − t)·noise + t·mel with t ~ U(0, 1), regressed on mel − noise.

Layouts: the DiT's frames are (B, T, mel_dim), as in transformers (noise, ``x``, and the reference mel
(B, T_ref, mel_dim), which is how Qwen's speaker files store ``ref_mel``); spectrograms handed out or taken as
targets (:func:`sample`, :func:`sample_stream`, :func:`flow_matching_loss`) are (B, mel_dim, T), the vocoder's.

Checkpoints: module and parameter names are those of transformers' ``Qwen2_5OmniToken2WavDiTModel``, so its state
dict loads as is; in a full Qwen2.5-Omni checkpoint it sits under ``token2wav.code2wav_dit_model.``
(:func:`dit_state_from_hf`, :func:`dit_state_to_hf`), and ``config.json`` maps over key for key
(:func:`dit_config_from_hf`, :func:`dit_config_to_hf`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ConfigError

#: Where the DiT's tensors sit in a full Qwen2.5-Omni checkpoint.
HF_PREFIX = "token2wav.code2wav_dit_model."
#: Width of the sinusoidal time features fed to the time MLP.
TIME_FEATURES = 256
#: Below this guidance scale transformers runs the conditional branch alone (no classifier-free guidance).
MIN_GUIDANCE = 1e-5

METHODS = ("euler", "rk4")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Token2wav's DiT. Field names are those of transformers' ``Qwen2_5OmniDiTConfig``, and so are the defaults
    (transformers documents them against Qwen/Qwen2.5-Omni-7B)."""

    #: Width, depth and attention heads of the transformer (head_dim × heads need not equal hidden_size).
    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    head_dim: int = 64
    #: MLP width = ff_mult × hidden_size.
    ff_mult: int = 2
    #: Width of a code embedding.
    emb_dim: int = 512
    rope_theta: float = 10000.0
    #: Longest utterance in mel frames.
    max_position_embeddings: int = 32768
    #: Frames per attention block, and the layers whose attention also reaches one block ahead / one behind.
    block_size: int = 24
    look_ahead_layers: tuple[int, ...] = (10,)
    look_backward_layers: tuple[int, ...] = (0, 20)
    #: Mel frames per code.
    repeats: int = 2
    #: Code vocabulary (the embedding table has one more row).
    num_embeds: int = 8193
    mel_dim: int = 80
    #: Dropout after the attention output projection and inside the MLP (training only).
    dropout: float = 0.1
    #: Width of the speaker vector, and of the ECAPA-TDNN embedding of the reference mel.
    enc_emb_dim: int = 192
    enc_dim: int = 128
    #: ECAPA-TDNN: a TDNN layer, SE-Res2Net blocks, then the aggregation layer (one entry per layer).
    enc_channels: tuple[int, ...] = (256, 256, 256, 256, 768)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64

    def __post_init__(self) -> None:
        for name in ("look_ahead_layers", "look_backward_layers", "enc_channels", "enc_kernel_sizes",
                     "enc_dilations"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("look_ahead_layers", "look_backward_layers"):
            outside = [i for i in getattr(self, name) if not 0 <= i < self.num_hidden_layers]
            if outside:
                raise ConfigError(f"{name} {outside} are not layers of a {self.num_hidden_layers}-layer DiT")
        if self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.block_size < 1 or self.repeats < 1:
            raise ConfigError(f"block_size ({self.block_size}) and repeats ({self.repeats}) must be positive")
        channels = self.enc_channels
        if not len(channels) == len(self.enc_kernel_sizes) == len(self.enc_dilations):
            raise ConfigError("enc_channels, enc_kernel_sizes and enc_dilations need one entry per ECAPA layer")
        if len(channels) < 3:
            raise ConfigError(f"the ECAPA encoder needs at least one SE-Res2Net block (3 layers), got {channels}")
        # The SE-Res2Net blocks add their input back, and the aggregation layer reads their outputs side by side.
        if len(set(channels[:-1])) != 1:
            raise ConfigError(f"enc_channels[:-1] must all be equal (residual SE-Res2Net blocks), got {channels}")
        if sum(channels[1:-1]) != channels[-1]:
            raise ConfigError(f"enc_channels[-1] must be the sum of the SE-Res2Net widths {channels[1:-1]}")
        if channels[0] % self.enc_res2net_scale:
            raise ConfigError(f"enc_channels ({channels[0]}) must divide into enc_res2net_scale "
                              f"{self.enc_res2net_scale} groups")

    @property
    def n_look_back(self) -> int:
        """Layers reaching one block back: how many blocks back one evaluation's output depends on."""
        return len(set(self.look_backward_layers))

    @property
    def n_look_ahead(self) -> int:
        """Layers reaching one block ahead: how many blocks ahead one evaluation's output depends on."""
        return len(set(self.look_ahead_layers))


_LIST_FIELDS = ("look_ahead_layers", "look_backward_layers", "enc_channels", "enc_kernel_sizes", "enc_dilations")


def dit_config_to_hf(config: DiTConfig) -> dict[str, Any]:
    """The ``dit_config`` of a transformers token2wav config (``Qwen2_5OmniDiTConfig``) for ``config``."""
    out = {k: v for k, v in asdict(config).items() if k != "rope_theta"}
    for name in _LIST_FIELDS:
        out[name] = list(out[name])
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    out["model_type"] = "qwen2_5_omni_dit"
    return out


def dit_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> DiTConfig:
    """A DiTConfig from a transformers DiT config, or the ``dit_config`` inside a token2wav or full Qwen2.5-Omni one."""
    if hf.get("model_type") == "qwen2_5_omni":
        hf = hf.get("token2wav_config") or {}
    if hf.get("model_type") == "qwen2_5_omni_token2wav":
        hf = hf.get("dit_config") or {}
    if hf.get("model_type", "qwen2_5_omni_dit") != "qwen2_5_omni_dit":
        raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not a Qwen2.5-Omni DiT")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: dit rope_type {rope['rope_type']!r} is not supported (only 'default')")
    names = {f.name for f in fields(DiTConfig)}
    values = {k: v for k, v in hf.items() if k in names}
    values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", DiTConfig.rope_theta)))
    return DiTConfig(**values)


def dit_state_from_hf(state: dict[str, torch.Tensor], prefix: str = HF_PREFIX) -> dict[str, torch.Tensor]:
    """The DiT's tensors, named for :class:`DiT`, from a transformers state dict.

    ``state`` is either a full Qwen2.5-Omni checkpoint (the tensors under ``prefix`` are taken, the rest ignored)
    or ``Qwen2_5OmniToken2WavDiTModel``'s own state dict (taken as is: the names are the same).
    """
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inner if inner else dict(state)


def dit_state_to_hf(state: dict[str, torch.Tensor], prefix: str = HF_PREFIX) -> dict[str, torch.Tensor]:
    """:class:`DiT` tensors under the names of a full Qwen2.5-Omni checkpoint (``prefix=""``: the DiT's own)."""
    return {prefix + k: v.detach().contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------
# Speaker encoder: ECAPA-TDNN over the reference mel
# ---------------------------------------------------------------------------------------------------------------


class TDNN(nn.Module):
    """ECAPA's time-delay layer: a dilated Conv1d keeping the length (ends reflected, not zero-padded), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, padding="same",
                              padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T) → (B, C_out, T)."""
        return F.relu(self.conv(x))


class Res2Net(nn.Module):
    """Channels split in ``scale`` groups: the first passes through, each next one is convolved after adding the
    previous group's output, so later groups see a growing range of frames."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList([TDNN(width, width, kernel_size, dilation) for _ in range(scale - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) → (B, C, T)."""
        groups = x.chunk(self.scale, dim=1)  # scale × (B, C/scale, T)
        outs = [groups[0]]
        for i, (group, block) in enumerate(zip(groups[1:], self.blocks, strict=True)):
            outs.append(block(group if i == 0 else group + outs[-1]))
        return torch.cat(outs, dim=1)


class SqueezeExcitation(nn.Module):
    """Channel gates from the time-averaged input: x · sigmoid(W2 relu(W1 mean_t x))."""

    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, se_channels, 1)
        self.conv2 = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) → (B, C, T)."""
        squeezed = x.mean(dim=2, keepdim=True)  # (B, C, 1)
        return x * torch.sigmoid(self.conv2(F.relu(self.conv1(squeezed))))


class SERes2NetBlock(nn.Module):
    """TDNN (1×1) → Res2Net → TDNN (1×1) → squeeze-excitation, plus the input."""

    def __init__(self, channels: int, scale: int, se_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.tdnn1 = TDNN(channels, channels, 1)
        self.res2net_block = Res2Net(channels, scale, kernel_size, dilation)
        self.tdnn2 = TDNN(channels, channels, 1)
        self.se_block = SqueezeExcitation(channels, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) → (B, C, T)."""
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def _weighted_stats(x: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over time of x (B, C, T) under weights summing to 1 over T: each (B, C)."""
    mean = (weights * x).sum(dim=2)  # (B, C)
    var = (weights * (x - mean[..., None]).pow(2)).sum(dim=2)  # (B, C)
    return mean, var.clamp(min=eps).sqrt()


class AttentiveStatsPool(nn.Module):
    """Per-channel attention over time, computed from each frame and the utterance's plain mean and std; returns
    the attention-weighted mean and std side by side."""

    def __init__(self, channels: int, attention_channels: int) -> None:
        super().__init__()
        self.tdnn = TDNN(3 * channels, attention_channels, 1)
        self.conv = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) → (B, 2C, 1)."""
        T = x.shape[-1]
        mean, std = _weighted_stats(x, x.new_full((1, 1, T), 1.0 / T))  # each (B, C)
        context = torch.cat([x, mean[..., None].expand_as(x), std[..., None].expand_as(x)], dim=1)  # (B, 3C, T)
        weights = F.softmax(self.conv(torch.tanh(self.tdnn(context))), dim=2)  # (B, C, T)
        mean, std = _weighted_stats(x, weights)
        return torch.cat([mean, std], dim=1)[..., None]  # (B, 2C, 1)


class SpeakerEncoder(nn.Module):
    """ECAPA-TDNN: a reference mel (B, T_ref, mel_dim) → one vector per utterance (B, enc_dim).

    The reference must be longer than the widest reflected padding (dilation × (kernel − 1) / 2 frames).
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        channels, kernels, dilations = config.enc_channels, config.enc_kernel_sizes, config.enc_dilations
        self.blocks = nn.ModuleList([TDNN(config.mel_dim, channels[0], kernels[0], dilations[0])])
        for i in range(1, len(channels) - 1):
            self.blocks.append(SERes2NetBlock(channels[i], config.enc_res2net_scale, config.enc_se_channels,
                                              kernels[i], dilations[i]))
        # Multi-layer feature aggregation over the SE-Res2Net outputs side by side.
        self.mfa = TDNN(channels[-1], channels[-1], kernels[-1], dilations[-1])
        self.asp = AttentiveStatsPool(channels[-1], config.enc_attention_channels)
        self.fc = nn.Conv1d(2 * channels[-1], config.enc_dim, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, T_ref, mel_dim) → (B, enc_dim)."""
        x = mel.transpose(1, 2)  # (B, mel_dim, T_ref)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        x = self.mfa(torch.cat(outs[1:], dim=1))  # (B, channels[-1], T_ref)
        return self.fc(self.asp(x)).squeeze(-1)  # (B, enc_dim)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings: time, codes, inputs
# ---------------------------------------------------------------------------------------------------------------


def time_sinusoids(time: torch.Tensor, dim: int = TIME_FEATURES, scale: float = 1000.0) -> torch.Tensor:
    """(B,) flow times → (B, dim): sines then cosines of scale·t at frequencies geometric from 1 down to 1e-4."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=time.device).float() * -(math.log(10000.0) / (half - 1)))  # (half,)
    angles = scale * time[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(time.dtype)  # (B, dim)


class TimeEmbedding(nn.Module):
    """Sinusoids of the flow time through a SiLU MLP: (B,) → (B, hidden_size)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FEATURES, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(time_sinusoids(time))


class CodeEmbedding(nn.Module):
    """Codes (B, N) → (B, N·repeats, emb_dim): each code's embedding repeated for the frames it covers."""

    def __init__(self, num_embeds: int, dim: int, repeats: int) -> None:
        super().__init__()
        self.repeats = repeats
        self.codec_embed = nn.Embedding(num_embeds + 1, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codec_embed(codes).repeat_interleave(self.repeats, dim=1)


class InputEmbedding(nn.Module):
    """The frame and its conditioning, side by side, projected to the model's width; owns the speaker encoder."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        width = config.mel_dim + config.enc_dim + config.emb_dim + config.enc_emb_dim
        self.proj = nn.Linear(width, config.hidden_size)
        self.spk_encoder = SpeakerEncoder(config)

    def forward(self, x: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """x (B, T, mel_dim), conditions (B, T, enc_dim + emb_dim + enc_emb_dim) → (B, T, hidden_size)."""
        return self.proj(torch.cat([x, conditions], dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------------------------


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (T, head_dim/2), of positions × the rotary frequencies theta^(−2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def rotate_first_head(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on head 0 of x (B, H, T, head_dim), on the interleaved pairs (x0, x1), (x2, x3), …

    The checkpoints were trained with the rotation on the first head only. The rotated head is returned with
    its even components first and odd ones second (transformers' layout): queries and keys get the same
    permutation, so every dot product, hence the attention, is unchanged by it.
    """
    head = x[:, :1]  # (B, 1, T, head_dim)
    even, odd = head[..., 0::2], head[..., 1::2]  # each (B, 1, T, head_dim/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)  # (B, 1, T, head_dim)
    return torch.cat([rotated, x[:, 1:]], dim=1)


def block_mask(positions: torch.Tensor, block_size: int, look_back: int, look_ahead: int) -> torch.Tensor:
    """(T, T) bool, True where query i may attend to key j: block(j) − block(i) within [−look_back, look_ahead].

    Blocks are counted from frame 0 of the utterance, so ``positions`` (absolute frame indices) keep a window's
    blocks aligned with the whole utterance's.
    """
    blocks = positions // block_size  # (T,)
    diff = blocks[None, :] - blocks[:, None]  # (T, T): key's block − query's block
    return (diff >= -look_back) & (diff <= look_ahead)


class BlockAttention(nn.Module):
    """Multi-head self-attention within the allowed blocks, rotary positions on the first head."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        inner = self.n_head * self.head_dim
        self.to_q = nn.Linear(config.hidden_size, inner)
        self.to_k = nn.Linear(config.hidden_size, inner)
        self.to_v = nn.Linear(config.hidden_size, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, config.hidden_size), nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), rope cos/sin (T, head_dim/2), mask (T, T) bool → (B, T, d)."""
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, head_dim)
        k = self.to_k(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, head_dim)
        v = self.to_v(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, head_dim)
        q, k = rotate_first_head(q, *rope), rotate_first_head(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H·head_dim)
        return self.to_out(y)


class FeedForward(nn.Module):
    """Linear → GELU (tanh approximation) → dropout → Linear."""

    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class AdaLayerNormZero(nn.Module):
    """A LayerNorm without parameters of its own, and the ``chunks`` modulation vectors (shifts, scales, gates)
    that the time embedding sets for it (DiT's adaLN-Zero)."""

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, time_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, d) → ``chunks`` tensors of (B, d)."""
        return self.linear(F.silu(time_emb)).chunk(self.chunks, dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T, d) · (1 + scale) + shift, with shift and scale (B, d) the same for every frame."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """x + gate_a · attn(modulate(LN(x))), then x + gate_f · MLP(modulate(LN(x))); all six from the time."""

    def __init__(self, config: DiTConfig, look_back: int, look_ahead: int) -> None:
        super().__init__()
        self.look_back, self.look_ahead = look_back, look_ahead
        self.attn_norm = AdaLayerNormZero(config.hidden_size, 6)
        self.attn = BlockAttention(config)
        self.ff_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(config.hidden_size, config.ff_mult, config.dropout)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), time_emb (B, d), mask (T, T) for this block's reach → (B, T, d)."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.attn_norm(time_emb)
        x = x + gate_a[:, None] * self.attn(modulate(self.attn_norm.norm(x), shift_a, scale_a), rope, mask)
        return x + gate_f[:, None] * self.ff(modulate(self.ff_norm(x), shift_f, scale_f))


def _flags(drop: bool | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A per-row bool (B,) from one bool for the batch or a (B,) tensor."""
    if isinstance(drop, torch.Tensor):
        return drop.to(device=device, dtype=torch.bool).reshape(batch)
    return torch.full((batch,), bool(drop), device=device)


class DiT(nn.Module):
    """Token2wav's DiT (transformers' ``Qwen2_5OmniToken2WavDiTModel``); see the module docstring."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.time_embed = TimeEmbedding(d)
        self.text_embed = CodeEmbedding(config.num_embeds, config.emb_dim, config.repeats)
        self.input_embed = InputEmbedding(config)
        self.transformer_blocks = nn.ModuleList([
            DiTBlock(config, look_back=int(i in config.look_backward_layers),
                     look_ahead=int(i in config.look_ahead_layers))
            for i in range(config.num_hidden_layers)])
        self.norm_out = AdaLayerNormZero(d, 2)
        self.proj_out = nn.Linear(d, config.mel_dim)

    def conditions(self, reference: torch.Tensor, speaker: torch.Tensor, codes: torch.Tensor,
                   drop_reference: bool | torch.Tensor = False,
                   drop_codes: bool | torch.Tensor = False) -> torch.Tensor:
        """Every frame's conditioning (B, N·repeats, enc_dim + emb_dim + enc_emb_dim).

        reference (B, T_ref, mel_dim), speaker (B, enc_emb_dim), codes (B, N) long. ``drop_reference`` (one bool
        or (B,)) zeroes the reference mel and the speaker vector of those rows, ``drop_codes`` sets their codes
        to 0: together they make the unconditional branch of classifier-free guidance.
        """
        B = codes.shape[0]
        drop_ref = _flags(drop_reference, B, codes.device)
        reference = torch.where(drop_ref[:, None, None], torch.zeros_like(reference), reference)
        speaker = torch.where(drop_ref[:, None], torch.zeros_like(speaker), speaker)
        codes = torch.where(_flags(drop_codes, B, codes.device)[:, None], torch.zeros_like(codes), codes)
        code_emb = self.text_embed(codes)  # (B, T, emb_dim)
        T = code_emb.shape[1]
        voice = self.input_embed.spk_encoder(reference)  # (B, enc_dim)
        return torch.cat([voice[:, None].expand(B, T, -1), code_emb, speaker[:, None].expand(B, T, -1)], dim=-1)

    def velocity(self, x: torch.Tensor, conditions: torch.Tensor, time: torch.Tensor | float,
                 start: int = 0) -> torch.Tensor:
        """The predicted velocity (B, T, mel_dim) at noisy frames x (B, T, mel_dim).

        ``conditions`` from :meth:`conditions` for the same frames; ``time`` one flow time for the batch or one
        per row; ``start`` is the utterance frame of x[:, 0], so that a window of an utterance gets the
        utterance's positions and block boundaries.
        """
        B, T, _ = x.shape
        time = torch.as_tensor(time, dtype=x.dtype, device=x.device)
        time = time.reshape(-1).expand(B) if time.numel() == 1 else time.reshape(B)  # (B,)
        time_emb = self.time_embed(time)  # (B, d)
        h = self.input_embed(x, conditions)  # (B, T, d)
        positions = torch.arange(start, start + T, device=x.device)  # (T,)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        masks: dict[tuple[int, int], torch.Tensor] = {}  # one per distinct reach
        for block in self.transformer_blocks:
            reach = (block.look_back, block.look_ahead)
            if reach not in masks:
                masks[reach] = block_mask(positions, self.config.block_size, *reach)
            h = block(h, time_emb, rope, masks[reach])
        scale, shift = self.norm_out(time_emb)
        return self.proj_out(modulate(self.norm_out.norm(h), shift, scale))  # (B, T, mel_dim)

    def forward(self, x: torch.Tensor, reference: torch.Tensor, speaker: torch.Tensor, codes: torch.Tensor,
                time: torch.Tensor | float, *, drop_reference: bool | torch.Tensor = False,
                drop_codes: bool | torch.Tensor = False, start: int = 0) -> torch.Tensor:
        """Velocity (B, T, mel_dim) at noisy mel x (B, T, mel_dim), T = N·repeats.

        reference (B, T_ref, mel_dim) mel for the speaker encoder, speaker (B, enc_emb_dim), codes (B, N),
        time () or (B,). Equals transformers' DiT forward with ``apply_cfg=False``, ``drop_audio_conditioning``
        = drop_reference and ``drop_code`` = drop_codes (its ``speaker_embedding`` is our speaker repeated over
        the frames, its ``condition_vector`` our reference).
        """
        if codes.shape[1] * self.config.repeats != x.shape[1]:
            raise ValueError(f"{codes.shape[1]} codes cover {codes.shape[1] * self.config.repeats} frames, "
                             f"x has {x.shape[1]}")
        return self.velocity(x, self.conditions(reference, speaker, codes, drop_reference, drop_codes), time, start)


# ---------------------------------------------------------------------------------------------------------------
# Training objective
# ---------------------------------------------------------------------------------------------------------------


def flow_matching_loss(dit: DiT, mel: torch.Tensor, codes: torch.Tensor, reference: torch.Tensor,
                       speaker: torch.Tensor, generator: torch.Generator | None = None, *,
                       drop_reference_prob: float = 0.3, drop_all_prob: float = 0.2,
                       time: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Conditional flow matching (rectified flow) loss of ``dit`` on target mel (B, mel_dim, T), T = N·repeats.

    Per row: t ~ U(0, 1), noise ~ N(0, I), x_t = (1 − t)·noise + t·mel; the DiT's velocity at (t, x_t) is
    regressed (mean squared error over every frame and bin) on mel − noise, the velocity of that straight path,
    which is what :func:`sample` integrates from t = 0 to 1. No time is preferred in training (sway sampling is
    an inference-time choice).

    Conditioning dropout, per row, trains the unconditional branch that guidance needs: with ``drop_all_prob``
    the reference mel, the speaker vector and the codes are all dropped (exactly the unconditional branch of
    :func:`sample`); otherwise with ``drop_reference_prob`` only the reference mel and speaker vector are. The
    rates are a choice: transformers ships only inference, and 0.3 / 0.2 are the rates F5-TTS, whose DiT this
    one follows, trains its audio / all-conditions dropout with. Every row of a batch must have the same length
    (the DiT has no padding mask). ``time`` (B,) and ``noise`` (B, T, mel_dim) may be given to fix the draw;
    ``generator`` must live on ``mel``'s device.
    """
    target = mel.transpose(1, 2)  # (B, T, mel_dim), the DiT's layout
    B = target.shape[0]
    if time is None:
        time = torch.rand(B, generator=generator, device=mel.device, dtype=mel.dtype)
    if noise is None:
        noise = torch.randn(target.shape, generator=generator, device=mel.device, dtype=mel.dtype)
    drop_all = torch.rand(B, generator=generator, device=mel.device) < drop_all_prob  # (B,)
    drop_reference = drop_all | (torch.rand(B, generator=generator, device=mel.device) < drop_reference_prob)
    t = time.to(mel.dtype)[:, None, None]  # (B, 1, 1)
    x_t = (1 - t) * noise + t * target
    pred = dit(x_t, reference, speaker, codes, time, drop_reference=drop_reference, drop_codes=drop_all)
    return F.mse_loss(pred.float(), (target - noise).float())


# ---------------------------------------------------------------------------------------------------------------
# Sampling: ODE solvers, whole utterance, streaming
# ---------------------------------------------------------------------------------------------------------------


def time_grid(steps: int, sway_coefficient: float | None = -1.0, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
    """The ``steps`` flow times (``steps`` − 1 intervals) from 0 to 1: linspace bent by sway sampling,
    t + s·(cos(πt/2) − 1 + t), which keeps 0 and 1 fixed (s = None or 0: evenly spaced)."""
    if steps < 2:
        raise ValueError(f"the time grid needs at least 2 points (1 step), got {steps}")
    grid = torch.linspace(0, 1, steps, dtype=dtype, device=device)
    if sway_coefficient is not None:
        grid = grid + sway_coefficient * (torch.cos(math.pi / 2 * grid) - 1 + grid)
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"sway_coefficient {sway_coefficient} makes the time grid non-increasing: {grid.tolist()}")
    return grid


def ode_evaluations(steps: int, method: str) -> int:
    """Velocity evaluations, one after the other, that :func:`sample` makes: Euler 1 per interval, RK4 4."""
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r} (known: {', '.join(METHODS)})")
    return (steps - 1) * (4 if method == "rk4" else 1)


def ode_solve(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
              grid: torch.Tensor, method: str = "rk4") -> torch.Tensor:
    """x at grid[-1], integrating dx/dt = velocity(t, x) from x at grid[0] over each interval of ``grid``.

    "euler": x += h·v(t0, x). "rk4": the fourth-order Runge–Kutta 3/8 rule (what transformers' solver, called
    RK4, computes), with stages at t0, t0 + h/3, t0 + 2h/3 and t1:
    x += h/8 · (k1 + 3·k2 + 3·k3 + k4).
    """
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r} (known: {', '.join(METHODS)})")
    third = 1 / 3
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        h = t1 - t0
        k1 = velocity(t0, x)
        if method == "euler":
            x = x + h * k1
            continue
        k2 = velocity(t0 + h * third, x + h * k1 * third)
        k3 = velocity(t0 + h * (2 / 3), x + h * (k2 - k1 * third))
        k4 = velocity(t1, x + h * (k1 - k2 + k3))
        x = x + (k1 + 3 * (k2 + k3) + k4) * h / 8
    return x


def _guided(dit: DiT, conditions: torch.Tensor, guidance_scale: float,
            start: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The sampling velocity v(t, x): conditional, or v_c + g·(v_c − v_u) with ``conditions`` holding the
    conditional rows then the unconditional ones."""
    if guidance_scale < MIN_GUIDANCE:
        return lambda t, x: dit.velocity(x, conditions, t, start)

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cond, uncond = dit.velocity(torch.cat([x, x]), conditions, t, start).chunk(2)  # each (B, T, mel_dim)
        return cond + (cond - uncond) * guidance_scale

    return velocity


def _sampling_conditions(dit: DiT, reference: torch.Tensor, speaker: torch.Tensor, codes: torch.Tensor,
                         guidance_scale: float) -> torch.Tensor:
    """Conditions for the sampler: (B, …), or (2B, …) with the unconditional rows after the conditional ones."""
    if guidance_scale < MIN_GUIDANCE:
        return dit.conditions(reference, speaker, codes)
    return torch.cat([dit.conditions(reference, speaker, codes),
                      dit.conditions(reference, speaker, codes, drop_reference=True, drop_codes=True)])


@torch.no_grad()
def sample(dit: DiT, codes: torch.Tensor, reference: torch.Tensor, speaker: torch.Tensor, steps: int = 10,
           method: str = "rk4", *, guidance_scale: float = 0.5, sway_coefficient: float | None = -1.0,
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The mel (B, mel_dim, N·repeats) of codes (B, N), by integrating the DiT's flow from noise to t = 1.

    reference (B, T_ref, mel_dim) and speaker (B, enc_emb_dim) choose the voice. ``noise`` (B, N·repeats,
    mel_dim) is the start at t = 0 (default: drawn from ``generator`` in the reference's dtype). With
    ``method="rk4"`` this is transformers' ``Qwen2_5OmniToken2WavDiTModel.sample(speaker, reference, codes,
    steps, guidance_scale, sway_coefficient)`` given the same noise; ``"euler"`` takes the same grid and guidance
    with one evaluation per interval.
    """
    config = dit.config
    B, N = codes.shape
    frames = N * config.repeats
    if frames > config.max_position_embeddings:
        raise ValueError(f"{frames} mel frames exceed max_position_embeddings {config.max_position_embeddings}")
    shape = (B, frames, config.mel_dim)
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=reference.dtype, device=codes.device)
    if noise.shape != shape:
        raise ValueError(f"noise must be (B, N·repeats, mel_dim) = {shape}, got {tuple(noise.shape)}")
    grid = time_grid(steps, sway_coefficient, dtype=speaker.dtype, device=codes.device)
    conditions = _sampling_conditions(dit, reference, speaker, codes, guidance_scale)
    x = ode_solve(_guided(dit, conditions, guidance_scale, start=0), noise, grid, method)
    return x.transpose(1, 2)  # (B, mel_dim, T)


@torch.no_grad()
def sample_stream(dit: DiT, codes: torch.Tensor | Iterable[torch.Tensor], reference: torch.Tensor,
                  speaker: torch.Tensor, steps: int = 10, method: str = "rk4", *, guidance_scale: float = 0.5,
                  sway_coefficient: float | None = -1.0, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, past_blocks: int | None = None,
                  future_blocks: int | None = None) -> Iterator[torch.Tensor]:
    """The mel of an utterance block by block: yields (B, mel_dim, frames of block b) for b = 0, 1, …

    ``codes`` is the whole (B, N) tensor, or an iterable of (B, n_i) pieces in order, as a talker produces them;
    block b is sampled as soon as the codes reach the end of its window (or the pieces run out). Arguments are
    :func:`sample`'s, plus the window. Blocks are ``block_size`` frames counted from the utterance's first frame
    (``block_size`` must be a multiple of ``repeats``), the last one possibly shorter.

    Window. Block b is sampled by running the whole ODE (same grid, guidance, solver) on the frames of blocks
    [b − past_blocks, b + future_blocks] (clipped to the utterance), i.e. [previous blocks | block b |
    look-ahead blocks], with the utterance's positions and block boundaries, the codes of those frames and the
    same slice of the utterance's noise; frames of block b are kept. So chunk b depends on the codes and noise of
    exactly those frames (plus the reference and speaker, which are global). With ``noise`` None the noise is
    drawn block by block from ``generator``, each (B, block_size, mel_dim), and the utterance's noise is their
    concatenation cut to its length: pass that tensor to :func:`sample` to compare.

    Why and when it equals whole-utterance sampling. Attention never reaches past the neighbouring block, so one
    DiT evaluation gives block b from blocks b − n_back … b + n_ahead alone (n_back, n_ahead: how many layers
    look back / ahead). The sampler chains E = :func:`ode_evaluations` (steps, method) evaluations, each widening
    that reach, so the sampled block b depends on the noise and codes of blocks b − E·n_back … b + E·n_ahead and
    of no others. Hence, given the same noise slice, chunk b equals the whole utterance's frames (up to float
    summation order) whenever past_blocks ≥ E·n_back and future_blocks ≥ E·n_ahead (:func:`exact_window`). That
    is a bound: how much its farthest blocks actually move block b depends on the weights.

    The defaults, past_blocks = n_back and future_blocks = n_ahead ([2 previous blocks | block b | 1 look-ahead
    block] for Qwen2.5-Omni), are one evaluation's reach, for a latency of one block: exact when E = 1 (Euler with
    steps = 2); otherwise an approximation. Its only error is that the window's edge blocks lack their outside
    neighbours, so their states drift from the utterance's from the second evaluation on, and the drift reaches
    block b a few evaluations later.
    """
    config = dit.config
    bs, repeats = config.block_size, config.repeats
    if bs % repeats:
        raise ValueError(f"streaming needs block_size ({bs}) to be a multiple of repeats ({repeats})")
    past = config.n_look_back if past_blocks is None else past_blocks
    future = config.n_look_ahead if future_blocks is None else future_blocks
    if past < 0 or future < 0:
        raise ValueError(f"past_blocks ({past}) and future_blocks ({future}) cannot be negative")
    ode_evaluations(steps, method)  # checks the method
    grid = time_grid(steps, sway_coefficient, dtype=speaker.dtype, device=reference.device)
    B, mel_dim = reference.shape[0], config.mel_dim

    noise_blocks: list[torch.Tensor] = []

    def noise_slice(lo: int, hi: int) -> torch.Tensor:
        if noise is not None:
            if noise.shape[1] < hi:
                raise ValueError(f"noise covers {noise.shape[1]} frames, the utterance has at least {hi}")
            return noise[:, lo:hi]
        while len(noise_blocks) * bs < hi:
            noise_blocks.append(torch.randn((B, bs, mel_dim), generator=generator, dtype=reference.dtype,
                                            device=reference.device))
        return torch.cat(noise_blocks[lo // bs: -(-hi // bs)], dim=1)[:, : hi - lo]

    def block(b: int, all_codes: torch.Tensor) -> torch.Tensor:
        frames = all_codes.shape[1] * repeats
        lo, hi = max(0, b - past) * bs, min((b + future + 1) * bs, frames)  # window, in utterance frames
        if hi > config.max_position_embeddings:
            raise ValueError(f"{hi} mel frames exceed max_position_embeddings {config.max_position_embeddings}")
        window_codes = all_codes[:, lo // repeats: hi // repeats]  # (B, (hi − lo) / repeats)
        conditions = _sampling_conditions(dit, reference, speaker, window_codes, guidance_scale)
        x = ode_solve(_guided(dit, conditions, guidance_scale, start=lo), noise_slice(lo, hi), grid, method)
        return x[:, b * bs - lo: min((b + 1) * bs, frames) - lo].transpose(1, 2)  # (B, mel_dim, ≤ block_size)

    stream = [codes] if isinstance(codes, torch.Tensor) else codes
    all_codes: torch.Tensor | None = None
    b = 0
    for piece in stream:
        all_codes = piece if all_codes is None else torch.cat([all_codes, piece], dim=1)  # (B, codes so far)
        # Block b's window is complete once the codes reach the end of its last look-ahead block.
        while (b + future + 1) * bs <= all_codes.shape[1] * repeats:
            yield block(b, all_codes)
            b += 1
    if all_codes is None:
        return
    while b * bs < all_codes.shape[1] * repeats:  # the stream has ended: the last blocks see its end
        yield block(b, all_codes)
        b += 1


def exact_window(config: DiTConfig, steps: int, method: str) -> tuple[int, int]:
    """(past_blocks, future_blocks) for which :func:`sample_stream` equals :func:`sample` exactly: every block
    the sampled block depends on, E·n_back behind and E·n_ahead ahead for E ODE evaluations."""
    evaluations = ode_evaluations(steps, method)
    return evaluations * config.n_look_back, evaluations * config.n_look_ahead
