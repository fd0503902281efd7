"""LoRA against PEFT on the Hugging Face export of the same model, which serves as the independent oracle."""

import json

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from helpers import small_model
from omnilm.adapters import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
    trainable_report,
)
from omnilm.config import ConfigError, from_dict
from omnilm.model.hf import save_pretrained

TOL = dict(atol=1e-4, rtol=0)
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomise_lora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and fresh A) so the adapter changes the outputs noticeably."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(7))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_omnilm_adapter_loads_in_peft_with_same_logits(tmp_path, family):
    model = small_model(family)
    save_pretrained(model, tmp_path / "base")
    base_logits = logits(model, ids())
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=ALL_LINEARS))
    randomise_lora(model)
    ours = logits(model, ids())
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter really matters
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(ALL_LINEARS)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, ids()), ours, **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_adapter_loads_in_omnilm_with_same_logits(tmp_path, family):
    model = small_model(family)
    save_pretrained(model, tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                                  task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, peft_config)
    randomise_lora(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "adapter")

    load_adapter(model, tmp_path / "adapter")
    assert len([m for m in model.modules() if isinstance(m, LoraLinear)]) == 3 * model.config.n_layer
    torch.testing.assert_close(logits(model, ids()), logits(peft_model.eval(), ids()), **TOL)


def test_peft_counts_same_trainable_parameters():
    model = small_model("llama")
    config = LoraConfig(r=4, alpha=8, target_modules=ALL_LINEARS)
    total_before = model.num_params()
    # Independent count: r·(in + out) per adapted linear.
    expected = sum(4 * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ALL_LINEARS)
    apply_lora(model, config)
    trainable, total = trainable_parameters(model)
    assert trainable == expected and total == total_before + expected
    assert trainable_report(model).startswith(f"trainable params: {expected:,} || all params: {total:,}")

    hf = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=model.config.ff_dim, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEARS))
    assert peft_model.get_nb_trainable_parameters() == (trainable, total)


def test_merge_unmerge_and_merged_checkpoint_loads_in_transformers(tmp_path):
    model = small_model("qwen2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=16, target_modules=ALL_LINEARS))
    randomise_lora(model)
    adapted = logits(model, ids())
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.merge()
    assert all(layer.merged for layer in layers)
    torch.testing.assert_close(logits(model, ids()), adapted, **TOL)
    for layer in layers:
        layer.unmerge()
    torch.testing.assert_close(logits(model, ids()), adapted, **TOL)
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    for k, v in original.items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=0)

    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(original)
    torch.testing.assert_close(logits(model, ids()), adapted, **TOL)
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(hf, ids()), adapted, **TOL)


def test_only_lora_trains_and_loss_falls():
    model = small_model("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    model.train()
    x = ids(2, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in name), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert set(lora_state_dict(model)) == {f"blocks.{i}.{m}.lora_{p}.weight" for i in range(2)
                                           for m in ("attn.q_proj", "attn.v_proj", "mlp.up_proj") for p in "AB"}


def test_dropout_only_in_training():
    base = nn.Linear(8, 4)
    layer = LoraLinear(base, r=2, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    layer.eval()
    expected = base(x) + (x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()) * 2
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), expected)


def test_unknown_and_non_linear_targets_are_named():
    with pytest.raises(ConfigError, match=r"\['qproj'\].*q_proj"):
        apply_lora(small_model("llama"), LoraConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(ConfigError, match=r"must be nn.Linear.*blocks\.0\.mlp"):
        apply_lora(small_model("llama"), LoraConfig(target_modules=["mlp"]))
    with pytest.raises(ConfigError, match="tied"):
        apply_lora(small_model("qwen2"), LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(LoraConfig, {"rank": 4})
    with pytest.raises(ConfigError, match="positive"):
        LoraConfig(r=0)
    model = apply_lora(small_model("llama"), LoraConfig())
    with pytest.raises(ConfigError, match="already"):
        apply_lora(model, LoraConfig())


def test_gpt2_fused_qkv_export_is_refused(tmp_path):
    model = apply_lora(small_model("gpt2"), LoraConfig(target_modules=["q_proj", "o_proj"]))
    with pytest.raises(ConfigError, match=r"not supported.*blocks\.0\.attn\.q_proj.*c_attn"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_gpt2_separate_layers_export_to_peft_conv1d(tmp_path):
    model = small_model("gpt2")
    save_pretrained(model, tmp_path / "base")
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["attn.o_proj", "up_proj"]))
    randomise_lora(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # Conv1D layers store (in, out); o_proj alone needs a two-part name because mlp.c_proj exists too.
    assert config["fan_in_fan_out"] and sorted(config["target_modules"]) == ["attn.c_proj", "c_fc"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, ids()), logits(model, ids()), **TOL)
    # And back: the same folder into a fresh omnilm model.
    fresh = load_adapter(small_model("gpt2"), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, ids()), logits(model, ids()), atol=0, rtol=0)


def test_adapter_for_other_layers_is_refused(tmp_path):
    model = apply_lora(small_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    with pytest.raises(ConfigError, match="match no LoRA layer"):
        load_adapter(small_model("gpt2"), tmp_path)
    with pytest.raises(ConfigError, match="shape"):
        load_adapter(small_model("llama", d_model=32), tmp_path)
    with pytest.raises(ConfigError, match="already"):
        load_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ConfigError, match="unsupported LoRA option.*use_dora"):
        load_adapter(small_model("llama"), tmp_path)


def test_adapter_on_some_layers_only_exports_precise_targets(tmp_path):
    model = small_model("llama")
    save_pretrained(model, tmp_path / "base")
    apply_lora(model, LoraConfig(r=2, alpha=2, target_modules=["blocks.1.attn.q_proj", "lm_head"]))
    randomise_lora(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["1.self_attn.q_proj", "lm_head"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert peft_model.get_nb_trainable_parameters()[1] == trainable_parameters(model)[1]
    torch.testing.assert_close(logits(peft_model, ids()), logits(model, ids()), **TOL)
