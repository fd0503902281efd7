"""Can one attention head single out "the same second" from TMRoPE's temporal frequencies alone?

What is measured
    With multimodal RoPE the score between a query and a key of relative temporal position d (25 ids a second) is,
    through the temporal part of the rotary dimensions, a sum of a cos(f d + phi) over the temporal frequencies f
    (the first ``mrope_section[0]`` of ``theta^(-2i/head_dim)``: the highest). For each split this fits, by least
    squares over every amplitude and phase (and a constant), the best such sum to a window: 1 for the 25 ids of
    one second (d = 0..24, an audio token and the frame of its second), 0 for every other d within ±``--span``
    seconds. It reports how many ids outside the window still score above the lowest one inside: 0 % means a head
    can tell "this second" from every other, 40 % that it cannot. The released Qwen2.5-Omni (head_dim 128, 16/24/24)
    and omnilm's Thinker splits at head_dim 32 are listed. No model is trained; numpy only, instant.

How to run
    .venv/bin/python benchmarks/mrope_window.py
    .venv/bin/python benchmarks/mrope_window.py --span 4 --theta 1e6
"""

from __future__ import annotations

import argparse

import numpy as np

IDS_PER_SECOND = 25
SPLITS = ((128, (16, 24, 24)), (32, (4, 6, 6)), (32, (6, 5, 5)), (32, (7, 5, 4)), (32, (8, 4, 4)), (32, (10, 3, 3)))


def window_fit(head_dim: int, temporal: int, span_seconds: float, theta: float) -> tuple[float, float, float]:
    """(slowest temporal frequency in radians per second, share of outside ids scoring above the lowest inside,
    margin: lowest inside minus highest outside) of the least-squares fit of a one-second window."""
    frequencies = theta ** (-2 * np.arange(head_dim // 2) / head_dim)[:temporal]
    span = round(span_seconds * IDS_PER_SECOND)
    d = np.arange(-span, span + 1)
    basis = np.concatenate([np.cos(np.outer(d, frequencies)), np.sin(np.outer(d, frequencies)),
                            np.ones((len(d), 1))], axis=1)
    inside = (d >= 0) & (d < IDS_PER_SECOND)
    weights, *_ = np.linalg.lstsq(basis, inside.astype(float), rcond=None)
    score = basis @ weights
    lowest_inside = score[inside].min()
    return (float(frequencies[-1] * IDS_PER_SECOND), float((score[~inside] > lowest_inside).mean()),
            float(lowest_inside - score[~inside].max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--span", type=float, default=10.0, help="seconds either side the window is told from")
    parser.add_argument("--theta", type=float, default=10000.0, help="rotary base")
    args = parser.parse_args()
    print(f"| head_dim | mrope_section | slowest temporal turn per second (rad) | outside ids above the lowest inside "
          f"(±{args.span:g} s) | margin |")
    print("|---:|---|---:|---:|---:|")
    for head_dim, split in SPLITS:
        slowest, above, margin = window_fit(head_dim, split[0], args.span, args.theta)
        print(f"| {head_dim} | {'/'.join(map(str, split))} | {slowest:.2f} | {100 * above:.0f} % | {margin:+.3f} |")


if __name__ == "__main__":
    main()
