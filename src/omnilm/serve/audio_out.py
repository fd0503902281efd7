"""Spoken output as the server sends it: 16-bit PCM, WAV, and the transcripts of spoken replies.

The engine speaks in float32 chunks (mono, in [-1, 1], see :mod:`omnilm.serve.thinker_engine`); a client gets them
as signed 16-bit little-endian PCM, each sample ``round(x · 32768)`` clipped to [-32768, 32767] (the quantisation
of :func:`omnilm.omni.audio.write_wav`, so a WAV from here reads back as one written there), alone (``pcm``,
``pcm16``) or behind a 44-byte WAV header (``wav``). A WAV sent whole has its exact sizes; one streamed before its
length is known has 0xFFFFFFFF in both size fields, the usual mark of a WAV of unknown length (readers take the
data up to the end of the stream).

A spoken chat reply has an id; a client may send the assistant's turn back as ``{"role": "assistant", "audio":
{"id": ...}}`` without its text, as OpenAI's clients do, so the server keeps each reply's transcript for
:data:`TRANSCRIPT_TTL_S` seconds (its ``expires_at``), the newest :data:`MAX_TRANSCRIPTS` of them.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

#: ``response_format`` of ``/v1/audio/speech`` → media type of the body.
SPEECH_FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}
#: ``audio.format`` of a chat completion that speaks (a streamed one is always ``pcm16``, as OpenAI streams).
CHAT_AUDIO_FORMATS = ("wav", "pcm16")
TRANSCRIPT_TTL_S = 3600
MAX_TRANSCRIPTS = 4096
#: Both size fields of a WAV header whose length is not known yet.
UNKNOWN_SIZE = 0xFFFFFFFF


def pcm16(chunk: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16-bit little-endian PCM (out-of-range values clipped)."""
    values = np.round(np.asarray(chunk, dtype=np.float64) * 32768.0)
    return np.clip(values, -32768, 32767).astype("<i2").tobytes()


def wav_header(sample_rate: int, samples: int | None) -> bytes:
    """The 44-byte header of a mono 16-bit PCM WAV of ``samples`` samples (None: length unknown, being streamed)."""
    data = UNKNOWN_SIZE if samples is None else 2 * samples
    riff = UNKNOWN_SIZE if samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
                                                                            2 * sample_rate, 2, 16)
            + b"data" + struct.pack("<I", data))


def wav(chunks: Iterable[np.ndarray], sample_rate: int) -> bytes:
    """A whole WAV file of the concatenated ``chunks``."""
    pcm = b"".join(pcm16(chunk) for chunk in chunks)
    return wav_header(sample_rate, len(pcm) // 2) + pcm


class Transcripts:
    """The transcripts of recent spoken replies by audio id, each until its expiry (thread-safe)."""

    def __init__(self, ttl_s: float = TRANSCRIPT_TTL_S, capacity: int = MAX_TRANSCRIPTS) -> None:
        self.ttl_s, self.capacity = ttl_s, capacity
        self.items: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self.lock = threading.Lock()

    def expiry(self) -> int:
        """The ``expires_at`` (Unix seconds) of a reply spoken now."""
        return int(time.time() + self.ttl_s)

    def add(self, audio_id: str, transcript: str, expires_at: int) -> None:
        with self.lock:
            self.items[audio_id] = (transcript, expires_at)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)

    def get(self, audio_id: str) -> str | None:
        """The transcript of ``audio_id``, or None when unknown or expired."""
        with self.lock:
            item = self.items.get(audio_id)
            if item is None or item[1] < time.time():
                self.items.pop(audio_id, None)
                return None
            return item[0]
