"""Are the spoken replies intelligible? Word error rate of speech out, judged by an offline recogniser.

For each record (a chat whose last message is the reference reply, with ``reply_audio``: that reply spoken by the
assistant's voice), three audios of the same words are transcribed by the same judge (:class:`SpeechJudge`, a
language model over the domain's sentences):

- ``espeak``: the recorded reply itself: the judge's floor (what it gets wrong on the source voice);
- ``codec``: that recording → codec codes → the codec's mel → the vocoder: the ceiling the codes allow;
- ``token2wav``: the same codes → Token2wav (DiT and vocoder): what the Token2wav loses on codes that are right,
  so that the Talker's share of the ``talker`` WER is the rest;
- ``talker``: the Thinker's own greedy reply to the question, spoken by Talker → Token2wav → vocoder; scored
  against the Thinker's text (does the speech say what the text says?);
- ``espeak_reply``: that same reply of the Thinker spoken by espeak-ng in the record's voice (when espeak-ng is
  installed): the judge's floor on the Thinker's words, which are not the recorded reply's (a held-out question
  gets a guess, now and then a name the judge's language model never saw, or no words at all).

Latency is measured on the ``talker`` path: seconds to the first audio chunk and the real-time factor (seconds of
compute per second of audio).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _greedy_reply(voice: Any, batch: dict[str, Any], max_tokens: int) -> list[int]:
    """The Thinker's greedy reply to a one-row batch, ended by the end-of-turn token (what the Talker reads)."""
    from omnilm.eval.omni import greedy_reply_ids
    from omnilm.tokenizer.tokenizer import IM_END

    tokenizer = voice.tokenizer
    end = [i for i in (tokenizer.token_to_id(IM_END), tokenizer.eos_id) if i is not None][:1]
    return greedy_reply_ids(voice.thinker, tokenizer, batch, max_tokens)[0] + end


@torch.no_grad()
def evaluate_spoken_replies(voice: Any, records: Sequence[dict[str, Any]], root: str | Path, judge: Any,
                            codec: Any = None, max_tokens: int = 32) -> dict[str, float]:
    """WER of the floor (``espeak``), the codec ceiling (``codec``) and the Token2wav on the same codes
    (``token2wav``) when a codec is given, of the Talker's speech (``talker``) and of espeak-ng saying the same
    replies (``espeak_reply``, when it is installed); first-chunk latency and real-time factor."""
    from omnilm.data.synth.media import espeak_available, speak
    from omnilm.data.synth.omni import parse_voice
    from omnilm.omni.audio import load_audio
    from omnilm.omni.processor import OmniProcessor
    from omnilm.omni.vocoder import griffin_lim

    root = Path(root)
    tokenizer = voice.tokenizer
    with_espeak = espeak_available()
    processor = OmniProcessor(tokenizer, voice.thinker.config, voice.thinker.media_budget, root)
    heard: dict[str, list[tuple[str, str]]] = {"espeak": [], "codec": [], "token2wav": [], "talker": [],
                                               "espeak_reply": []}
    first_chunk, compute, audio_seconds = [], 0.0, 0.0
    for record in records:
        reference = record["messages"][-1]["content"]
        recorded = load_audio(root / record["reply_audio"]).numpy()
        heard["espeak"].append((reference, judge.transcribe(recorded)))
        if codec is not None:
            codes = codec.encode(torch.from_numpy(recorded))
            heard["codec"].append((reference, judge.transcribe(griffin_lim(codec.decode(codes)).numpy())))
            heard["token2wav"].append((reference, judge.transcribe(voice.token2wav.synthesize(codes).numpy())))
        batch = processor.collate([processor.encode(record["messages"][:-1], add_generation_prompt=True)],
                                  tokenizer.pad_id or 0, left_pad=True)
        reply = _greedy_reply(voice, batch, max_tokens)
        text = tokenizer.decode(reply, skip_special_tokens=True).strip()
        if with_espeak and record.get("voice"):
            said = judge.transcribe(speak(text, parse_voice(record["voice"]))) if text else ""
            heard["espeak_reply"].append((text, said))
        began = time.perf_counter()
        chunks = []
        for chunk in voice.speak(batch, reply):
            if not chunks:
                first_chunk.append(time.perf_counter() - began)
            chunks.append(np.asarray(chunk, dtype=np.float32))
        compute += time.perf_counter() - began
        wave = np.concatenate(chunks) if chunks else np.zeros(1, dtype=np.float32)
        audio_seconds += len(wave) / voice.sample_rate
        heard["talker"].append((text, judge.transcribe(wave)))
    return summarise(heard) | {"examples": float(len(records)),
                               "first_audio_s": float(np.median(first_chunk)) if first_chunk else float("nan"),
                               "real_time_factor": compute / max(audio_seconds, 1e-9)}


def summarise(heard: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Corpus WER per path that was measured; ``wer`` (the headline) is the Talker's."""
    from omnilm.eval.speech import wer

    out = {f"wer_{name}": wer([r for r, _ in pairs], [h for _, h in pairs]) for name, pairs in heard.items() if pairs}
    out["wer"] = out.get("wer_talker", float("nan"))
    return out
