"""Checkpoint interop with Hugging Face transformers, which serves as the independent oracle."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

from helpers import small_model
from omnilm.model.hf import CheckpointError, load_pretrained, save_pretrained

TOL = dict(atol=1e-4, rtol=0)


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(ids).logits


# GPT2LMHeadModel always ties its head, so gpt2 is tested tied only.
@pytest.mark.parametrize("family, tied", [("gpt2", True), ("llama", True), ("llama", False), ("qwen2", True),
                                          ("qwen2", False)])
def test_omnilm_checkpoint_loads_in_transformers_with_same_logits(tmp_path, family, tied):
    model = small_model(family, tie_embeddings=tied)
    save_pretrained(model, tmp_path)
    ids = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        ours = model(ids)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected_class = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    assert type(hf_model).__name__ == expected_class
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours, **TOL)


HF_CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4),
    "llama": lambda: LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 rope_theta=50000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "qwen2": lambda: Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True),
}


def test_transformers_checkpoint_loads_in_omnilm_with_same_logits(tmp_path, family):
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(HF_CONFIGS[family]()).eval()
    if family == "qwen2":  # random init leaves the QKV biases at zero; make them count
        for layer in hf_model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    hf_model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.family == family
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_model(ids).logits, **TOL)


def test_sharded_checkpoint_round_trips(tmp_path):
    model = small_model("qwen2")
    save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(load_pretrained(tmp_path)(ids), expected, atol=0, rtol=0)
    torch.testing.assert_close(hf_logits(tmp_path, ids), expected, **TOL)
    # Saving again unsharded removes the index and the shards.
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_tokenizer_files_are_written_and_load_in_transformers(model_dir, tokenizer):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (model_dir / name).is_file(), name
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Alice was born in Lyon 🙂"
    assert hf_tok.encode(text) == tokenizer.encode(text)
    assert hf_tok.eos_token_id == tokenizer.eos_id
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_id


def test_load_in_another_dtype(tmp_path):
    save_pretrained(small_model("llama"), tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.norm.weight"), r"missing tensor\(s\) \['norm_f.weight'\]"),
    (lambda t: t.update(extra=torch.zeros(3)), r"unexpected tensor\(s\) \['extra'\]"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(5)}), r"shape mismatch.*norm_f.weight.*\(5,\).*\(64,\)"),
])
def test_bad_tensors_are_named(tmp_path, edit, message):
    save_pretrained(small_model("llama"), tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path)


def test_unsupported_model_type_and_missing_files(tmp_path):
    save_pretrained(small_model("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'mamba'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing file config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nowhere")


def test_unsupported_features_are_refused():
    from omnilm.model.hf import config_from_hf

    base = HF_CONFIGS["llama"]().to_dict()
    with pytest.raises(CheckpointError, match="RoPE scaling type 'longrope'"):
        config_from_hf(base | {"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}})
    with pytest.raises(CheckpointError, match="attention_bias"):
        config_from_hf(base | {"attention_bias": True})
