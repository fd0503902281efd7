"""Speech intelligibility: the judge's floor on espeak-ng's own audio, and the ceiling of codec + Griffin–Lim.

What is measured
    Sentences of the biography domain: for ``--people`` fictional people of ``omnilm data synth bios``, one
    sentence per attribute in a template drawn at random ("Megan Chang was born on 6 December 1986."). The
    :class:`omnilm.eval.speech.SpeechJudge` is built from the sentences of ``--lm-people`` people (the measured
    people first, so the judge's language model holds every measured sentence and others like them).

    For every voice (``--voices`` from ``omnilm data synth omni``'s training and evaluation voices, in order), each
    sentence is spoken by espeak-ng and judged four ways; the corpus WER of each column is reported:

    floor     espeak-ng's waveform as is
    gl        its log-mel → Griffin–Lim → waveform (what the vocoder alone loses)
    K=...     its log-mel → codec encode → decode → Griffin–Lim (what a talker predicting perfect codes gets)

    The codecs are fitted on other sentences (people after the ``--lm-people``) spoken by training voices
    (``--codec-utterances`` utterances), so neither the sentences nor, for evaluation voices, the voices of the
    measurement were seen while fitting. Reported too: each codec's log-mel MSE on the measured audio.

How to run
    .venv/bin/python benchmarks/speech_ceiling.py                      # 30 sentences, 6 voices, K = 256 and 1024
    .venv/bin/python benchmarks/speech_ceiling.py --people 2 --voices train:1,eval:1 --codes 64  # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--people", type=int, default=5, help="people measured (6 sentences each)")
    p.add_argument("--lm-people", type=int, default=50, help="people whose sentences make the judge's LM")
    p.add_argument("--voices", default="train:3,eval:3", help="how many training and evaluation voices")
    p.add_argument("--codes", default="256,1024", help="codebook sizes (comma separated; empty: none)")
    p.add_argument("--codec-utterances", type=int, default=300, help="utterances the codecs are fitted on")
    p.add_argument("--gl-iterations", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


def domain_sentences(people: int, seed: int) -> list[str]:
    """One sentence per attribute for each of ``people`` people, templates drawn at random."""
    from omnilm.data.synth.bios import ATTRIBUTES, BiosConfig, make_people, sentence
    from omnilm.data.synth.templates import TEMPLATES

    rng = random.Random(seed)
    out = []
    for person in make_people(BiosConfig(people=people, seed=seed)):
        for attribute in ATTRIBUTES:
            out.append(sentence(rng.choice(TEMPLATES[attribute]), person.name, person.attributes[attribute])[0])
    return out


def main(argv: list[str] | None = None) -> int:
    from omnilm.data.synth.media import require_espeak, speak
    from omnilm.data.synth.omni import OmniConfig, make_voices
    from omnilm.eval.speech import SpeechJudge, wer
    from omnilm.omni.audio import log_mel_spectrogram
    from omnilm.omni.codec import fit_codec
    from omnilm.omni.vocoder import griffin_lim

    args = parse_args(argv)
    require_espeak()
    torch.manual_seed(args.seed)
    split_counts = dict(item.split(":") for item in args.voices.split(",") if item)
    all_voices = make_voices(OmniConfig(seed=args.seed))
    voices = [v for split in ("train", "eval") for v in all_voices[split][:int(split_counts.get(split, 0))]]
    pool = domain_sentences(max(args.lm_people, args.people) + args.codec_utterances // 6 + 1, args.seed)
    measured = pool[:6 * args.people]
    started = time.perf_counter()
    judge = SpeechJudge(pool[:6 * max(args.lm_people, args.people)])
    print(f"judge: {len(judge.vocabulary)} words, missing {list(judge.missing_words)}, "
          f"built in {time.perf_counter() - started:.1f} s", flush=True)

    codecs = {}
    sizes = [int(k) for k in args.codes.split(",") if k]
    if sizes:
        fit_sentences = pool[6 * max(args.lm_people, args.people):][:args.codec_utterances]
        rng = random.Random(args.seed + 1)
        fit_audio = [speak(text, rng.choice(all_voices["train"])) for text in fit_sentences]
        for k in sizes:
            started = time.perf_counter()
            codecs[k] = fit_codec(fit_audio, codes=k, iterations=50, seed=args.seed)
            print(f"codec K={k}: {codecs[k].stats['pairs']} pairs, train MSE {codecs[k].stats['train_mse']:.4f}, "
                  f"{time.perf_counter() - started:.1f} s", flush=True)

    def vocode(log_mel: torch.Tensor) -> np.ndarray:
        wave = griffin_lim(log_mel, iterations=args.gl_iterations, seed=args.seed).clamp(-1.0, 1.0)
        return wave.numpy()

    columns = ["floor", "gl"] + [f"K={k}" for k in sizes]
    rows = []
    totals: dict[str, tuple[list[str], list[str]]] = {c: ([], []) for c in columns}
    for voice in voices:
        hyps: dict[str, list[str]] = {c: [] for c in columns}
        mse: dict[int, list[float]] = {k: [] for k in sizes}
        for text in measured:
            wave = speak(text, voice)
            log_mel = log_mel_spectrogram(torch.from_numpy(wave.astype(np.float32)))  # (128, frames)
            hyps["floor"].append(judge.transcribe(wave))
            hyps["gl"].append(judge.transcribe(vocode(log_mel)))
            for k, codec in codecs.items():
                decoded = codec.decode(codec.encode(log_mel))[:, :log_mel.shape[1]]
                mse[k].append(float(((decoded - log_mel) ** 2).mean()))
                hyps[f"K={k}"].append(judge.transcribe(vocode(decoded)))
        row = {"voice": voice.name, **{c: wer(measured, hyps[c]) for c in columns},
               **{f"mse K={k}": float(np.mean(v)) for k, v in mse.items()}}
        rows.append(row)
        for c in columns:
            totals[c][0].extend(measured)
            totals[c][1].extend(hyps[c])
        print("  ".join([f"{voice.name:34s}"] + [f"{c} {row[c]:.3f}" for c in columns]
                        + [f"mse K={k} {row[f'mse K={k}']:.4f}" for k in sizes]), flush=True)
    overall = {c: wer(*totals[c]) for c in columns}
    print("all voices".ljust(34) + "  " + "  ".join(f"{c} {v:.3f}" for c, v in overall.items()), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "rows": rows, "overall": overall}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
