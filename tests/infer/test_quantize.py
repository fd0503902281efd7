"""Weight-only quantization: the quantiser against a brute-force reference, quantized models, folders, CLI."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from helpers import CORPUS, small_model
from omnilm.data.tokenize import tokenize_corpus
from omnilm.infer import SamplingParams, TextGenerator
from omnilm.infer.layout import prepare_for_decoding
from omnilm.infer.quantize import (
    QuantizedLinear,
    dequantize_weight,
    pack_int4,
    quantize_model,
    quantize_weight,
    unpack_int4,
)
from omnilm.infer.quantized_checkpoint import safetensors_bytes, save_quantized
from omnilm.model import ModelConfig, Transformer
from omnilm.model.hf import CheckpointError, load_pretrained, save_pretrained
from omnilm.objectives.lm import evaluate_lm


def reference_dequantized(weight: torch.Tensor, qmax: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest by exhaustive search over the code grid, one group at a time.

    Returns the dequantized weight and each element's step (scale) for the error bound.
    """
    out = torch.empty_like(weight, dtype=torch.float64)
    steps = torch.empty_like(out)
    grid = torch.arange(-qmax, qmax + 1, dtype=torch.float64)
    w64 = weight.double()
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], group):
            chunk = w64[row, start:start + group]
            step = max(abs(float(v)) for v in chunk) / qmax or 1.0
            candidates = grid * step
            best = (chunk[:, None] - candidates[None, :]).abs().argmin(dim=1)
            out[row, start:start + group] = candidates[best]
            steps[row, start:start + group] = step
    return out, steps


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, 32), (4, 64), (4, 128)])
def test_quantiser_matches_brute_force_reference_within_half_a_step(bits, group):
    torch.manual_seed(bits + (group or 0))
    weight = torch.randn(24, 256) * torch.rand(24, 1) * 3
    weight[5] = 0  # an all-zero row must survive
    packed = quantize_weight(weight, bits, group or 128)
    ours = dequantize_weight(packed["qweight"], packed["scales"], bits).double()
    expected, steps = reference_dequantized(weight, 127 if bits == 8 else 7, group or weight.shape[1])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert ((ours - weight.double()).abs() <= steps / 2 + 1e-6).all()
    assert (ours[5] == 0).all()
    if bits == 4:  # really 4 bits a weight: two codes a byte, one scale a group
        assert packed["qweight"].dtype == torch.uint8 and packed["qweight"].shape == (24, 128)
        assert packed["scales"].shape == (24, 256 // group)
    else:
        assert packed["qweight"].dtype == torch.int8 and packed["scales"].shape == (24,)


def test_int4_packing_round_trip_is_exact():
    pairs = torch.cartesian_prod(torch.arange(16), torch.arange(16))  # every (low, high) pair
    codes = pairs.flatten().view(1, -1)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 256)
    assert packed.flatten().tolist() == [low + 16 * high for low, high in pairs.tolist()]
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))


@pytest.fixture(scope="module")
def trained() -> tuple[Transformer, list[torch.Tensor], list[torch.Tensor]]:
    """A tiny llama-family model fitted briefly to character-level corpus text, with held-out batches."""
    text = " ".join(CORPUS * 4).encode()
    ids = torch.tensor(list(text)) % 256
    windows = ids[: (len(ids) // 33) * 33].view(-1, 33)
    train, val = windows[:-8], windows[-8:]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                    max_seq_len=64, tie_embeddings=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = train[torch.randint(len(train), (8,), generator=torch.Generator().manual_seed(step))]
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), [val[:4], val[4:]], [train[:4]]


def _copy(model: Transformer) -> Transformer:
    clone = Transformer(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


@pytest.mark.parametrize(("bits", "group", "logit_tol", "loss_tol"), [(8, 128, 0.005, 0.005), (4, 32, 0.08, 0.05)])
def test_quantized_model_stays_close_to_float(trained, bits, group, logit_tol, loss_tol):
    model, val, _ = trained
    quantized = quantize_model(_copy(model), bits, group)
    assert all(isinstance(getattr(b.attn, p), QuantizedLinear) for b in quantized.blocks for p in ("q_proj", "o_proj"))
    assert type(quantized.lm_head) is torch.nn.Linear and type(quantized.tok_emb) is torch.nn.Embedding
    with torch.no_grad():
        ref, ours = model(val[0][:, :-1]), quantized(val[0][:, :-1])
    # Relative to the spread of the logits, per position.
    assert ((ours - ref).abs().amax(-1) / ref.std(-1)).max() < logit_tol * 10
    assert (ours - ref).norm() / ref.norm() < logit_tol
    before, after = evaluate_lm(model, val)["val_loss"], evaluate_lm(quantized, val)["val_loss"]
    assert before < 4.0, "the fixture model should have learnt something"
    assert abs(after - before) / before < loss_tol


def test_tied_head_stays_tied_and_skips_are_honoured():
    model = quantize_model(small_model("qwen2"), 8, skip=("lm_head", "down_proj"))
    assert model.lm_head.weight is model.tok_emb.weight
    assert type(model.blocks[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.blocks[0].mlp.up_proj, QuantizedLinear)
    untied = quantize_model(small_model("llama"), 8, skip=())
    assert isinstance(untied.lm_head, QuantizedLinear)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_tied_head_is_a_copy_that_saves_and_loads(tmp_path, family, bits):
    reference = small_model(family)
    assert reference.config.tie_embeddings
    model = quantize_model(_copy(reference), bits, 32, skip=())
    assert isinstance(model.lm_head, QuantizedLinear) and "lm_head" in model.quantization["modules"]
    torch.testing.assert_close(model.tok_emb.weight, reference.tok_emb.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.dequantized_weight(),
                               dequantize_weight(**quantize_weight(reference.tok_emb.weight, bits, 32), bits=bits))
    save_quantized(model, tmp_path / "q")
    loaded = load_pretrained(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantizedLinear)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize(("bits", "group"), [(8, 128), (4, 32), (4, 64)])
def test_save_load_gives_identical_logits(tmp_path, family, bits, group):
    model = quantize_model(small_model(family), bits, group)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "omnilm", "bits": bits,
                                             "group_size": group if bits == 4 else None,
                                             "modules": model.quantization["modules"]}
    loaded = load_pretrained(tmp_path / "q")
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(loaded(ids), expected)
        # Decoding re-lays plain linear weights; the quantized layers must come through unchanged.
        assert torch.equal(prepare_for_decoding(loaded)(ids), expected)
    assert loaded.quantization == model.quantization
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.tok_emb.weight
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert not any(n.endswith(("q_proj.weight", "c_attn.weight", "up_proj.weight", "c_fc.weight")) for n in names)
    assert any(n.endswith(".qweight") for n in names) and any(n.endswith(".scales") for n in names)


def test_int4_file_is_under_four_tenths_of_float32(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=512, n_layer=4, n_head=4, d_model=256, d_ff=768,
                         max_seq_len=64, tie_embeddings=True)
    model = Transformer(config).eval()
    fp32 = safetensors_bytes(save_pretrained(model, tmp_path / "fp32"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    linear_fp32 = sum(m.weight.numel() * 4 for m in linears.values())
    other = fp32 - linear_fp32  # embedding, norms and the safetensors header
    for bits, group in ((4, 32), (4, 64), (4, 128), (8, 128)):
        quantized = quantize_model(_copy(model), bits, group)
        size = safetensors_bytes(save_quantized(quantized, tmp_path / f"q{bits}-{group}"))
        scales_per_row = {m: m.in_features // group if bits == 4 else 1 for m in linears.values()}
        expected = other + sum(m.weight.numel() * bits // 8 + m.out_features * scales_per_row[m] * 4
                               for m in linears.values())  # codes + float32 scales
        assert abs(size - expected) < 16_384, (bits, group, size, expected)  # only header sizes differ
        if bits == 4:
            assert (size - other) / linear_fp32 < 0.4 and size / fp32 < 0.4


@pytest.fixture
def val_data(tmp_path, tokenizer):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i in range(40) for t in CORPUS))
    tokenizer.save(tmp_path / "tok")
    tokenize_corpus([str(docs)], tmp_path / "tok", tmp_path / "tokens", val_fraction=0.3, workers=1,
                    progress=False)
    return tmp_path / "tokens"


def omnilm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnilm.cli", *args], capture_output=True, timeout=300, text=True)


@pytest.mark.parametrize("family", ["llama"])
def test_quantize_cli_then_generate(tmp_path, model_dir, val_data):
    out = tmp_path / "q4"
    result = omnilm("quantize", "--model", str(model_dir), "--bits", "4", "--group-size", "32", "--out", str(out),
                    "--eval-data", str(val_data), "--eval-seq-len", "32", "--eval-batch-size", "2",
                    "--eval-batches", "2")
    assert result.returncode == 0, result.stderr
    assert f"{safetensors_bytes(model_dir) / 1e6:.2f} MB -> {safetensors_bytes(out) / 1e6:.2f} MB" in result.stdout
    assert "val loss:" in result.stdout and "perplexity:" in result.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    prompt = "Alice was born in"
    generated = omnilm("generate", "--model", str(out), "--prompt", prompt, "--temperature", "0",
                       "--max-new-tokens", "12")
    assert generated.returncode == 0, generated.stderr
    expected = TextGenerator.from_pretrained(out).generate(prompt, SamplingParams(temperature=0, max_new_tokens=12))
    assert generated.stdout == expected[0]


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unsupported quantization width 3 bits"):
        quantize_model(small_model("llama"), 3)
    model = small_model("llama")
    with pytest.raises(ValueError, match="group size 48 does not divide the 64 input features"):
        quantize_model(model, 4, group_size=48)
    assert not hasattr(model, "quantization")  # nothing was half-replaced
    assert all(type(m) is not QuantizedLinear for m in model.modules())
    result = omnilm("quantize", "--model", str(tmp_path), "--bits", "3", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "invalid choice: 3" in result.stderr
    folder = save_quantized(quantize_model(small_model("llama"), 8), tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported quantization_config quant_method 'gptq'"):
        load_pretrained(folder)
