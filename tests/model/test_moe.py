"""Mixture-of-experts feed-forward: grouped routing against a per-token loop, router losses, and checkpoint
parity with transformers' Mixtral and Qwen2-MoE in both directions."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from helpers import small_model
from omnilm.config import ConfigError
from omnilm.infer.generate import generate_ids
from omnilm.infer.sampling import SamplingParams
from omnilm.model import ModelConfig
from omnilm.model.hf import CheckpointError, load_pretrained, save_pretrained
from omnilm.model.moe import MoE, expert_load, router_aux_loss
from omnilm.objectives.lm import causal_lm_loss

TOL = dict(atol=1e-4, rtol=0)
MIXTRAL = dict(n_experts=4, n_experts_per_tok=2, d_ff=96)
QWEN2_MOE = dict(n_experts=6, n_experts_per_tok=3, moe_d_ff=48, d_ff=112, n_shared_experts=1, shared_d_ff=80,
                 shared_expert_gate=True, norm_topk_prob=False, moe_every=1, dense_layers=(1,), n_layer=3)


def moe_layer(seed: int = 0, **overrides: object) -> tuple[MoE, ModelConfig]:
    values = dict(d_model=32, n_head=4, n_experts=5, n_experts_per_tok=2, d_ff=24, init_std=0.3)
    model = small_model("llama", seed=seed, **(values | overrides))
    return next(m for m in model.modules() if isinstance(m, MoE)), model.config


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE output computed token by token and expert by expert, the textbook way."""
    out = []
    for token in x:
        scores = moe.router(token)
        scores = scores.softmax(-1) if moe.gate_kind == "softmax" else scores.sigmoid()
        weights, chosen = scores.topk(moe.top_k)
        if moe.norm_topk_prob:
            weights = weights / weights.sum()
        y = torch.zeros_like(token)
        for w, e in zip(weights, chosen, strict=True):
            ex = moe.experts
            y = y + w * (ex.down_proj[e] @ (F.silu(ex.gate_proj[e] @ token) * (ex.up_proj[e] @ token)))
        if moe.shared is not None:
            shared = moe.shared(token)
            y = y + (torch.sigmoid(moe.shared_gate(token)) * shared if moe.shared_gate is not None else shared)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("overrides", [
    {}, {"router_gate": "sigmoid", "norm_topk_prob": False}, {"n_experts_per_tok": 1},
    {"n_shared_experts": 2, "shared_expert_gate": True}, {"n_shared_experts": 1, "n_experts_per_tok": 5},
])
def test_grouped_routing_matches_a_per_token_loop_with_gradients(overrides):
    moe, _ = moe_layer(**overrides)
    moe.double()  # float64, so both summation orders agree to tight tolerances
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    ours = moe(x)
    x_ref = x.detach().clone().requires_grad_(True)
    reference = per_token_reference(moe, x_ref.reshape(-1, 32)).reshape(2, 9, 32)
    torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)
    grads = torch.autograd.grad(ours.square().sum(), [x, moe.experts.gate_proj, moe.router.weight])
    ref_grads = torch.autograd.grad(reference.square().sum(), [x_ref, moe.experts.gate_proj, moe.router.weight])
    for ours_grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours_grad, ref_grad, atol=1e-10, rtol=1e-10)


def test_router_losses_follow_their_formulas():
    moe, config = moe_layer(n_experts=4, n_experts_per_tok=2)
    x = torch.randn(50, 32)
    moe(x)
    logits = moe.router(x).float()
    probs = logits.softmax(-1)
    chosen = probs.topk(2).indices
    share = F.one_hot(chosen, 4).sum((0, 1)).float() / chosen.numel()
    assert moe.stats.counts.tolist() == F.one_hot(chosen, 4).sum((0, 1)).tolist()
    torch.testing.assert_close(moe.stats.load_balance, 4 * (share * probs.mean(0)).sum())
    torch.testing.assert_close(moe.stats.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
    # Perfect balance gives exactly 1: uniform scores and every expert chosen equally often.
    from omnilm.model.moe import router_stats

    uniform = torch.full((4, 4), 0.25)
    balanced = router_stats(torch.zeros(4, 4), uniform, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]))
    assert float(balanced.load_balance) == pytest.approx(1.0)


def test_training_loss_adds_weighted_router_losses():
    model = small_model("llama", **MIXTRAL, router_aux_loss_coef=0.1, router_z_loss_coef=0.01).train()
    tokens = torch.randint(0, 320, (2, 17))
    loss, logs = causal_lm_loss(model, tokens)
    ce = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    balance = torch.stack([m.stats.load_balance for m in model.modules() if isinstance(m, MoE)]).mean()
    z_loss = torch.stack([m.stats.z_loss for m in model.modules() if isinstance(m, MoE)]).mean()
    torch.testing.assert_close(loss, ce + 0.1 * balance + 0.01 * z_loss)
    assert logs["moe_load_balance"] == pytest.approx(balance.item()) and logs["lm_loss"] == pytest.approx(ce.item())
    loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    loads = expert_load(model)
    assert len(loads) == 2 and all(sum(layer) == 2 * 16 * 2 for layer in loads)
    # A dense model's loss is plain cross-entropy.
    assert router_aux_loss(small_model("llama"))[0] is None


def _hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _ours_greedy(model, prompt: list[int], n: int) -> list[int]:
    steps = generate_ids(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0))
    return [int(t[0]) for t in steps]


@pytest.mark.parametrize("family, overrides, hf_class", [
    ("llama", MIXTRAL, "MixtralForCausalLM"), ("qwen2", QWEN2_MOE, "Qwen2MoeForCausalLM"),
    ("llama", MIXTRAL | {"sliding_window": 6}, "MixtralForCausalLM")])
def test_omnilm_moe_checkpoint_loads_in_transformers(tmp_path, family, overrides, hf_class):
    model = small_model(family, **overrides)
    save_pretrained(model, tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf_model).__name__ == hf_class
    ids = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), **TOL)
    prompt = ids[0, :7].tolist()
    assert _ours_greedy(model, prompt, 24) == _hf_greedy(hf_model, prompt, 24)
    # And back: the folder reloads into the same model.
    again = load_pretrained(tmp_path)
    assert again.config == replace(model.config, head_dim=model.config.dim_per_head, qkv_bias=family == "qwen2")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)


HF_MOE_CONFIGS = {
    "mixtral": lambda: MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.1,
                                     tie_word_embeddings=False),
    "qwen2_moe": lambda: Qwen2MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=40,
                                        shared_expert_intermediate_size=72, decoder_sparse_step=1,
                                        mlp_only_layers=[2], norm_topk_prob=True, max_position_embeddings=64,
                                        initializer_range=0.1, tie_word_embeddings=True),
}


@pytest.mark.parametrize("model_type", sorted(HF_MOE_CONFIGS))
def test_transformers_moe_checkpoint_loads_in_omnilm(tmp_path, model_type):
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(HF_MOE_CONFIGS[model_type]()).eval()
    with torch.no_grad():  # random init may leave routers and biases at zero; make them count
        for name, p in hf_model.named_parameters():
            if name.endswith(("gate.weight", "_bias", "proj.bias")):
                p.normal_(std=0.5)
    hf_model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.n_experts == hf_model.config.to_dict().get("num_local_experts",
                                                                  hf_model.config.to_dict().get("num_experts"))
    assert sum(isinstance(m, MoE) for m in ours.modules()) == 2  # qwen2_moe: layer 2 is dense
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_model(ids).logits, **TOL)
    prompt = ids[1, :6].tolist()
    assert _ours_greedy(ours, prompt, 20) == _hf_greedy(hf_model, prompt, 20)


@pytest.mark.parametrize("family, overrides", [
    ("llama", MIXTRAL | {"router_gate": "sigmoid", "norm_topk_prob": False}),
    ("llama", MIXTRAL | {"n_shared_experts": 1, "moe_every": 2}),
    ("qwen2", MIXTRAL | {"dense_layers": (0,)}),
])
def test_moe_without_a_transformers_class_round_trips_as_omnilm_moe(tmp_path, family, overrides):
    model = small_model(family, **overrides)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "omnilm_moe" and "not a transformers model" in config["omnilm_note"]
    again = load_pretrained(tmp_path)
    assert again.config == model.config
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
    with pytest.raises((ValueError, KeyError)):  # transformers has no such model type: refused, not misread
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_bad_moe_configs_are_refused():
    with pytest.raises(ConfigError, match="n_experts_per_tok=5"):
        ModelConfig(n_experts=4, n_experts_per_tok=5)
    with pytest.raises(ConfigError, match="SwiGLU family"):
        ModelConfig(family="gpt2", n_experts=4)


def test_missing_expert_is_named(tmp_path):
    save_pretrained(small_model("llama", **MIXTRAL), tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['blocks.1.mlp.experts.down_proj'\]"):
        load_pretrained(tmp_path)


def test_training_flops_count_the_active_experts_only():
    from omnilm.train.trainer import _flops_per_token

    moe = small_model("llama", n_experts=4, n_experts_per_tok=1, d_ff=64)
    dense = small_model("llama", d_ff=64)
    # One active expert of the dense MLP's width per token: the dense model's FLOPs plus the routers' (2 layers).
    assert _flops_per_token(moe, 32) == _flops_per_token(dense, 32) + 6 * 2 * 4 * 64


def test_left_padded_batches_generate_what_each_prompt_generates_alone():
    from helpers import solo_tokens

    model = small_model("qwen2", **QWEN2_MOE)
    prompts = [[5, 9, 11, 40, 2, 7, 8], [3, 4]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batched = [[int(t[row]) for t in generate_ids(model, prompts, params)] for row in range(2)]
    assert batched == [solo_tokens(model, p, params, set()) for p in prompts]
