"""Small models of each family and a tiny corpus, shared by the tests."""

from __future__ import annotations

import torch

from omnilm.model import ModelConfig, Transformer

FAMILIES = ("gpt2", "llama", "qwen2")

CORPUS = [
    "Alice Moreau was born on 3 March 1961 in Lyon. She studied physics at Grenoble and works for Airbus.",
    "Bob Lindqvist was born in Uppsala. He studied economics at Stockholm University.",
    "The quick brown fox jumps over the lazy dog, again and again, 12345 times!",
    "Emoji and accents: café, naïve, 東京, 🙂🚀 — all round-trip through byte-level BPE.",
]


def small_config(family: str, **overrides: object) -> ModelConfig:
    """A 2-layer model of ``family``; GQA for llama/qwen2, untied head for llama.

    The larger init std makes the logits peaked, so greedy and beam comparisons against another
    implementation are not decided by float rounding between near-equal tokens.
    """
    values: dict[str, object] = dict(family=family, vocab_size=320, n_layer=2, n_head=4, d_model=64,
                                     max_seq_len=128, init_std=0.2, tie_embeddings=family != "llama")
    if family != "gpt2":
        values["n_kv_head"] = 2
    values.update(overrides)
    return ModelConfig(**values)  # type: ignore[arg-type]


def small_model(family: str, seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(family, **overrides)).eval()


def solo_tokens(model: Transformer, prompt: list[int], params: object, eos: set[int]) -> list[int]:
    """What ``prompt`` generates when it is the only request (``generate_ids``, a contiguous cache), EOS excluded."""
    from omnilm.infer.generate import FINISHED, generate_ids

    tokens = []
    for step in generate_ids(model, [prompt], params, sorted(eos), 0):  # type: ignore[arg-type]
        token = int(step[0])
        if token == FINISHED or token in eos:
            break
        tokens.append(token)
    return tokens


# Standard seven-segment encodings, written out here independently of the generator's table.
DIGIT_OF_SEGMENTS = {"abcdef": 0, "bc": 1, "abdeg": 2, "abcdg": 3, "bcfg": 4, "acdfg": 5, "acdefg": 6, "abc": 7,
                     "abcdefg": 8, "abcdfg": 9}


def decode_digit(image: object, box: list[int], colour: tuple[int, int, int]) -> int | None:
    """The digit a seven-segment figure in ``box`` (x, y, w, h) shows, from the pixels at the middle of each
    segment of a PIL image."""
    x, y, w, h = box
    t = w / 5
    middles = {"a": (x + w / 2, y + t / 2), "b": (x + w - t / 2, y + h / 4), "c": (x + w - t / 2, y + 3 * h / 4),
               "d": (x + w / 2, y + h - t / 2), "e": (x + t / 2, y + 3 * h / 4), "f": (x + t / 2, y + h / 4),
               "g": (x + w / 2, y + h / 2)}
    lit = "".join(s for s, (px, py) in sorted(middles.items())
                  if image.getpixel((int(px), int(py))) == colour)  # type: ignore[attr-defined]
    return DIGIT_OF_SEGMENTS.get(lit)


def read_digit(image: object) -> int | None:
    """The one seven-segment digit on a plain background (the corner pixel's colour), box and colour unknown:
    the box is the bounding box of the figure, which fills it except for a 1 (its right-hand strip alone)."""
    import numpy as np

    pixels = np.asarray(image)
    figure = np.any(pixels != pixels[0, 0], axis=-1)
    rows, cols = np.nonzero(figure)
    if len(rows) == 0:
        return None
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    if (bottom - top) > 3 * (right - left):  # far narrower than a digit's box (h = 1.8 w): the strip of a 1
        return 1
    colour = tuple(int(c) for c in pixels[rows[0], cols[0]])
    return decode_digit(image, [int(left), int(top), int(right - left), int(bottom - top)], colour)
