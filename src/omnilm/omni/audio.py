"""The Thinker's ears: waveform → log-mel features → audio tokens (Qwen2.5-Omni layout).

Front end. Audio is read from WAV (16-bit PCM, any rate, mono or stereo), mixed down to mono and resampled to
16 kHz. A 25 ms Hann window (400 samples) slides by 10 ms (160 samples); the power spectrum goes through 128
Slaney mel filters and is compressed as Whisper does: log10, floored at (loudest − 8), then (x + 4) / 4. So one
second of audio is 100 frames. :func:`audio_features` reproduces what Qwen2.5-Omni's processor hands the
Thinker for a batch: every audio zero-padded to 300 s, plus a mask of the frames that hold audio.

Encoder. :class:`AudioEncoder` is Whisper's encoder run on 2-second chunks (2·n_window frames). Within a chunk:
conv (stride 1) → GELU → conv (stride 2) → GELU, sinusoidal positions that restart at every chunk, and pre-norm
transformer layers whose attention never leaves the chunk. Chunks are therefore independent, which is what lets
audio be encoded as it streams in. Per audio the chunk outputs are put back in order, averaged in pairs, normed
and projected to the decoder's width: one token per 40 ms. Module and parameter names are those of transformers'
``Qwen2_5OmniAudioEncoder``, so its state dict loads as is.
"""

from __future__ import annotations

import math
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnilm.omni.config import AudioEncoderConfig

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
N_MELS = 128
#: Qwen2.5-Omni's processor pads (and truncates) every audio to 300 s (its preprocessor_config: chunk_length 300).
MAX_SAMPLES = 300 * SAMPLE_RATE

# Power below this is treated as silence before the log (log10 → -10).
_POWER_FLOOR = 1e-10

AudioLike = torch.Tensor | np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# Front end: mel filters, log-mel features, the Thinker's padded batch
# ---------------------------------------------------------------------------------------------------------------


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic (27 mels per ×6.4) above."""
    log_region = hz >= 1000.0
    linear = 3.0 * hz / 200.0
    log = 15.0 + torch.log(hz.clamp(min=1000.0) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(log_region, log, linear)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_hz_to_mel`."""
    log_region = mel >= 15.0
    linear = 200.0 * mel / 3.0
    log = 1000.0 * torch.exp((mel.clamp(min=15.0) - 15.0) * (math.log(6.4) / 27.0))
    return torch.where(log_region, log, linear)


def mel_filter_bank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                    f_min: float = 0.0, f_max: float = 8000.0) -> torch.Tensor:
    """Slaney-normalised triangular mel filters, shape ``(n_fft // 2 + 1, n_mels)``, float64.

    Filter m rises linearly (in Hz) from edge m to edge m+1 and falls to edge m+2, the n_mels + 2 edges being
    evenly spaced on the Slaney mel scale between ``f_min`` and ``f_max``; each triangle is scaled by 2 / its
    width so that every band has the same area (what Whisper, librosa and transformers use).
    """
    edges_mel = torch.linspace(float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
                               float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64))), n_mels + 2,
                               dtype=torch.float64)
    edges = _mel_to_hz(edges_mel)  # (n_mels + 2,) Hz
    bins = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1, dtype=torch.float64)  # (n_bins,) Hz
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # each (n_mels,)
    rising = (bins[:, None] - lower) / (centre - lower)  # (n_bins, n_mels)
    falling = (upper - bins[:, None]) / (upper - centre)  # (n_bins, n_mels)
    triangles = torch.minimum(rising, falling).clamp(min=0.0)
    return triangles * (2.0 / (upper - lower))


def _log10_mel(waveform: torch.Tensor, n_mels: int) -> torch.Tensor:
    """log10 mel power of ``waveform`` (..., samples) → (..., n_mels, samples // HOP_LENGTH), before normalisation.

    ``torch.stft`` centres frame t on sample t·160 (reflecting the signal at both ends) and so yields
    samples // 160 + 1 frames; Whisper drops the last one, and so do we.
    """
    lead = waveform.shape[:-1]
    flat = waveform.reshape(-1, waveform.shape[-1]).float()  # (N, samples)
    window = torch.hann_window(N_FFT, device=flat.device)
    spectrum = torch.stft(flat, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (N, n_fft//2+1, frames+1)
    power = spectrum[..., :-1].abs() ** 2  # (N, n_fft//2+1, frames)
    filters = mel_filter_bank(n_mels).to(device=flat.device, dtype=torch.float32)  # (n_fft//2+1, n_mels)
    mel = filters.T @ power  # (N, n_mels, frames)
    return mel.clamp(min=_POWER_FLOOR).log10().reshape(*lead, n_mels, -1)  # (..., n_mels, frames)


def _whisper_normalise(log_mel: torch.Tensor) -> torch.Tensor:
    """Whisper's compression of (..., n_mels, frames): keep 80 dB below each audio's loudest bin, scale to ~[-1, 1]."""
    loudest = log_mel.amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    return (torch.maximum(log_mel, loudest - 8.0) + 4.0) / 4.0


def log_mel_spectrogram(waveform: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """Whisper-style log-mel features of 16 kHz audio, without padding.

    ``waveform`` is (..., samples), at least 201 samples (the STFT reflects 200 samples at each end); returns
    float32 (..., n_mels, samples // 160), normalised per leading index. Equal to transformers'
    ``WhisperFeatureExtractor(feature_size=n_mels)`` called with ``padding="do_not_pad"``.
    """
    return _whisper_normalise(_log10_mel(waveform, n_mels))


def _as_tensor(audio: AudioLike) -> torch.Tensor:
    tensor = torch.as_tensor(audio).float()
    if tensor.dim() != 1:
        raise ValueError(f"expected mono audio of shape (samples,), got shape {tuple(tensor.shape)}")
    return tensor


def audio_features(waveforms: Sequence[AudioLike], n_mels: int = N_MELS, max_samples: int = MAX_SAMPLES,
                   trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The Thinker's audio inputs for a batch of 16 kHz mono waveforms of any lengths.

    Returns ``(input_features, feature_attention_mask)``: float32 (B, n_mels, max_samples // 160) and int32
    (B, max_samples // 160). As Qwen2.5-Omni's processor does (WhisperFeatureExtractor with
    ``padding="max_length"``, truncation, ``return_attention_mask=True``), every waveform is cut to ``max_samples``
    and zero-padded to it before the STFT, so the last frames of an audio see zeros rather than a reflection of
    itself; the mask marks frame t as audio when sample t·160 is (ceil(samples / 160) frames). With ``trim`` the
    frames stop after the longest audio's last one: the same values where the mask is 1, without the silence
    every audio would otherwise carry to 300 s (padding frames sit at the floor, so no maximum changes).
    """
    if not waveforms:
        raise ValueError("audio_features needs at least one waveform")
    clipped = [_as_tensor(w)[:max_samples] for w in waveforms]
    lengths = torch.tensor([len(w) for w in clipped], dtype=torch.long)  # (B,)
    frames = -(-int(lengths.max()) // HOP_LENGTH) if trim else max_samples // HOP_LENGTH
    # A frame's window reaches 200 samples either side of its centre, so past (longest + N_FFT) samples every
    # window (and the reflection at the end) holds only padding: those frames are silence, log10 = -10, and are
    # appended rather than computed.
    span = min(max_samples, int(lengths.max()) + N_FFT)
    batch = torch.stack([F.pad(w, (0, span - len(w))) for w in clipped])  # (B, span)
    log_mel = _log10_mel(batch, n_mels)  # (B, n_mels, span // 160)
    # Pads with silence, or (trimmed) crops the frames the span computed past the last audio frame.
    log_mel = F.pad(log_mel, (0, frames - log_mel.shape[-1]), value=math.log10(_POWER_FLOOR))  # (B, n_mels, frames)
    # int32, as the processor returns it.
    mask = (torch.arange(frames) * HOP_LENGTH < lengths[:, None]).to(torch.int32)  # (B, frames)
    return _whisper_normalise(log_mel), mask


def pack_features(input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The audio frames of a padded batch, end to end: what :class:`AudioEncoder` takes.

    (B, n_mels, frames) and (B, frames) → ``(features, feature_lens)``: (n_mels, Σ audio frames) and (B,).
    """
    keep = feature_attention_mask.bool()  # (B, frames)
    features = input_features.transpose(1, 2)[keep].T  # (n_mels, Σ frames)
    return features, keep.sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# Resampling and WAV files
# ---------------------------------------------------------------------------------------------------------------


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int = SAMPLE_RATE, zero_crossings: int = 16,
             rolloff: float = 0.95) -> torch.Tensor:
    """Band-limited resampling of (..., samples) from ``orig_rate`` to ``new_rate`` Hz: (..., ceil(samples·new/orig)).

    Output sample j sits at input position j·orig/new and is the input convolved with a Hann-windowed sinc
    low-pass (cut at ``rolloff`` × the lower of the two Nyquist frequencies, ``zero_crossings`` lobes each side).
    With g = gcd(orig, new), output j = q·(new/g) + r sits at input q·(orig/g) + r·orig/new: its taps depend only
    on the phase r, so all phases are one strided conv1d with new/g output channels.
    """
    if orig_rate == new_rate:
        return waveform
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    cutoff = rolloff * min(1.0, up / down)  # as a fraction of the input's Nyquist frequency
    half = math.ceil(zero_crossings / cutoff)  # kernel half-width in input samples
    taps = torch.arange(-half, half + down, dtype=torch.float64)  # (K,) offsets from the phase-0 position
    phases = torch.arange(up, dtype=torch.float64) * down / up  # (up,) output positions within a period
    distance = (taps[None, :] - phases[:, None]) * cutoff  # (up, K) in units of the filter's zero crossings
    window = torch.cos(distance.clamp(-zero_crossings, zero_crossings) * math.pi / (2 * zero_crossings)) ** 2
    dtype = waveform.dtype if waveform.is_floating_point() else torch.float32
    kernel = (cutoff * torch.sinc(distance) * window).to(dtype)  # (up, K)
    lead, samples = waveform.shape[:-1], waveform.shape[-1]
    flat = waveform.reshape(-1, 1, samples).to(kernel.dtype)  # (N, 1, samples)
    flat = F.pad(flat, (half, half + down))  # (N, 1, half + samples + half + down)
    out = F.conv1d(flat, kernel[:, None, :].to(flat.device), stride=down)  # (N, up, periods)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)  # (N, periods·up), phases interleaved
    n_out = -(-samples * up // down)
    return out[:, :n_out].reshape(*lead, n_out)


# Sample width in bytes → numpy dtype of the stored integers and the value of full scale.
_PCM = {1: (np.uint8, 128.0), 2: (np.int16, 32768.0), 4: (np.int32, 2147483648.0)}


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """A PCM WAV file as mono float32 in [-1, 1): ``(waveform (samples,), sample_rate)``.

    8, 16, 24 and 32-bit integer PCM are read; channels are averaged.
    """
    with wave.open(str(path), "rb") as f:
        channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
        raw = f.readframes(n)
    if width == 3:
        # Little-endian 24-bit: place the 3 bytes in the top of an int32 so the sign comes out right.
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).astype(np.float64) / 2147483648.0
    elif width in _PCM:
        dtype, scale = _PCM[width]
        values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float64)
        values = (values - 128.0) / scale if width == 1 else values / scale  # 8-bit WAV is unsigned
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported")
    mono = values.reshape(-1, channels).mean(axis=1)  # (samples,)
    return torch.from_numpy(mono.astype(np.float32)), rate


def write_wav(path: str | Path, waveform: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write (samples,) mono or (channels, samples) audio in [-1, 1] as 16-bit PCM; values outside are clipped."""
    audio = torch.as_tensor(waveform).detach().cpu().double()
    if audio.dim() == 1:
        audio = audio[None]  # (1, samples)
    if audio.dim() != 2:
        raise ValueError(f"expected (samples,) or (channels, samples), got shape {tuple(audio.shape)}")
    pcm = (audio * 32768.0).round().clamp(-32768, 32767).to(torch.int16)  # (channels, samples)
    interleaved = pcm.T.contiguous().numpy().astype("<i2")  # (samples, channels)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(audio.shape[0])
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(interleaved.tobytes())


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A WAV file as mono float32 (samples,) at ``sample_rate`` Hz, ready for :func:`audio_features`."""
    waveform, rate = read_wav(path)
    return resample(waveform, rate, sample_rate)


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


def audio_token_lengths(feature_lens: torch.Tensor | int) -> torch.Tensor | int:
    """How many tokens the encoder makes of an audio of ``feature_lens`` mel frames (int or tensor, elementwise).

    The stride-2 conv keeps ceil(frames / 2) positions and the pair pooling floor of half of that: the Thinker
    puts this many audio placeholder tokens in the prompt (Qwen2.5-Omni's ``_get_feat_extract_output_lengths``).
    """
    after_conv = (feature_lens - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal positions, (length, channels): sines of all frequencies, then cosines.

    Frequencies are geometric from 1 down to 1/max_timescale radians per position. Computed in float32 in the
    same order as transformers, so the table is bit-identical to the one its checkpoints were trained with.
    """
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels}")
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-step * torch.arange(channels // 2).float())  # (channels/2,)
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, channels/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (length, channels)


class AudioAttention(nn.Module):
    """Multi-head self-attention within each chunk (k_proj has no bias, as in Whisper)."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by {n_head} heads")
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (chunks, T, d), valid (chunks, T) bool → (chunks, T, d); padding positions are never attended to."""
        C, T, d = x.shape
        q = self.q_proj(x).view(C, T, self.n_head, -1).transpose(1, 2)  # (C, heads, T, head_dim)
        k = self.k_proj(x).view(C, T, self.n_head, -1).transpose(1, 2)  # (C, heads, T, head_dim)
        v = self.v_proj(x).view(C, T, self.n_head, -1).transpose(1, 2)  # (C, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])  # (C, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(C, T, d)  # (C, T, d)
        return self.out_proj(y)


class AudioEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = AudioAttention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (chunks, T, d), valid (chunks, T) → (chunks, T, d)."""
        x = x + self.self_attn(self.self_attn_layer_norm(x), valid)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # the residual stream can outgrow fp16 in long stacks (Whisper's guard)
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioEncoder(nn.Module):
    """Qwen2.5-Omni's audio encoder: packed log-mel frames of several audios → their tokens, end to end.

    ``audio_bos_eos_token`` is not used here (nor by transformers' encoder); it is kept so that checkpoints
    round-trip. ``positional_embedding`` is a non-persistent buffer, recomputed rather than loaded, as in
    transformers.
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        if config.n_window > config.max_source_positions:
            raise ValueError(f"n_window {config.n_window} needs more than max_source_positions "
                             f"{config.max_source_positions} positions per chunk")
        self.config = config
        d = config.d_model
        self.n_window = config.n_window
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(config.max_source_positions, d), persistent=False)
        self.audio_bos_eos_token = nn.Embedding(2, config.output_dim)
        self.audio_bos_eos_token.weight.requires_grad_(False)  # never used in a forward pass: nothing to learn
        self.layers = nn.ModuleList([AudioEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.ln_post = nn.LayerNorm(d)
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.proj = nn.Linear(d, config.output_dim)

    def reset_buffers(self) -> None:
        """Recompute the position table, on CPU if the module was built on the meta device."""
        device = self.positional_embedding.device
        device = torch.device("cpu") if device.type == "meta" else device
        self.positional_embedding = sinusoids(self.config.max_source_positions, self.config.d_model).to(device)

    def chunk_lengths(self, feature_lens: Sequence[int]) -> list[int]:
        """Frames in each chunk, audio after audio: full chunks of 2·n_window frames, then the remainder."""
        size = 2 * self.n_window
        lengths = []
        for n in feature_lens:
            lengths += [size] * (n // size) + ([n % size] if n % size else [])
        return lengths

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """input_features (n_mels, Σ frames), the audios end to end; feature_lens (B,) their frame counts.

        Returns (Σ audio_token_lengths(feature_lens), output_dim), the audios' tokens end to end.
        """
        lens = [int(n) for n in feature_lens]
        chunk_lens = self.chunk_lengths(lens)
        if not chunk_lens:  # no audio frames at all
            return self.proj.weight.new_zeros(0, self.config.output_dim)
        frames = input_features.T.to(self.conv1.weight.dtype)  # (Σ frames, n_mels)
        chunks = nn.utils.rnn.pad_sequence(list(frames.split(chunk_lens)), batch_first=True)  # (C, T1, n_mels)
        chunk_lens_t = torch.tensor(chunk_lens, device=frames.device)  # (C,)
        valid1 = torch.arange(chunks.shape[1], device=frames.device) < chunk_lens_t[:, None]  # (C, T1)

        # The convolutions see each chunk alone, zero-padded at both of its ends: the padding of a short last
        # chunk is zeroed again after conv1 so that conv2 reads zeros there too.
        x = F.gelu(self.conv1(chunks.transpose(1, 2)))  # (C, d, T1)
        x = x * valid1[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (C, T2, d), T2 = ceil(T1 / 2)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)  # positions restart in every chunk
        valid2 = torch.arange(x.shape[1], device=x.device) < (chunk_lens_t[:, None] + 1) // 2  # (C, T2)

        for layer in self.layers:
            x = layer(x, valid2)

        # Back to one sequence per audio, then average neighbouring positions (a trailing odd one is dropped).
        x = x[valid2]  # (Σ positions, d), chunk after chunk = audio after audio
        positions = [(n + 1) // 2 for n in lens]
        tokens = []
        for h in x.split(positions):  # h: (positions, d)
            if len(h) < 2:
                tokens.append(h[:0])
                continue
            tokens.append(self.avg_pooler(h.T[None]).squeeze(0).T)  # (positions // 2, d)
        x = torch.cat(tokens)  # (Σ tokens, d)
        return self.proj(self.ln_post(x))  # (Σ tokens, output_dim)
