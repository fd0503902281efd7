"""CLI verb ``omni``: use a Thinker from the command line.

``omnilm omni ask --model DIR [--image F.png] [--audio F.wav] [--video DIR|F [--video-audio F.wav]] --prompt TEXT``
asks one question about the given media and prints the reply (greedy unless ``--temperature`` says otherwise),
streamed as it is generated. ``--image`` and ``--audio`` may be repeated; the media come before the prompt in the
user turn, in the order given on the command line. A video is a folder of PNG frames (named so that they sort in
order, with an optional ``video.json`` holding ``{"fps": ...}``) or an animated GIF/PNG/WebP; ``--video-audio``
gives its soundtrack, which the model then hears along with the frames (audio-in-video).
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
    ask.add_argument("--device", default="cpu")
    ask.set_defaults(handler=run_ask)


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


def ask(thinker: Any, tokenizer: Any, messages: list[dict[str, Any]], params: Any) -> Iterator[str]:
    """The reply to ``messages`` (processor parts), piece by piece as the tokens come: greedy or sampled per
    ``params``, ending at the end of the turn."""
    from omnilm.infer.detokenize import StreamingDecoder
    from omnilm.infer.generate import FINISHED
    from omnilm.omni.generate import generate_thinker
    from omnilm.omni.processor import OmniProcessor
    from omnilm.tokenizer.chat import IM_END

    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget)
    example = processor.encode(messages, add_generation_prompt=True)
    context = thinker.config.text.max_seq_len
    if len(example.ids) + params.max_new_tokens > context:
        from omnilm.errors import UserError

        raise UserError(f"the prompt ({len(example.ids)} tokens with the media) plus --max-new-tokens "
                        f"({params.max_new_tokens}) exceeds the model's context of {context}")
    device = next(thinker.parameters()).device
    batch = {k: v.to(device) if hasattr(v, "to") else v
             for k, v in processor.collate([example], pad_id=0, left_pad=True).items()}
    eos = {i for i in (tokenizer.eos_id, thinker.config.text.eos_token_id, tokenizer.token_to_id(IM_END))
           if i is not None}
    decoder = StreamingDecoder(tokenizer, params.stop)
    for step in generate_thinker(thinker, batch, params, sorted(eos), 0):
        token = int(step[0])
        if token == FINISHED or token in eos:
            break
        yield decoder.push(token)
    yield decoder.finish()


def run_ask(args: argparse.Namespace) -> int:
    from omnilm.infer.sampling import SamplingParams
    from omnilm.omni.thinker import load_thinker
    from omnilm.tokenizer import Tokenizer

    messages = ask_messages(args.media, args.prompt, args.system, args.video_audio, args.video_fps)
    thinker = load_thinker(args.model).to(args.device)  # a text model's folder is refused here, by its model_type
    tokenizer = Tokenizer.from_dir(args.model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    for piece in ask(thinker, tokenizer, messages, params):
        print(piece, end="", flush=True)
    print(flush=True)
    return 0
