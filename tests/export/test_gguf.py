"""GGUF export: the file read back with llama.cpp's reader, and run by llama.cpp itself where it is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CORPUS, small_model
from omnilm.errors import UserError
from omnilm.export.gguf import export_gguf, gguf_tensors, gguf_vocab, interleave_rotary_rows
from omnilm.infer.quantize import quantize_model
from omnilm.model.attention import apply_rope, rope_cos_sin
from omnilm.model.transformer import Transformer
from omnilm.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

PROMPTS = ["Alice Moreau was born on", "The quick brown fox", "café 東京 🙂", "12345 times!"]


def _model(family: str, tokenizer: Tokenizer, **overrides: object):  # noqa: ANN202
    return small_model(family, vocab_size=tokenizer.vocab_size + 8, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id, **overrides)


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(values, dtype=np.float32).reshape(list(reversed(t.shape.tolist())))
    return fields, tensors


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_f32_file_holds_every_weight_and_the_tokenizer(tmp_path: Path, family: str, tokenizer: Tokenizer) -> None:
    model = _model(family, tokenizer)
    fields, tensors = _read(export_gguf(model, tokenizer, tmp_path / "m.gguf"))
    config = model.config
    assert fields["general.architecture"] == family
    assert fields[f"{family}.block_count"] == config.n_layer
    if family != "gpt2":
        assert fields[f"{family}.attention.head_count_kv"] == config.kv_heads
        assert fields[f"{family}.rope.freq_base"] == pytest.approx(config.rope_theta)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size  # padded past the tokenizer's own vocabulary
    assert tokens[tokenizer.eos_id] == "<|endoftext|>" and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert "im_start" in fields["tokenizer.chat_template"]
    expected = gguf_tensors(model)
    assert set(tensors) == set(expected)
    assert ("output.weight" in tensors) == (not config.tie_embeddings)
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)


@pytest.mark.parametrize("kind,tolerance", [("f16", 1e-3), ("q8_0", 1e-2), ("q4_0", 0.2)])
def test_quantized_files_round_trip_within_their_precision(tmp_path: Path, tokenizer: Tokenizer, kind: str,
                                                           tolerance: float) -> None:
    model = _model("qwen2", tokenizer)
    _, tensors = _read(export_gguf(model, tokenizer, tmp_path / f"m-{kind}.gguf", kind))  # type: ignore[arg-type]
    for name, value in gguf_tensors(model).items():
        scale = value.abs().max().item()
        np.testing.assert_allclose(tensors[name], value.numpy(), atol=tolerance * scale, rtol=0, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(n_heads=st.integers(1, 4), half=st.integers(1, 8), positions=st.lists(st.integers(0, 500), min_size=1,
                                                                            max_size=4))
def test_interleaved_rows_rotate_as_pairs_what_halves_rotate(n_heads: int, half: int, positions: list[int]) -> None:
    """q·k after omnilm's halves rotation equals q'·k' after llama.cpp's adjacent-pair rotation on reordered rows."""
    head_dim, torch_gen = 2 * half, torch.Generator().manual_seed(len(positions))
    x = torch.randn(n_heads * head_dim, 3, generator=torch_gen)  # a projection's output rows
    pos = torch.tensor([positions])
    cos, sin = rope_cos_sin(pos, head_dim, 10000.0, torch.float32)
    heads = x.T.reshape(3, n_heads, head_dim)[:, :, None, :].expand(3, n_heads, len(positions), head_dim)
    halves = apply_rope(heads, cos[0, 0], sin[0, 0])
    moved = interleave_rotary_rows(x, n_heads).T.reshape(3, n_heads, 1, half, 2).expand(3, n_heads, len(positions),
                                                                                        half, 2)
    angle = pos[0, :, None] / (10000.0 ** (torch.arange(half) * 2 / head_dim))  # (T, half)
    c, s = angle.cos(), angle.sin()
    pairs = torch.stack((moved[..., 0] * c - moved[..., 1] * s, moved[..., 0] * s + moved[..., 1] * c), dim=-1)
    # Same vector up to the order of its coordinates: pair j holds coordinates j and j + half (the tolerance
    # covers the two ways of rounding fp32 angles at positions in the hundreds).
    torch.testing.assert_close(pairs.flatten(-2), torch.cat((halves[..., :half, None], halves[..., half:, None]),
                                                            dim=-1).flatten(-2), atol=1e-4, rtol=1e-4)


def test_refuses_what_llama_cpp_would_read_differently(tokenizer: Tokenizer, tmp_path: Path) -> None:
    quantized = _model("llama", tokenizer)
    quantize_model(quantized, 8, group_size=32)
    with pytest.raises(UserError, match="unquantized"):
        export_gguf(quantized, tokenizer, tmp_path / "q.gguf")
    with pytest.raises(UserError, match="embeddings"):
        gguf_vocab(tokenizer, vocab_size=tokenizer.vocab_size - 1)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


# ---------------------------------------------------------------------------------------------
# llama.cpp itself


def _llama(path: Path):  # noqa: ANN202
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False,
                           type_k=0, type_v=0)  # f32 KV cache (GGML_TYPE_F32): llama.cpp defaults to f16


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_llama_cpp_scores_and_continues_like_omnilm(tmp_path: Path, family: str, tokenizer: Tokenizer) -> None:
    model = _model(family, tokenizer)
    llm = _llama(export_gguf(model, tokenizer, tmp_path / "m.gguf"))
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
        llm.reset()
        llm.eval(ids)
        ours = model(torch.tensor([ids]))[0]
        theirs = torch.tensor(np.asarray(llm.scores[:len(ids)]))
        # ggml evaluates GELU through an fp16 lookup table, hence the looser bound for gpt2.
        atol = 1e-2 if family == "gpt2" else 2e-3
        torch.testing.assert_close(theirs, ours, atol=atol, rtol=1e-3)
        llm.reset()
        generated = list(_greedy_llama_cpp(llm, ids, 32))
        expected = _greedy_omnilm(model, ids, 32)
        assert generated == expected, prompt


def _fitted(tokenizer: Tokenizer) -> Transformer:
    """A qwen2-family model fitted to the test corpus: its continuations are confident, as a trained model's are."""
    rows = [tokenizer.encode(line)[:48] for line in CORPUS]
    batch = torch.tensor([row + [tokenizer.pad_id] * (48 - len(row)) for row in rows])
    model = _model("qwen2", tokenizer, init_std=0.02).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_llama_cpp_q8_0_starts_like_omnilm_on_a_fitted_model(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """llama.cpp's q8_0 also rounds the activations to 8 bits, so only a model that knows its continuations (not a
    random one, whose top tokens are close) is expected to keep omnilm's first tokens."""
    model = _fitted(tokenizer)
    llm = _llama(export_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0"))
    for line in CORPUS:
        ids = tokenizer.encode(line)[:6]
        assert list(_greedy_llama_cpp(llm, ids, 8)) == _greedy_omnilm(model, ids, 8), line


def _greedy_llama_cpp(llm, ids: list[int], n: int):  # noqa: ANN001, ANN202
    for count, token in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
        if count == n:
            return
        yield token


@torch.no_grad()
def _greedy_omnilm(model, ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    from omnilm.infer.generate import generate_ids
    from omnilm.infer.sampling import SamplingParams

    steps = generate_ids(model, [ids], SamplingParams(temperature=0.0, max_new_tokens=n))
    return [int(step[0]) for step in steps]
