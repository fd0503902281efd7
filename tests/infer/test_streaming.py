"""Streaming generation with attention sinks: constant memory, and tokens equal to a brute-force recomputation."""

import pytest
import torch

from helpers import small_model
from omnilm.infer.generate import FINISHED, generate_ids
from omnilm.infer.sampling import SamplingParams


def greedy(model, prompt, n, **params):
    out = []
    for step in generate_ids(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0.0, **params)):
        assert int(step[0]) != FINISHED
        out.append(int(step[0]))
    return out


def test_sinks_equal_plain_generation_until_the_cache_fills():
    model = small_model("llama")
    prompt = list(range(5, 15))
    assert greedy(model, prompt, 20, attention_sinks=4, sink_window=40) == greedy(model, prompt, 20)


def test_one_layer_stream_equals_recomputing_over_the_kept_tokens():
    # One layer: a token's key/value ignores its context, so each streamed step must equal a fresh pass over the
    # sinks plus the window (what StreamingLLM keeps), at positions 0..n. 200 tokens from a 128-position model.
    model = small_model("qwen2", n_layer=1)
    sinks, window, prompt = 4, 16, [7, 3, 9, 11, 2]
    streamed = greedy(model, prompt, 200, attention_sinks=sinks, sink_window=window)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(200):
            kept = tokens[:sinks] + tokens[max(sinks, len(tokens) - window - 1):]
            tokens.append(int(model(torch.tensor([kept]))[0, -1].argmax()))
    assert streamed == tokens[len(prompt):]


def test_learned_positions_stream_past_their_table_only_with_sinks():
    model = small_model("gpt2", max_seq_len=32)
    with pytest.raises(ValueError, match="context"):
        greedy(model, [1, 2, 3], 40)
    out = greedy(model, [1, 2, 3], 100, attention_sinks=2, sink_window=20)
    assert len(out) == 100
    with pytest.raises(ValueError, match="must fit"):
        greedy(model, [1, 2, 3], 5, attention_sinks=2, sink_window=40)


def test_a_prompt_shorter_than_the_sinks_streams():
    model = small_model("llama")
    assert greedy(model, [5], 12, attention_sinks=4, sink_window=40) == greedy(model, [5], 12)
    assert len(greedy(model, [5], 200, attention_sinks=4, sink_window=8)) == 200
