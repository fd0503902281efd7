"""CLI verb ``omni``: use a Thinker (and its voice) from the command line.

``omnilm omni ask --model DIR [--image F.png] [--audio F.wav] [--video DIR|F [--video-audio F.wav]] --prompt TEXT``
asks one question about the given media and prints the reply (greedy unless ``--temperature`` says otherwise),
streamed as it is generated. ``--image`` and ``--audio`` may be repeated; the media come before the prompt in the
user turn, in the order given on the command line. A video is a folder of PNG frames (named so that they sort in
order, with an optional ``video.json`` holding ``{"fps": ...}``) or an animated GIF/PNG/WebP; ``--video-audio``
gives its soundtrack, which the model then hears along with the frames (audio-in-video). ``--speak F.wav`` also
reads the reply out with the folder's voice (:func:`omnilm.omni.speech.load_voice`) and writes it to F.wav.

``omnilm omni speak --model DIR --text TEXT --out F.wav [--stream]`` says a text with the folder's voice (the
prompt of :meth:`omnilm.omni.speech.Voice.speak_text`). By default the whole utterance is synthesised at once;
``--stream`` takes the streaming path, chunk by chunk as the codes come, and reports when the first audio came.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class _Media(argparse.Action):
    """Collects ``--image``/``--audio``/``--video`` into one list of (kind, value), in command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("omni", help="use a Thinker (text, audio, images, video) from the command line")
    verbs = p.add_subparsers(dest="omni_verb", metavar="COMMAND", required=True)
    ask = verbs.add_parser("ask", help="ask one question about audio, images and/or a video; prints the reply")
    ask.add_argument("--model", required=True, help="thinker folder")
    ask.add_argument("--prompt", required=True, help="the question (text after the media)")
    ask.add_argument("--image", action=_Media, const="image", dest="media", default=[], metavar="F",
                     help="a PNG or JPEG image (repeatable)")
    ask.add_argument("--audio", action=_Media, const="audio", dest="media", metavar="F.wav",
                     help="a WAV file, any rate, mono or stereo (repeatable)")
    ask.add_argument("--video", action=_Media, const="video", dest="media", metavar="DIR|F",
                     help="a folder of PNG frames (fps from its video.json, or --video-fps) or an animated "
                          "GIF/PNG/WebP")
    ask.add_argument("--video-audio", default=None, metavar="F.wav",
                     help="the video's soundtrack (heard along with its frames)")
    ask.add_argument("--video-fps", type=float, default=None,
                     help="the rate the frames were taken at, when the folder has no video.json (default: the "
                          "model's sampling rate, so every frame is used)")
    ask.add_argument("--system", default=None, help="a system message before the question")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--speak", default=None, metavar="F.wav",
                     help="also speak the reply with the folder's voice (talker/, token2wav/) into this WAV file")
    ask.add_argument("--max-codes", type=int, default=4096,
                     help="with --speak: most speech codes (50 a second), chosen greedily")
    ask.add_argument("--device", default="cpu")
    ask.set_defaults(handler=run_ask)

    speak = verbs.add_parser("speak", help="say a text with a thinker folder's voice; writes a WAV file")
    speak.add_argument("--model", required=True, help="thinker folder with a voice (talker/ and token2wav/)")
    speak.add_argument("--text", required=True, help="what to say")
    speak.add_argument("--out", required=True, metavar="F.wav", help="the WAV file to write")
    speak.add_argument("--stream", action="store_true",
                       help="synthesise chunk by chunk as the codes come (the serving path) instead of at once")
    speak.add_argument("--max-codes", type=int, default=4096, help="most speech codes (50 a second)")
    speak.add_argument("--temperature", type=float, default=0.0, help="of the speech codes; 0 = greedy (default)")
    speak.add_argument("--top-p", type=float, default=1.0)
    speak.add_argument("--seed", type=int, default=None)
    speak.add_argument("--device", default="cpu")
    speak.set_defaults(handler=run_speak)

    codec = verbs.add_parser("codec", help="discrete speech tokens (k-means over pairs of log-mel frames)")
    codec_verbs = codec.add_subparsers(dest="codec_verb", metavar="COMMAND", required=True)
    train = codec_verbs.add_parser("train", help="fit a codebook to wav files; writes codec.safetensors and "
                                                 "codec.json")
    train.add_argument("--data", required=True, metavar="DIR_OR_JSONL",
                       help="a folder of wav files (searched recursively) or a jsonl file whose records name wav "
                            "files under \"audio\" keys (paths relative to the file)")
    train.add_argument("--codes", type=int, required=True, metavar="K", help="codebook size")
    train.add_argument("--out", required=True, metavar="DIR")
    train.add_argument("--iterations", type=int, default=50, help="Lloyd iterations at most")
    train.add_argument("--max-vectors", type=int, default=200_000,
                       help="frame pairs used for fitting, drawn at random when there are more (0: all)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu")

    def run_codec_train(args: argparse.Namespace) -> int:
        from omnilm.omni.codec import run_train  # torch is imported only when the verb runs

        return run_train(args)

    train.set_defaults(handler=run_codec_train)


def animated_frames(path: str | Path) -> tuple[list[Any], float | None]:
    """The frames of an animated GIF/PNG/WebP as RGB arrays, and its frame rate (None when it keeps none)."""
    import numpy as np
    from PIL import Image, ImageSequence

    frames, durations = [], []
    with Image.open(path) as image:
        for frame in ImageSequence.Iterator(image):
            frames.append(np.asarray(frame.convert("RGB")))
            durations.append(frame.info.get("duration") or 0)
    total = sum(durations)
    return frames, (1000.0 * len(frames) / total if total > 0 else None)


def video_part(video: str, soundtrack: str | None, fps: float | None) -> dict[str, Any]:
    """The processor part of ``--video`` (and ``--video-audio``)."""
    from omnilm.errors import UserError
    from omnilm.omni.audio import load_audio

    path = Path(video)
    if path.is_dir():
        part: dict[str, Any] = {"type": "video", "video": str(path), "fps": fps}
    elif path.is_file():
        try:
            frames, recorded = animated_frames(path)
        except OSError as err:
            raise UserError(f"--video {video}: neither a folder of PNG frames nor an animated image omnilm can "
                            f"read ({err}); no video decoder is installed, so extract the frames first") from err
        part = {"type": "video", "video": frames, "fps": fps if fps is not None else recorded}
    else:
        raise FileNotFoundError(f"--video {video}: no such folder or file")
    if soundtrack is not None:
        part["audio"] = load_audio(soundtrack)
    return part


def ask_messages(media: Sequence[tuple[str, str]], prompt: str, system: str | None = None,
                 video_audio: str | None = None, video_fps: float | None = None) -> list[dict[str, Any]]:
    """The conversation ``omni ask`` sends: an optional system message, then a user turn of the media (in order)
    and the prompt."""
    from omnilm.errors import UserError

    videos = [value for kind, value in media if kind == "video"]
    if len(videos) > 1:
        raise UserError("one --video at a time (its --video-audio would be ambiguous)")
    if video_audio is not None and not videos:
        raise UserError("--video-audio needs a --video")
    parts: list[dict[str, Any]] = []
    for kind, value in media:
        if kind == "video":
            parts.append(video_part(value, video_audio, video_fps))
        else:
            if not Path(value).is_file():
                raise FileNotFoundError(f"--{kind} {value}: no such file")
            parts.append({"type": kind, kind: value})
    parts.append({"type": "text", "text": prompt})
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": parts}]


def ask_batch(thinker: Any, tokenizer: Any, messages: list[dict[str, Any]], params: Any) -> dict[str, Any]:
    """The prompt of ``messages`` (processor parts) as a collated batch on the model's device, checked to leave
    room for ``params.max_new_tokens``."""
    from omnilm.omni.processor import OmniProcessor

    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget)
    example = processor.encode(messages, add_generation_prompt=True)
    context = thinker.config.text.max_seq_len
    if len(example.ids) + params.max_new_tokens > context:
        from omnilm.errors import UserError

        raise UserError(f"the prompt ({len(example.ids)} tokens with the media) plus --max-new-tokens "
                        f"({params.max_new_tokens}) exceeds the model's context of {context}")
    device = next(thinker.parameters()).device
    return {k: v.to(device) if hasattr(v, "to") else v
            for k, v in processor.collate([example], pad_id=0, left_pad=True).items()}


def reply_text(thinker: Any, tokenizer: Any, batch: dict[str, Any], params: Any,
               reply_ids: list[int] | None = None) -> Iterator[str]:
    """The reply to the prompt ``batch``, piece by piece as the tokens come: greedy or sampled per ``params``,
    ending at the end of the turn. ``reply_ids``, when given, receives the reply's tokens (the end not included)."""
    from omnilm.infer.detokenize import StreamingDecoder
    from omnilm.infer.generate import FINISHED
    from omnilm.omni.generate import generate_thinker
    from omnilm.tokenizer.chat import IM_END

    eos = {i for i in (tokenizer.eos_id, thinker.config.text.eos_token_id, tokenizer.token_to_id(IM_END))
           if i is not None}
    decoder = StreamingDecoder(tokenizer, params.stop)
    for step in generate_thinker(thinker, batch, params, sorted(eos), 0):
        token = int(step[0])
        if token == FINISHED or token in eos:
            break
        if reply_ids is not None:
            reply_ids.append(token)
        yield decoder.push(token)
    yield decoder.finish()


def ask(thinker: Any, tokenizer: Any, messages: list[dict[str, Any]], params: Any) -> Iterator[str]:
    """The reply to ``messages`` (processor parts), piece by piece as the tokens come: greedy or sampled per
    ``params``, ending at the end of the turn."""
    yield from reply_text(thinker, tokenizer, ask_batch(thinker, tokenizer, messages, params), params)


def the_voice(model: str, **kwargs: Any) -> Any:
    """The voice of the thinker folder ``model``; a clear error when it has none."""
    from omnilm.errors import UserError
    from omnilm.omni.speech import TALKER_DIR, TOKEN2WAV_DIR, load_voice

    if not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder")
    voice = load_voice(model, **kwargs)
    if voice is None:
        raise UserError(f"{model} has no voice: speaking needs a {TALKER_DIR}/ and a {TOKEN2WAV_DIR}/ folder "
                        "beside the Thinker (omnilm.omni.speech.save_voice writes them)")
    return voice


def write_speech(path: str, chunks: Sequence[Any], sample_rate: int) -> float:
    """Write waveform chunks joined as a WAV file (atomically); returns the seconds of audio."""
    import numpy as np

    from omnilm.omni.audio import write_wav
    from omnilm.utils.atomic import atomic_path

    samples = np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks]) if chunks else np.zeros(0, np.float32)
    with atomic_path(path) as tmp:
        write_wav(tmp, samples, sample_rate)
    return len(samples) / sample_rate


def run_ask(args: argparse.Namespace) -> int:
    import sys

    from omnilm.infer.sampling import SamplingParams
    from omnilm.omni.thinker import load_thinker
    from omnilm.tokenizer import Tokenizer

    messages = ask_messages(args.media, args.prompt, args.system, args.video_audio, args.video_fps)
    thinker = load_thinker(args.model).to(args.device)  # a text model's folder is refused here, by its model_type
    tokenizer = Tokenizer.from_dir(args.model)
    voice = None if args.speak is None else the_voice(args.model, thinker=thinker, tokenizer=tokenizer,
                                                      device=args.device)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    batch = ask_batch(thinker, tokenizer, messages, params)
    reply: list[int] = []
    for piece in reply_text(thinker, tokenizer, batch, params, reply):
        print(piece, end="", flush=True)
    print(flush=True)
    if voice is not None:
        codes = SamplingParams(max_new_tokens=args.max_codes, temperature=0.0)
        seconds = write_speech(args.speak, list(voice.speak(batch, reply, codes)), voice.sample_rate)
        print(f"{args.speak}: {seconds:.2f} s of speech at {voice.sample_rate} Hz", file=sys.stderr)
    return 0


def run_speak(args: argparse.Namespace) -> int:
    import time

    from omnilm.errors import UserError
    from omnilm.infer.sampling import SamplingParams

    if not args.text.strip():
        raise UserError("--text is empty: nothing to say")
    voice = the_voice(args.model, device=args.device)
    params = SamplingParams(max_new_tokens=args.max_codes, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    start = time.perf_counter()
    if args.stream:
        chunks, first = [], None
        for chunk in voice.speak_text(args.text, params):
            first = time.perf_counter() - start if first is None else first
            chunks.append(chunk)
        timing = f", first audio after {first:.2f} s in {len(chunks)} chunks" if first is not None else ""
    else:
        import torch

        codes = list(voice.codes(*voice.text_prompt(args.text), params))
        chunks = [voice.token2wav.synthesize(torch.tensor(codes, dtype=torch.long)).cpu().numpy()]
        timing = ""
    seconds = write_speech(args.out, chunks, voice.sample_rate)
    print(f"{args.out}: {seconds:.2f} s of speech at {voice.sample_rate} Hz (made in "
          f"{time.perf_counter() - start:.2f} s{timing})")
    return 0
