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
