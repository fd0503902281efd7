"""Discrete speech tokens: k-means over pairs of log-mel frames, 50 codes per second.

The codec owns a codebook of K centroids in the space of *frame pairs*. :mod:`omnilm.omni.audio` turns 16 kHz
audio into its Whisper-style 128-bin log-mel at 100 frames per second; frames 2i and 2i+1 are laid end to end
as one 256-dimensional vector (frame 2i first), and its code is the index of the nearest centroid (Euclidean).
Decoding looks the centroid up and cuts it back into its two frames, so ``decode(encode(x))`` is ``x`` quantised
to the codebook: a log-mel, not audio (a vocoder such as :func:`omnilm.omni.vocoder.griffin_lim` makes audio).

Invariants:

- ``encode`` of T frames gives ceil(T / 2) codes (an odd last frame is paired with a copy of itself) and
  ``decode`` of n codes gives exactly 2n frames, so a round trip never changes the length by more than one frame.
- Frames are in the front end's normalised units (log10 power floored 80 dB below the loudest bin of the
  utterance, then (x + 4) / 4); the codebook is only meaningful for that front end and its ``n_mels``.
- A codec folder is ``codec.safetensors`` (tensor ``centroids``, float32 (K, frames_per_code · n_mels)) and
  ``codec.json`` (:class:`CodecConfig` plus how it was fitted); each file is written to a temporary name and
  renamed, the weights first, so a folder with a ``codec.json`` always has the weights it describes.

The codebook is fitted by :func:`omnilm.utils.kmeans.kmeans` (k-means++ seeds, then Lloyd iterations).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnilm.omni.audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, load_audio, log_mel_spectrogram
from omnilm.utils.atomic import atomic_path, write_json_atomic
from omnilm.utils.kmeans import (  # noqa: F401  (re-exported: the codec's k-means)
    KMeansResult,
    assign,
    kmeans,
    kmeans_plus_plus,
    lloyd_step,
    squared_distances,
)

WEIGHTS_FILE = "codec.safetensors"
CONFIG_FILE = "codec.json"
FORMAT = "omnilm-speech-codec"

# ---------------------------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------------------------


def as_log_mel(audio: torch.Tensor | np.ndarray, n_mels: int = N_MELS) -> torch.Tensor:
    """``audio`` as a float32 log-mel (n_mels, frames): 16 kHz mono samples (samples,) go through the front end
    of :mod:`omnilm.omni.audio`; a (n_mels, frames) log-mel is returned as is."""
    tensor = torch.as_tensor(audio).float()
    if tensor.dim() == 1:
        if len(tensor) <= N_FFT // 2:  # the centred STFT reflects n_fft/2 samples at each end: no whole frame
            return tensor.new_zeros(n_mels, 0)
        return log_mel_spectrogram(tensor, n_mels)
    if tensor.dim() == 2 and tensor.shape[0] == n_mels:
        return tensor
    raise ValueError(f"expected 16 kHz samples (samples,) or a log-mel ({n_mels}, frames), "
                     f"got shape {tuple(tensor.shape)}")


def group_frames(log_mel: torch.Tensor, frames_per_code: int = 2) -> torch.Tensor:
    """(n_mels, T) log-mel → (ceil(T / g), g · n_mels): g = ``frames_per_code`` consecutive frames end to end,
    frame g·i first; the last frame is repeated to fill an incomplete group."""
    n_mels = log_mel.shape[0]
    frames = log_mel.T  # (T, n_mels)
    short = -frames.shape[0] % frames_per_code
    if short and frames.shape[0]:
        frames = torch.cat([frames, frames[-1:].expand(short, -1)])  # (g·ceil(T/g), n_mels)
    return frames.reshape(-1, frames_per_code * n_mels)  # (ceil(T/g), g·n_mels)


@dataclass(frozen=True)
class CodecConfig:
    """What a codebook means: ``codes`` centroids over ``frames_per_code`` consecutive log-mel frames of
    ``n_mels`` bins, from the front end of :mod:`omnilm.omni.audio` (16 kHz, hop 160, n_fft 400)."""

    codes: int
    n_mels: int = N_MELS
    frames_per_code: int = 2
    sample_rate: int = SAMPLE_RATE
    hop_length: int = HOP_LENGTH
    n_fft: int = N_FFT

    def __post_init__(self) -> None:
        if self.codes < 1 or self.n_mels < 1 or self.frames_per_code < 1:
            raise ValueError(f"codes, n_mels and frames_per_code must be positive: {self}")
        if (self.sample_rate, self.hop_length, self.n_fft) != (SAMPLE_RATE, HOP_LENGTH, N_FFT):
            raise ValueError(f"this codec's front end is 16 kHz, hop {HOP_LENGTH}, n_fft {N_FFT}; got {self}")

    @property
    def dim(self) -> int:
        """Length of one code's vector: frames_per_code frames of n_mels bins, end to end."""
        return self.frames_per_code * self.n_mels

    @property
    def code_rate(self) -> float:
        """Codes per second of audio (50 for frame pairs)."""
        return self.sample_rate / (self.hop_length * self.frames_per_code)


class Codec:
    """Speech ↔ codes through a k-means codebook over groups of consecutive log-mel frames (see the module)."""

    def __init__(self, centroids: torch.Tensor, config: CodecConfig | None = None,
                 stats: dict[str, Any] | None = None) -> None:
        if centroids.dim() != 2:
            raise ValueError(f"centroids must be (codes, dim), got shape {tuple(centroids.shape)}")
        config = config or CodecConfig(codes=centroids.shape[0], n_mels=centroids.shape[1] // 2)
        if tuple(centroids.shape) != (config.codes, config.dim):
            raise ValueError(f"centroids of shape {tuple(centroids.shape)} do not match {config} "
                             f"(expected ({config.codes}, {config.dim}))")
        self.centroids = centroids.float()
        self.config = config
        self.stats = dict(stats or {})

    @property
    def codes(self) -> int:
        """Size of the codebook, K."""
        return self.config.codes

    def to(self, device: str | torch.device) -> Codec:
        """The codebook moved to ``device`` (in place); returns self."""
        self.centroids = self.centroids.to(device)
        return self

    def encode(self, audio: torch.Tensor | np.ndarray) -> torch.Tensor:
        """16 kHz mono samples (samples,) or a log-mel (n_mels, T) → codes (ceil(T / 2),) int64 in [0, K)."""
        x = group_frames(as_log_mel(audio, self.config.n_mels).to(self.centroids.device), self.config.frames_per_code)
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=self.centroids.device)
        return assign(x, self.centroids)[0]

    def decode(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Codes (n,) → log-mel (n_mels, 2n): each code's centroid cut back into its frames, in order."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.centroids.device)
        if codes.dim() != 1:
            raise ValueError(f"expected codes of shape (n,), got {tuple(codes.shape)}")
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= self.codes):
            raise ValueError(f"codes must lie in [0, {self.codes}), got {int(codes.min())}..{int(codes.max())}")
        vectors = self.centroids[codes]  # (n, g·n_mels)
        return vectors.reshape(-1, self.config.n_mels).T.contiguous()  # (n_mels, g·n)

    def reconstruction_error(self, audio: torch.Tensor | np.ndarray) -> float:
        """Mean squared error per log-mel value of ``decode(encode(audio))`` against the audio's own log-mel."""
        log_mel = as_log_mel(audio, self.config.n_mels).to(self.centroids.device)
        if log_mel.shape[1] == 0:
            return 0.0
        decoded = self.decode(self.encode(log_mel))[:, :log_mel.shape[1]]
        return float(((decoded - log_mel) ** 2).mean())

    def save(self, folder: str | Path) -> Path:
        """Write ``codec.safetensors`` then ``codec.json`` into ``folder`` (each atomically); returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file({"centroids": self.centroids.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={"format": FORMAT})
        write_json_atomic(folder / CONFIG_FILE, {"format": FORMAT, "config": asdict(self.config),
                                                 "stats": self.stats})
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Codec:
        """The codec saved in ``folder`` by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path = folder / CONFIG_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} is not a codec folder: no {CONFIG_FILE}")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not an omnilm speech codec (format {meta.get('format')!r})")
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
        return cls(tensors["centroids"], CodecConfig(**meta["config"]), meta.get("stats"))


# ---------------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------------


def _audio_paths(value: Any) -> Iterator[str]:
    """Every string under an ``"audio"`` key anywhere in a JSON record."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "audio" and isinstance(item, str):
                yield item
            else:
                yield from _audio_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _audio_paths(item)


def wav_sources(data: str | Path) -> list[Path]:
    """The wav files of a folder (recursively, sorted) or of a jsonl file (every ``"audio"`` value in its
    records, e.g. the content parts of ``omnilm data synth omni`` records, relative to the file's folder;
    first occurrence order, no repeats)."""
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".wav" and p.is_file())
    elif path.is_file():
        seen: dict[Path, None] = {}
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON ({err})") from err
                for name in _audio_paths(record):
                    seen.setdefault((path.parent / name).resolve() if not Path(name).is_absolute() else Path(name))
        files = [p for p in seen if p.suffix.lower() == ".wav"]
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} audio files named in {path} are missing, e.g. {missing[0]}")
    else:
        raise FileNotFoundError(f"{data}: no such folder or jsonl file")
    if not files:
        raise ValueError(f"{data}: no wav files found")
    return files


def fit_codec(audios: Iterable[torch.Tensor | np.ndarray], codes: int, iterations: int = 50, seed: int = 0,
              max_vectors: int | None = 200_000, device: str | torch.device = "cpu",
              n_mels: int = N_MELS) -> Codec:
    """A codec of ``codes`` centroids fitted by k-means to the frame pairs of ``audios`` (16 kHz samples or
    log-mels, as :meth:`Codec.encode` takes them).

    At most ``max_vectors`` pairs are used, drawn uniformly without replacement (``seed``) when there are more;
    the codebook is capped at the number of pairs. The objective history is kept in the codec's ``stats``.
    """
    config = CodecConfig(codes=codes, n_mels=n_mels)
    pieces = [group_frames(as_log_mel(audio, n_mels), config.frames_per_code) for audio in audios]
    x = torch.cat(pieces) if pieces else torch.zeros(0, config.dim)  # (pairs, 2·n_mels)
    if x.shape[0] == 0:
        raise ValueError("no audio to fit the codec to (every input was shorter than one frame)")
    total = x.shape[0]
    if max_vectors is not None and total > max_vectors:
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_vectors]
        x = x[keep.sort().values]
    started = time.perf_counter()
    result = kmeans(x.to(device), codes, iterations=iterations, seed=seed)
    k = result.centroids.shape[0]
    stats = {"pairs": total, "pairs_used": x.shape[0], "iterations": len(result.history) - 1,
             "objective_history": [round(v, 6) for v in result.history],
             # The objective sums over 2·n_mels values: per log-mel value it is the reconstruction MSE.
             "train_mse": result.objective / config.dim, "seed": seed, "fit_seconds": time.perf_counter() - started}
    return Codec(result.centroids.float().cpu(), CodecConfig(codes=k, n_mels=n_mels), stats)


def train_codec(data: str | Path, codes: int, out: str | Path, iterations: int = 50, seed: int = 0,
                max_vectors: int | None = 200_000, device: str = "cpu") -> Codec:
    """Fit a codec to the wav files of ``data`` (see :func:`wav_sources`) and save it into ``out``."""
    files = wav_sources(data)
    codec = fit_codec((load_audio(f) for f in files), codes, iterations, seed, max_vectors, device)
    codec.stats.update(files=len(files), audio_seconds=round(codec.stats["pairs"] / codec.config.code_rate, 2),
                       data=str(data))
    if codec.codes < codes:
        codec.stats["codes_requested"] = codes
    codec.save(out)
    return codec


def run_train(args: argparse.Namespace) -> int:
    """``omnilm omni codec train``: fit, save, print a one-line JSON summary."""
    codec = train_codec(args.data, args.codes, args.out, args.iterations, args.seed,
                        args.max_vectors if args.max_vectors > 0 else None, args.device)
    stats = codec.stats
    summary = {"out": str(args.out), "codes": codec.codes, "files": stats["files"], "pairs": stats["pairs"],
               "pairs_used": stats["pairs_used"], "iterations": stats["iterations"],
               "train_mse": round(stats["train_mse"], 6),
               "bits_per_second": round(codec.config.code_rate * math.log2(max(codec.codes, 2)), 1)}
    print(json.dumps(summary), flush=True)
    return 0
