"""Vocoders: a mel spectrogram back to a waveform, behind one seam (:class:`Vocoder`).

Two vocoders, each reading the mel convention of the model that produces it:

- :class:`GriffinLimVocoder` / :func:`griffin_lim` read the Whisper-style log-mel of :mod:`omnilm.omni.audio`
  (128 Slaney bins, 16 kHz, n_fft 400, hop 160, log10 power, (x + 4) / 4) and write 16 kHz audio. Nothing is
  learned: the normalisation is undone, the mel filterbank is inverted by non-negative least squares, and the
  missing phase is found by fast Griffin–Lim (Perraudin, Balazs and Søndergaard, 2013): alternate projections
  between spectra of the wanted magnitude and consistent spectra (those some signal has), with momentum. The
  STFT and its inverse are written here (:func:`stft`, :func:`istft`) on ``torch.fft``; they equal
  ``torch.stft`` / ``torch.istft`` with ``center=True`` and reflect padding.
- :class:`BigVGAN` is Qwen2.5-Omni's token2wav vocoder (transformers' ``Qwen2_5OmniToken2WavBigVGANModel``):
  natural-log mel amplitudes (80 bins, the DiT's output) → waveform at ``BigVGANConfig.sample_rate`` (24 kHz
  for the released model: 100 mel frames per second, ``hop_length`` = ∏ upsample_rates = 240 samples each).
  Module and parameter names are transformers', so a state dict loads 1:1. transformers stores plain conv
  weights (weight norm already folded in); :func:`fold_weight_norm` folds a weight-normed checkpoint into
  that layout. The anti-aliasing filters are non-persistent buffers computed at construction, as in
  transformers.

BigVGAN, top-down: conv_pre (7 taps) → for each upsampling stage: transposed conv (÷2 channels, ×rate time), then
the mean of ``len(resblock_kernel_sizes)`` AMP blocks → anti-aliased SnakeBeta → conv_post (7 taps, 1 channel,
no bias) → clamp to [-1, 1]. An AMP block is three residual pairs ``x + conv2(act(conv1(act(x))))`` (conv1
dilated 1/3/5, conv2 undilated), where act is SnakeBeta evaluated at twice the rate: upsample ×2 with a
Kaiser-windowed sinc, x + sin²(αx)/β, low-pass and decimate ×2, so that the harmonics the sine makes do not
alias back into the band.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ConfigError
from omnilm.omni.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, mel_filter_bank


@runtime_checkable
class Vocoder(Protocol):
    """Mel spectrogram → waveform. ``log_mel`` is (n_mels, frames) or (B, n_mels, frames) in the vocoder's own mel
    convention; the waveform is (samples,) or (B, samples) at ``sample_rate`` Hz, in [-1, 1]."""

    sample_rate: int

    def vocode(self, log_mel: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------------------
# STFT and its inverse
# ---------------------------------------------------------------------------------------------------------------


def _window(window: torch.Tensor | None, n_fft: int, like: torch.Tensor) -> torch.Tensor:
    """The analysis window on ``like``'s device, in its real dtype (periodic Hann by default, as in audio.py)."""
    dtype = like.real.dtype if like.is_complex() else like.dtype
    if window is None:
        return torch.hann_window(n_fft, dtype=dtype, device=like.device)
    if window.shape != (n_fft,):
        raise ValueError(f"window must have shape ({n_fft},), got {tuple(window.shape)}")
    return window.to(device=like.device, dtype=dtype)


def stft(waveform: torch.Tensor, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
         window: torch.Tensor | None = None, center: bool = True) -> torch.Tensor:
    """Short-time Fourier transform of (..., samples) → complex (..., n_fft // 2 + 1, frames).

    Frame t is ``padded[t·hop : t·hop + n_fft] · window``, one-sided and unnormalised. With ``center`` the signal is
    first reflected by n_fft // 2 samples at both ends (so it needs more than n_fft // 2 samples), which centres
    frame t on sample t·hop and gives samples // hop + 1 frames (for even n_fft). Equals ``torch.stft(...,
    center=center, pad_mode="reflect", return_complex=True)``.
    """
    lead, samples = waveform.shape[:-1], waveform.shape[-1]
    x = waveform.reshape(-1, samples)  # (N, samples)
    if center:
        pad = n_fft // 2
        if samples <= pad:
            raise ValueError(f"a centred STFT reflects {pad} samples at each end and needs more than that, "
                             f"got {samples}")
        x = F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]  # (N, samples + 2·pad)
    if x.shape[-1] < n_fft:
        raise ValueError(f"{x.shape[-1]} samples (after padding) are fewer than one frame of {n_fft}")
    frames = x.unfold(-1, n_fft, hop_length)  # (N, T, n_fft), a view: frame t starts at t·hop
    spectrum = torch.fft.rfft(frames * _window(window, n_fft, x), dim=-1)  # (N, T, n_fft // 2 + 1)
    return spectrum.transpose(1, 2).reshape(*lead, n_fft // 2 + 1, -1)  # (..., bins, T)


def istft(spectrum: torch.Tensor, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
          window: torch.Tensor | None = None, center: bool = True, length: int | None = None) -> torch.Tensor:
    """Inverse of :func:`stft`: complex (..., n_fft // 2 + 1, frames) → (..., samples).

    Least-squares overlap-add (Griffin and Lim, 1984): each frame's inverse FFT is windowed again and added at its
    place, and the sum is divided by the overlap of the squared windows, so a consistent spectrum comes back
    exactly. Samples no window reaches are zero. With ``center`` the n_fft // 2 reflected samples are cut from
    the front. ``length`` cuts or zero-pads the result; by default it is (frames - 1)·hop (with ``center``).
    Equals ``torch.istft`` with the same arguments.
    """
    lead, (bins, n_frames) = spectrum.shape[:-2], spectrum.shape[-2:]
    if bins != n_fft // 2 + 1:
        raise ValueError(f"a one-sided spectrum of n_fft {n_fft} has {n_fft // 2 + 1} bins, got {bins}")
    z = spectrum.reshape(-1, bins, n_frames).transpose(1, 2)  # (N, T, bins)
    w = _window(window, n_fft, z)
    frames = torch.fft.irfft(z, n=n_fft, dim=-1) * w  # (N, T, n_fft)
    total = n_fft + hop_length * (n_frames - 1)
    # fold sums the (1 × n_fft) blocks placed every hop samples: overlap-add in one call.
    fold = dict(output_size=(1, total), kernel_size=(1, n_fft), stride=(1, hop_length))
    signal = F.fold(frames.transpose(1, 2), **fold).reshape(-1, total)  # (N, total)
    envelope = F.fold((w * w)[None, :, None].expand(1, n_fft, n_frames), **fold).reshape(total)  # (total,)
    # Where no window reaches (or only its zero end does) there is nothing to recover; torch.istft refuses such
    # spectra, we leave zeros.
    reached = envelope > 1e-11
    signal = torch.where(reached, signal / torch.where(reached, envelope, 1.0), 0.0)
    start = n_fft // 2 if center else 0
    end = total - start if length is None else start + length
    signal = signal[:, start:end]  # (N, ≤ length)
    if length is not None and signal.shape[-1] < length:
        signal = F.pad(signal, (0, length - signal.shape[-1]))
    return signal.reshape(*lead, -1)


# ---------------------------------------------------------------------------------------------------------------
# Griffin–Lim from the Whisper-style log-mel
# ---------------------------------------------------------------------------------------------------------------


def mel_to_power(log_mel: torch.Tensor, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                 nnls_iterations: int = 200) -> torch.Tensor:
    """The power spectrogram (..., n_fft // 2 + 1, frames) behind a Whisper-style log-mel (..., n_mels, frames).

    The normalisation is undone (mel power = 10^(4x - 4); what Whisper floored at 80 dB below the loudest bin stays
    at that floor), then every frame's mel power m is inverted by non-negative least squares,
    argmin_{p ≥ 0} ‖Aᵀp - m‖² with A the (bins, n_mels) filterbank: the pseudo-inverse's solution, clipped at
    0, refined by ``nnls_iterations`` steps of accelerated projected gradient (FISTA). Above ~1 kHz a mel band
    covers several FFT bins and the minimum-norm answer spreads its power evenly over them; below, several bands
    share a bin and least squares reconciles them. Float64 inside; returns ``log_mel``'s dtype.
    """
    n_mels, n_frames = log_mel.shape[-2:]
    lead = log_mel.shape[:-2]
    mel_power = torch.pow(10.0, 4.0 * log_mel.double() - 4.0)  # (..., n_mels, T)
    m = mel_power.reshape(-1, n_mels, n_frames).transpose(0, 1).reshape(n_mels, -1)  # (n_mels, N·T), frames as columns
    filters = mel_filter_bank(n_mels, n_fft, sample_rate).to(m.device)  # (bins, n_mels)
    power = (torch.linalg.pinv(filters.T) @ m).clamp(min=0.0)  # (bins, N·T)
    gram, target = filters @ filters.T, filters @ m  # (bins, bins), (bins, N·T): the gradient is gram·p - target
    step = 1.0 / torch.linalg.matrix_norm(gram, ord=2)  # 1 / Lipschitz constant of the gradient
    y, t = power, 1.0
    for _ in range(nnls_iterations):
        nxt = (y - step * (gram @ y - target)).clamp(min=0.0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = nxt + ((t - 1.0) / t_next) * (nxt - power)
        power, t = nxt, t_next
    bins = power.shape[0]
    power = power.reshape(bins, -1, n_frames).transpose(0, 1).reshape(*lead, bins, n_frames)  # (..., bins, T)
    return power.to(log_mel.dtype if log_mel.is_floating_point() else torch.float32)


def _phase(z: torch.Tensor) -> torch.Tensor:
    """z / |z|, with 1 where z is 0."""
    magnitude = z.abs()
    return torch.where(magnitude > 0, z / magnitude.clamp(min=1e-30), torch.ones_like(z))


def griffin_lim_magnitude(magnitude: torch.Tensor, iterations: int = 100, momentum: float = 0.99,
                          length: int | None = None, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
                          seed: int = 0) -> torch.Tensor:
    """A signal whose STFT magnitude is close to ``magnitude`` (..., n_fft // 2 + 1, frames): fast Griffin–Lim.

    Starting from random phases (``seed``; the same for every leading index), each iteration projects onto the
    consistent spectra, c_n = STFT(ISTFT(|S|·phase(t_{n-1}))), and extrapolates t_n = c_n + momentum·(c_n -
    c_{n-1}); momentum 0 is the original Griffin–Lim, and Perraudin et al. recommend 0.99. ``iterations`` 0 is
    the random-phase baseline. Returns (..., length) samples, (frames - 1)·hop by default (the STFT is centred).
    """
    if iterations < 0 or not 0.0 <= momentum < 2.0:
        raise ValueError(f"need iterations ≥ 0 and momentum in [0, 2), got {iterations} and {momentum}")
    magnitude = magnitude.float() if not magnitude.is_floating_point() else magnitude
    window = torch.hann_window(n_fft, dtype=magnitude.dtype, device=magnitude.device)
    generator = torch.Generator().manual_seed(seed)
    # One draw of (bins, T) shared by every leading index, so a row gets the same start alone or in a batch.
    angles = torch.rand(magnitude.shape[-2:], generator=generator, dtype=magnitude.dtype) * (2 * math.pi)
    t = torch.polar(torch.ones_like(magnitude), angles.to(magnitude.device).expand_as(magnitude))  # unit phases
    n_samples = (magnitude.shape[-1] - 1) * hop_length
    previous = magnitude * t  # c_0 = t_0, the starting spectrum
    for _ in range(iterations):
        signal = istft(magnitude * _phase(t), n_fft, hop_length, window, length=n_samples)
        c = stft(signal, n_fft, hop_length, window)  # (..., bins, T)
        t = c + momentum * (c - previous)
        previous = c
    return istft(magnitude * _phase(t), n_fft, hop_length, window, length=n_samples if length is None else length)


def griffin_lim(log_mel: torch.Tensor, iterations: int = 100, momentum: float = 0.99, seed: int = 0,
                nnls_iterations: int = 200) -> torch.Tensor:
    """16 kHz audio (..., frames·160) for a Whisper-style log-mel (..., n_mels, frames) from :mod:`omnilm.omni.audio`.

    :func:`mel_to_power` gives the magnitude |S| = √power; Whisper dropped the STFT's last frame (centred past the
    end of the audio), so the last frame is repeated to restore it; then :func:`griffin_lim_magnitude`.
    """
    if log_mel.shape[-1] < 2:  # the centred STFT of each iteration reflects 200 samples: it needs 2 frames' worth
        raise ValueError(f"griffin_lim needs at least 2 frames, got {log_mel.shape[-1]}")
    magnitude = mel_to_power(log_mel, nnls_iterations=nnls_iterations).sqrt()  # (..., bins, T)
    magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)  # (..., bins, T + 1)
    return griffin_lim_magnitude(magnitude, iterations, momentum, length=log_mel.shape[-1] * HOP_LENGTH, seed=seed)


@dataclass(frozen=True)
class GriffinLimVocoder:
    """The :class:`Vocoder` for Whisper-style log-mels: :func:`griffin_lim` with fixed settings, 16 kHz out."""

    iterations: int = 100
    momentum: float = 0.99
    seed: int = 0
    sample_rate: int = SAMPLE_RATE

    def vocode(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(…, 128, frames) Whisper-style log-mel → (…, frames·160) samples at 16 kHz, clipped to [-1, 1]."""
        return griffin_lim(log_mel, self.iterations, self.momentum, self.seed).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# BigVGAN (Qwen2.5-Omni token2wav layout)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BigVGANConfig:
    """Qwen2.5-Omni's BigVGAN; field names are transformers' ``Qwen2_5OmniBigVGANConfig`` (defaults: the released
    model's), plus ``sample_rate``, which its config.json does not record."""

    #: Mel bins of the input.
    mel_dim: int = 80
    #: Channels after conv_pre; every upsampling stage halves them.
    upsample_initial_channel: int = 1536
    #: Kernel size of each AMP block per stage, and its three dilations.
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    #: Time upsampling factor and transposed-conv kernel of each stage.
    upsample_rates: tuple[int, ...] = (5, 3, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 7, 4, 4, 4, 4)
    #: Output rate in Hz: Qwen2.5-Omni writes its speech at 24 kHz (mel frames every 10 ms, 240 samples each).
    sample_rate: int = 24_000

    def __post_init__(self) -> None:
        for name in ("resblock_kernel_sizes", "upsample_rates", "upsample_kernel_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "resblock_dilation_sizes",
                           tuple(tuple(int(d) for d in ds) for ds in self.resblock_dilation_sizes))
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ConfigError(f"upsample_rates {self.upsample_rates} and upsample_kernel_sizes "
                              f"{self.upsample_kernel_sizes} must have one entry per stage")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ConfigError(f"resblock_kernel_sizes {self.resblock_kernel_sizes} and resblock_dilation_sizes "
                              f"{self.resblock_dilation_sizes} must have one entry per AMP block")
        if any(len(ds) != 3 for ds in self.resblock_dilation_sizes):
            raise ConfigError(f"an AMP block has three dilated convolutions, got {self.resblock_dilation_sizes}")
        if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
            raise ConfigError(f"upsample_initial_channel {self.upsample_initial_channel} must halve "
                              f"{len(self.upsample_rates)} times")

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame (exact when every kernel - rate is even, as in the released model)."""
        return math.prod(self.upsample_rates)


def bigvgan_config_to_hf(config: BigVGANConfig) -> dict[str, Any]:
    """transformers' ``Qwen2_5OmniBigVGANConfig`` as a dict (``token2wav_config.bigvgan_config`` of a config.json)."""
    return {"model_type": "qwen2_5_omni_bigvgan", "mel_dim": config.mel_dim,
            "upsample_initial_channel": config.upsample_initial_channel,
            "resblock_kernel_sizes": list(config.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(ds) for ds in config.resblock_dilation_sizes],
            "upsample_rates": list(config.upsample_rates), "upsample_kernel_sizes": list(config.upsample_kernel_sizes)}


def bigvgan_config_from_hf(hf: Mapping[str, Any] | Any, sample_rate: int = 24_000,
                           source: str = "config.json") -> BigVGANConfig:
    """A BigVGANConfig from transformers' BigVGAN config (a dict or the config object), or from a whole
    Qwen2.5-Omni config.json / its ``token2wav_config``."""
    values = dict(hf.to_dict() if hasattr(hf, "to_dict") else hf)
    if values.get("model_type") == "qwen2_5_omni":
        values = dict(values["token2wav_config"])
    if values.get("model_type") == "qwen2_5_omni_token2wav":
        values = dict(values["bigvgan_config"])
    if values.get("model_type", "qwen2_5_omni_bigvgan") != "qwen2_5_omni_bigvgan":
        raise ConfigError(f"{source}: model_type {values.get('model_type')!r} is not a Qwen2.5-Omni BigVGAN")
    names = {f.name for f in fields(BigVGANConfig)} - {"sample_rate"}
    return BigVGANConfig(**{k: v for k, v in values.items() if k in names}, sample_rate=sample_rate)


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A low-pass FIR of ``kernel_size`` taps, (kernel_size,) float32, summing to 1.

    An ideal low-pass at ``cutoff`` (cycles per sample) times a Kaiser window whose β comes from Kaiser's design
    formula for a transition band of ``half_width`` each side of the cutoff. Even sizes are centred between two
    samples. The numbers are the ones BigVGAN was trained with (transformers' ``kaiser_sinc_filter1d``), including
    its estimate of the attenuation from half the filter length.
    """
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95  # dB
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21.0) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    if cutoff == 0:
        return torch.zeros(kernel_size)
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta, dtype=torch.float32)
    time = torch.arange(kernel_size) - (kernel_size - 1) / 2  # (K,) offsets from the centre (± k + ½ when K is even)
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return taps / taps.sum()  # unit DC gain


class SnakeBeta(nn.Module):
    """x + sin²(αx)/β per channel, α and β stored as logs (so both stay positive while training)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) → (B, C, T)."""
        alpha = self.alpha.exp()[None, :, None]  # (1, C, 1)
        beta = self.beta.exp()[None, :, None]  # (1, C, 1)
        return x + torch.sin(x * alpha).pow(2) / (beta + 1e-9)


class UpSample1d(nn.Module):
    """×ratio in time: zero-stuffing and a Kaiser-sinc low-pass in one depthwise transposed conv.

    The input is replicate-padded first (so the edges do not ring towards zero) and the padding's share of the
    output is cut again: T → ratio·T.
    """

    def __init__(self, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.ratio, self.kernel_size = ratio, kernel_size
        self.pad = kernel_size // ratio - 1  # input samples of context each side
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        # Scaled by ratio: zero-stuffing divides the signal's energy per output sample by ratio.
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) → (B, C, ratio·T)."""
        channels = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")  # (B, C, T + 2·pad)
        kernel = self.filter.to(x.dtype)[None, None].expand(channels, 1, -1)  # (C, 1, K), one filter per channel
        y = self.ratio * F.conv_transpose1d(x, kernel, stride=self.ratio, groups=channels)
        return y[..., self.crop_left:y.shape[-1] - self.crop_right]  # (B, C, ratio·T)


class DownSample1d(nn.Module):
    """÷ratio in time: a Kaiser-sinc low-pass (replicate-padded to keep the length) evaluated every ratio samples."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.ratio, self.kernel_size = ratio, kernel_size
        self.pad_left = kernel_size // 2 - (1 if kernel_size % 2 == 0 else 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) → (B, C, ceil(T / ratio))."""
        channels = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")  # (B, C, T + K - 1)
        kernel = self.filter.to(x.dtype)[None, None].expand(channels, 1, -1)  # (C, 1, K)
        return F.conv1d(x, kernel, stride=self.ratio, groups=channels)


class AntiAliasedActivation(nn.Module):
    """SnakeBeta at twice the sample rate: upsample ×2, activate, low-pass and decimate ×2 (T → T)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = UpSample1d(2, 12)
        self.downsample = DownSample1d(2, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) → (B, C, T)."""
        return self.downsample(self.act(self.upsample(x)))


class AMPBlock(nn.Module):
    """Three residual pairs x + conv2(act(conv1(act(x)))): conv1 with the given dilations, conv2 undilated.

    ``activations`` interleaves the two activations of each pair (2i before convs1[i], 2i + 1 before convs2[i]),
    which is how transformers numbers them.
    """

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()

        def conv(dilation: int) -> nn.Conv1d:  # "same" length: padding covers the dilated kernel's reach
            return nn.Conv1d(channels, channels, kernel_size, dilation=dilation,
                             padding=(kernel_size * dilation - dilation) // 2)

        self.convs1 = nn.ModuleList([conv(d) for d in dilations])
        self.convs2 = nn.ModuleList([conv(1) for _ in dilations])
        self.activations = nn.ModuleList([AntiAliasedActivation(channels) for _ in range(2 * len(dilations))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) → (B, C, T)."""
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            x = x + conv2(self.activations[2 * i + 1](conv1(self.activations[2 * i](x))))
        return x


class BigVGAN(nn.Module):
    """Qwen2.5-Omni's vocoder: natural-log mel amplitudes (B, mel_dim, frames) → waveform (B, frames·hop_length).

    ``ups[i]`` holds its transposed conv inside a one-element ModuleList (``ups.{i}.0.weight``) because that is how
    the released state dict names it. ``resblocks`` is flat, stage-major: stage i owns blocks
    i·len(resblock_kernel_sizes) onwards.
    """

    def __init__(self, config: BigVGANConfig) -> None:
        super().__init__()
        self.config = config
        c0 = config.upsample_initial_channel
        n_blocks = len(config.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(config.mel_dim, c0, 7, padding=3)
        # Stage i maps c0 / 2^i channels to c0 / 2^(i+1) and stretches time by its rate; the padding centres the
        # kernel so that T frames become rate·T samples (when kernel - rate is even).
        self.ups = nn.ModuleList([
            nn.ModuleList([nn.ConvTranspose1d(c0 // 2 ** i, c0 // 2 ** (i + 1), k, rate, padding=(k - rate) // 2)])
            for i, (rate, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True))])
        self.resblocks = nn.ModuleList([
            AMPBlock(c0 // 2 ** (i + 1), k, dilations)
            for i in range(len(config.upsample_rates))
            for k, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True)])
        self.n_blocks = n_blocks
        c_last = c0 // 2 ** len(config.upsample_rates)
        self.activation_post = AntiAliasedActivation(c_last)
        self.conv_post = nn.Conv1d(c_last, 1, 7, padding=3, bias=False)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @staticmethod
    def normalise_mel(log_mel: torch.Tensor) -> torch.Tensor:
        """Natural-log amplitudes → the network's input scale: dB, 20 dB down, [-115, 0] dB mapped onto [-1, 1].

        Amplitudes below -115 dB are floored there (the same floor as the clamp, so it decides nothing the clamp
        would not); the -20 dB offset is the reference level the vocoder was trained with.
        """
        min_db = -115.0
        floor = min_db / 20.0 * math.log(10.0)  # -115 dB as a natural-log amplitude
        db = (20.0 / math.log(10.0)) * log_mel.clamp(min=floor) - 20.0
        return (2.0 * (db - min_db) / -min_db - 1.0).clamp(-1.0, 1.0)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """log_mel (B, mel_dim, T) → waveform (B, T·hop_length) in [-1, 1]."""
        x = self.conv_pre(self.normalise_mel(log_mel))  # (B, c0, T)
        for i, (up,) in enumerate(self.ups):
            x = up(x)  # (B, c0 / 2^(i+1), T·∏ rates so far)
            blocks = self.resblocks[i * self.n_blocks:(i + 1) * self.n_blocks]
            x = sum(block(x) for block in blocks) / self.n_blocks  # multi-receptive-field fusion: the blocks' mean
        x = self.conv_post(self.activation_post(x))  # (B, 1, samples)
        return x.clamp(-1.0, 1.0)[:, 0]  # (B, samples)

    @torch.no_grad()
    def vocode(self, log_mel: torch.Tensor) -> torch.Tensor:
        """:class:`Vocoder` entry: (mel_dim, T) or (B, mel_dim, T) → (samples,) or (B, samples) at sample_rate."""
        single = log_mel.dim() == 2
        x = log_mel[None] if single else log_mel
        wave = self(x.to(self.conv_pre.weight.dtype))
        return wave[0] if single else wave

    def load_hf_state_dict(self, state: Mapping[str, torch.Tensor],
                           prefix: str = "token2wav.code2wav_bigvgan_model.") -> None:
        """Load transformers' BigVGAN tensors, bare or under ``prefix`` (a whole Qwen2.5-Omni checkpoint's
        other tensors are ignored); weight-normed tensors are folded first. Missing or extra BigVGAN tensors fail."""
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else {}
        self.load_state_dict(fold_weight_norm(own or dict(state)), strict=True)


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every weight-normed tensor replaced by its plain ``weight`` = g · v / ‖v‖.

    Both spellings are folded: ``X.weight_g`` / ``X.weight_v`` (``torch.nn.utils.weight_norm``) and
    ``X.parametrizations.weight.original0`` / ``original1`` (its parametrization successor). ‖v‖ is taken over
    every axis on which g has size 1 (all but dim 0 by default; BigVGAN's transposed convs were normed so too).
    """
    out: dict[str, torch.Tensor] = {}
    pairs = {".weight_g": ".weight_v", ".parametrizations.weight.original0": ".parametrizations.weight.original1"}
    for key, value in state.items():
        for g_suffix, v_suffix in pairs.items():
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                v = state[base + v_suffix]
                dims = [d for d in range(v.dim()) if value.shape[d] == 1]
                norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()
                out[base + ".weight"] = value * v / norm
                break
            if key.endswith(v_suffix):
                break
        else:
            out[key] = value
    return out
