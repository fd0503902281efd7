"""Media helpers of the multimodal synthetic data: wav I/O, resampling, espeak-ng speech and Pillow drawing.

Deliberately minimal and self-contained (numpy, Pillow and the ``espeak-ng`` program only):

- wav files are 16-bit PCM; :func:`read_wav` returns mono float32 in [-1, 1], :func:`write_wav` writes it back.
- :func:`resample` is a polyphase windowed-sinc (Kaiser) resampler for any rational ratio, e.g. espeak-ng's
  22050 Hz to 16 kHz (320/441); deterministic, so the same input gives the same bytes on every run.
- :func:`speak` runs ``espeak-ng`` for one text in one :class:`Voice` and returns 16 kHz samples.
- :func:`draw_shape` and :func:`draw_digit` draw the image vocabulary without anti-aliasing, so that a pixel
  inside a shape has exactly the shape's colour; digits are seven-segment polygons (no font needed).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from omnilm.errors import UserError

ESPEAK = "espeak-ng"
SAMPLE_RATE = 16_000


# ---------------------------------------------------------------------------------------------- wav files


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Samples (mono float32 in [-1, 1]) and rate of a 16-bit PCM wav held in memory.

    Tolerates the placeholder sizes a streaming writer puts in the header (``espeak-ng --stdout`` writes
    0x7ffff... because it does not know the length in advance): the data chunk then runs to the end.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, rate, channels, bits = 12, None, None, None
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if chunk == b"fmt ":
            fmt, channels, rate = (int.from_bytes(body[i:j], "little") for i, j in ((0, 2), (2, 4), (4, 8)))
            bits = int.from_bytes(body[14:16], "little")
            if fmt != 1 or bits != 16:
                raise ValueError(f"only 16-bit PCM wav is supported (format {fmt}, {bits} bits)")
        elif chunk == b"data":
            if rate is None or channels is None:
                raise ValueError("wav data chunk before its fmt chunk")
            body = body[:len(body) // (2 * channels) * 2 * channels]
            samples = np.frombuffer(body, dtype="<i2").reshape(-1, channels).astype(np.float32) / 32768.0
            return samples.mean(axis=1) if channels > 1 else samples[:, 0], rate
        pos += 8 + size + (size & 1)
    raise ValueError("wav file has no data chunk")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Samples (mono float32 in [-1, 1]; channels averaged) and sample rate of a 16-bit PCM wav file."""
    return parse_wav(Path(path).read_bytes())


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as int16, clipped and rounded (not truncated, so a round trip is stable)."""
    return np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")


def write_wav(path: str | Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Write mono float samples as a 16-bit PCM wav; the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # No fsync: these files are regenerated from their settings, they only must never be seen half-written.
    with wave.open(str(tmp), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(to_pcm16(samples).tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- resampling


@lru_cache(maxsize=8)
def _polyphase_table(up: int, down: int, zero_crossings: int, rolloff: float,
                     beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Tap offsets and one row of filter weights per output phase (output time ``n * down / up``)."""
    cutoff = rolloff * min(1.0, up / down)  # as a fraction of the input Nyquist frequency
    half = math.ceil(zero_crossings / cutoff)
    offsets = np.arange(-half + 1, half + 1)
    frac = np.arange(up)[:, None] / up
    t = frac - offsets[None, :]  # distance (in input samples) from the output instant to each tap
    u = np.clip(t / (half + 1), -1.0, 1.0)
    window = np.i0(beta * np.sqrt(1.0 - u * u)) / np.i0(beta)
    weights = cutoff * np.sinc(cutoff * t) * window
    weights /= weights.sum(axis=1, keepdims=True)  # exact unit gain at DC for every phase
    return offsets, weights


def resample(samples: np.ndarray, src_rate: int, dst_rate: int, zero_crossings: int = 16, rolloff: float = 0.94,
             beta: float = 8.6) -> np.ndarray:
    """Band-limited resampling from ``src_rate`` to ``dst_rate`` (float64 out, ``ceil(n * dst / src)`` samples).

    Polyphase windowed sinc: the ratio is reduced to ``up/down`` and each output sample is a dot product of
    ``2 * ceil(zero_crossings / cutoff)`` input samples with one of ``up`` precomputed filter phases. The cutoff
    sits at ``rolloff`` times the lower Nyquist frequency, so downsampling does not alias; a Kaiser window
    (``beta``) bounds the ripple. Samples outside the signal count as zeros.
    """
    x = np.asarray(samples, dtype=np.float64)
    if src_rate == dst_rate:
        return x.copy()
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    offsets, weights = _polyphase_table(up, down, zero_crossings, rolloff, beta)
    half = int(offsets[-1])
    n_out = -(-len(x) * up // down)
    # Output n reads inputs floor(n * down / up) + offsets with the filter of phase (n * down) mod up; a period
    # of `up` outputs advances `down` inputs, so one (up × taps) table of input positions serves every period.
    # Plain gathers and sums, no BLAS: the result does not depend on a thread count, and it stays fast when the
    # caller's BLAS would start threads for a small product.
    table = ((np.arange(up) * down) // up)[:, None] + offsets[None, :] + half
    phases = weights[(np.arange(up) * down) % up]
    periods = -(-n_out // up)
    padded = np.zeros(periods * down + int(table.max()) + 1)
    padded[half:half + len(x)] = x
    out = np.empty(periods * up)
    chunk = max(1, (1 << 20) // table.size)  # periods per gather, bounding its memory
    for start in range(0, periods, chunk):
        starts = np.arange(start, min(periods, start + chunk)) * down
        block = np.einsum("mpj,pj->mp", padded[starts[:, None, None] + table[None]], phases)
        out[start * up:start * up + block.size] = block.reshape(-1)
    return out[:n_out]


def trim_silence(samples: np.ndarray, rate: int, threshold: float = 0.02, pad: float = 0.0) -> np.ndarray:
    """``samples`` without leading and trailing stretches quieter than ``threshold`` × the peak, keeping
    ``pad`` seconds on each side (within the signal)."""
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    if peak == 0.0:
        return samples[:0]
    loud = np.flatnonzero(np.abs(samples) >= threshold * peak)
    keep = int(round(pad * rate))
    return samples[max(0, loud[0] - keep):min(len(samples), loud[-1] + 1 + keep)]


# ---------------------------------------------------------------------------------------------- speech


@dataclass(frozen=True)
class Voice:
    """One espeak-ng speaker: an English accent (``en-us``, ``en-gb-scotland``, ...), a voice variant
    (``m3``, ``f2``, ``croak``, ``klatt2``, ...; see ``espeak-ng --voices=variant``), speed in words per minute
    and pitch (0-99)."""

    accent: str
    variant: str
    speed: int
    pitch: int

    @property
    def name(self) -> str:
        """Stable identifier, also the key of the voice in records and statistics."""
        return f"{self.accent}+{self.variant}:s{self.speed}:p{self.pitch}"

    def args(self) -> list[str]:
        return ["-v", f"{self.accent}+{self.variant}", "-s", str(self.speed), "-p", str(self.pitch)]


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` program is on PATH."""
    return shutil.which(ESPEAK) is not None


@lru_cache(maxsize=1)
def espeak_version() -> str:
    """``espeak-ng --version``'s text (part of the speech cache key: another version speaks differently)."""
    require_espeak()
    result = subprocess.run([ESPEAK, "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"\d+\.\d+\S*", result.stdout)
    return found.group(0) if found else result.stdout.strip()


def require_espeak() -> None:
    """Fail with install instructions when espeak-ng is missing."""
    if not espeak_available():
        raise UserError("espeak-ng is not installed, and the spoken data needs it: install the Debian package "
                        "(sudo apt-get install espeak-ng; scripts/bootstrap.sh does it where it can)")


def speak(text: str, voice: Voice, rate: int = SAMPLE_RATE) -> np.ndarray:
    """``text`` spoken by ``voice`` as float samples at ``rate`` (espeak-ng's own 22050 Hz resampled)."""
    # "--" so that a text starting with "-" is not read as an option.
    result = subprocess.run([ESPEAK, *voice.args(), "--stdout", "--", text], capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice.name} on {text!r}: "
                           f"{result.stderr.decode(errors='replace').strip()}")
    samples, src_rate = parse_wav(result.stdout)
    return resample(samples, src_rate, rate)


# ---------------------------------------------------------------------------------------------- drawing

#: Colour names and RGB values: saturated and far apart, so that each name is unambiguous on a light background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 150, 50), "blue": (40, 70, 220), "yellow": (235, 200, 0),
    "orange": (245, 130, 10), "purple": (130, 40, 170), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` centred on (cx, cy) within radius ``r`` (circles are drawn as ellipses instead)."""
    def ring(points: int, radii: tuple[float, ...], start: float) -> list[tuple[float, float]]:
        count = points * len(radii)
        return [(cx + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / count),
                 cy + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / count)) for i in range(count)]

    if shape == "square":
        s = r * 0.8
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # pointing up; its circumcentre (cx, cy) lies well inside
        return ring(3, (r,), -math.pi / 2)
    if shape == "star":
        return ring(5, (r, 0.45 * r), -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: object, shape: str, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    """Draw ``shape`` (one of :data:`SHAPES`) filled with ``colour`` on a ``PIL.ImageDraw.ImageDraw``."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)  # type: ignore[attr-defined]
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=colour)  # type: ignore[attr-defined]


#: Lit segments of each digit: a top, b top right, c bottom right, d bottom, e bottom left, f top left, g middle.
SEVEN_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc",
                  8: "abcdefg", 9: "abcdfg"}


def segment_rects(x: float, y: float, w: float, h: float) -> dict[str, tuple[float, float, float, float]]:
    """Rectangles (x0, y0, x1, y1) of the seven segments of a digit in the box (x, y, w, h); stroke w/5."""
    t = w / 5
    mid = y + h / 2
    return {"a": (x, y, x + w, y + t), "d": (x, y + h - t, x + w, y + h), "g": (x, mid - t / 2, x + w, mid + t / 2),
            "f": (x, y, x + t, mid), "b": (x + w - t, y, x + w, mid),
            "e": (x, mid, x + t, y + h), "c": (x + w - t, mid, x + w, y + h)}


def draw_digit(draw: object, digit: int, box: tuple[float, float, float, float],
               colour: tuple[int, int, int]) -> None:
    """Draw ``digit`` as a seven-segment figure filling ``box`` = (x, y, w, h)."""
    rects = segment_rects(*box)
    for segment in SEVEN_SEGMENTS[digit]:
        draw.rectangle(rects[segment], fill=colour)  # type: ignore[attr-defined]
