"""Where a voice's word errors come from: the Talker's codes or the DiT and vocoder after them.

For replies of a ``speech.jsonl`` (held-out and training ones), each reference reply is spoken three ways and
transcribed by the same judge as the recipe's ``speech_wer`` evaluation (pocketsphinx with a language model over the
QA replies):

- ``dit``: the recorded reply's true codes (codec) → DiT → vocoder: what the voice makes of perfect codes;
- ``talker``: the Talker's greedy codes for the reference text, as ``Voice.speak`` makes them (a paced Talker with
  its duration model);
- ``talker-aligned`` (paced Talkers only): the same with the reply track laid out by the recording's own word
  timings instead of predicted durations.

Usage::

    .venv/bin/python benchmarks/talker_wer.py --model runs/omni/final --data runs/omni/media/speech.jsonl \\
        --codec runs/omni/codec --replies 40
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from omnilm.eval.speech import SpeechJudge, wer
from omnilm.omni.audio import load_audio
from omnilm.omni.codec import Codec
from omnilm.omni.pacing import aligned_counts
from omnilm.omni.processor import OmniProcessor
from omnilm.omni.speech import load_voice
from omnilm.omni.talker import generate_codes, talker_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a thinker folder with a voice")
    parser.add_argument("--data", required=True, help="speech.jsonl of omnilm data synth omni")
    parser.add_argument("--codec", required=True, help="the codec folder the voice was trained with")
    parser.add_argument("--replies", type=int, default=40, help="replies per split (spread over the file)")
    args = parser.parse_args()

    root = Path(args.data).parent
    records = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines()]
    judge = SpeechJudge(sorted({r["messages"][-1]["content"] for r in records if r.get("task") != "say"}))
    voice = load_voice(args.model)
    assert voice is not None, f"{args.model} has no voice"
    codec, tokenizer = Codec.load(args.codec), voice.tokenizer
    processor = OmniProcessor(tokenizer, voice.thinker.config, voice.thinker.media_budget, root)
    splits = {"held-out": [r for r in records if r["split"] == "eval"],
              "training": [r for r in records if r["split"] == "train" and r["task"] == "speak"]}
    print("| replies | n | dit (true codes) | talker | talker-aligned |")
    print("|---|---:|---:|---:|---:|")
    for name, pool in splits.items():
        chosen = pool[::max(len(pool) // args.replies, 1)][:args.replies]
        heard: dict[str, list[str]] = {"dit": [], "talker": [], "talker-aligned": []}
        for record in chosen:
            text = record["messages"][-1]["content"]
            batch = processor.collate([processor.encode(record["messages"][:-1], add_generation_prompt=True)],
                                      tokenizer.pad_id or 0, left_pad=True)
            reply = tokenizer.encode(text, special=False)
            true_codes = codec.encode(load_audio(root / record["reply_audio"]))
            heard["dit"].append(judge.transcribe(voice.token2wav.synthesize(true_codes).numpy()))
            spoken = np.concatenate([np.asarray(c, dtype=np.float32) for c in voice.speak(batch, reply)])
            heard["talker"].append(judge.transcribe(spoken))
            if voice.pacing is not None and record.get("reply_words"):
                counts, said = aligned_counts(tokenizer, reply, record["reply_words"], len(true_codes),
                                              codec.config.code_rate)
                inputs = talker_inputs(voice.thinker, voice.talker.config, batch["input_ids"],
                                       reply + voice.eos_ids[:1], voice.speaker_bos_id, voice.eos_ids)
                params = replace(voice.params, max_new_tokens=2 * sum(counts) + 25)
                codes = list(generate_codes(voice.talker, voice.paced(inputs, reply, counts, said), params))
                heard["talker-aligned"].append(judge.transcribe(voice.token2wav.synthesize(torch.tensor(codes)).numpy()))
        references = [r["messages"][-1]["content"] for r in chosen]
        cells = [f"{wer(references, heard[k]):.3f}" if len(heard[k]) == len(chosen) else "" for k in heard]
        print(f"| {name} | {len(chosen)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
