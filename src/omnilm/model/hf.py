"""Checkpoints in the Hugging Face layout (GPT2LMHeadModel, BloomForCausalLM for ALiBi models, LlamaForCausalLM,
MistralForCausalLM for sliding-window Llamas, Qwen2ForCausalLM, and for mixture-of-experts models
MixtralForCausalLM / Qwen2MoeForCausalLM, whose experts are stored one tensor each).

A model folder holds ``config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), ``generation_config.json`` and, when given a tokenizer,
``tokenizer.json`` + ``tokenizer_config.json``. Folders written here load with
``transformers.AutoModelForCausalLM.from_pretrained`` and folders written by transformers load
here. Only safetensors are read: pickle-based ``pytorch_model.bin`` files are refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omnilm.model.config import ROPE_SCALING_KEYS, ModelConfig
from omnilm.model.transformer import Transformer
from omnilm.utils.atomic import atomic_path, write_json_atomic

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: A mixture-of-experts model of each family is the Hugging Face MoE model type of that family.
MOE_MODEL_TYPES = {"llama": "mixtral", "qwen2": "qwen2_moe"}
MOE_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
#: The model type of an MoE that no transformers class computes (omnilm only; see _moe_config_to_hf).
OMNILM_MOE = "omnilm_moe"
#: Per MoE model type: the feed-forward's module name, and each stacked expert tensor's per-expert name.
MOE_LAYOUTS = {
    "mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen2_moe": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
}


class CheckpointError(ValueError):
    """A model folder cannot be read or does not match the model it should fill."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The config.json of ``config`` for its Hugging Face architecture."""
    common = {
        "architectures": [HF_ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.init_std,
        "dtype": "float32",
    }
    if config.family == "gpt2" and config.alibi:
        return _bloom_config_to_hf(config, common)
    if config.family == "gpt2":
        if config.head_dim not in (None, config.d_model // config.n_head):
            raise CheckpointError("gpt2 checkpoints need head_dim == d_model // n_head")
        if config.embedding_norm:
            raise CheckpointError("GPT2LMHeadModel has no embedding norm (BLOOM has, with ALiBi: set alibi too)")
        return common | {
            "n_embd": config.d_model, "n_layer": config.n_layer, "n_head": config.n_head,
            "n_inner": config.ff_dim, "n_positions": config.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    if config.family == "llama" and config.qkv_bias:
        raise CheckpointError("a llama-family model with qkv_bias has no LlamaForCausalLM equivalent; "
                              "use family 'qwen2' for QKV biases")
    hf = common | {
        "hidden_size": config.d_model, "intermediate_size": config.ff_dim,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads, "head_dim": config.dim_per_head,
        "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "attention_dropout": config.dropout,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }
    if config.mrope_section is not None:
        hf["rope_parameters"]["mrope_section"] = list(config.mrope_section)
    if config.rope_scaling is not None:
        # transformers 5 reads rope_parameters, 4.x rope_scaling; both say the same.
        hf["rope_parameters"] |= config.rope_scaling
        hf["rope_scaling"] = dict(config.rope_scaling)
    if config.alibi:
        raise CheckpointError("a llama/qwen2-family model with ALiBi has no transformers equivalent")
    if config.family == "llama":
        hf |= {"attention_bias": False, "mlp_bias": False}
        if config.sliding_window is not None:
            # Llama with a sliding window over every layer is Mistral's architecture.
            if config.window_from_layer:
                raise CheckpointError("Mistral slides the window over every layer (window_from_layer must be 0); "
                                      "use family 'qwen2' for full-attention lower layers")
            hf |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                   "sliding_window": config.sliding_window}
    else:
        hf |= {"use_sliding_window": config.sliding_window is not None, "sliding_window": config.sliding_window,
               "max_window_layers": config.window_from_layer}
    if config.n_experts:
        hf = _moe_config_to_hf(config, hf)
    return hf


def _moe_config_to_hf(config: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
    """A llama MoE as Mixtral, a qwen2 MoE as Qwen2-MoE. An MoE that neither can express (sigmoid router, shared
    experts on llama, ...) gets omnilm's own model type ``omnilm_moe``, with the whole ModelConfig in the file:
    omnilm reads it back, transformers refuses it (rather than running another function)."""
    model_type = MOE_MODEL_TYPES[config.family]
    problem = _moe_problem(config, model_type)
    if problem is not None:
        return hf | {"architectures": ["OmnilmMoeForCausalLM"], "model_type": OMNILM_MOE,
                     "omnilm_note": f"not a transformers model: {problem}", "omnilm_config": dataclasses.asdict(config)}
    common = {"architectures": [MOE_ARCHITECTURES[model_type]], "model_type": model_type,
              "num_experts_per_tok": config.n_experts_per_tok, "router_aux_loss_coef": config.router_aux_loss_coef,
              "router_z_loss_coef": config.router_z_loss_coef, "output_router_logits": False}
    if model_type == "mixtral":
        hf = {k: v for k, v in hf.items() if k not in ("attention_bias", "mlp_bias")}
        return hf | common | {"num_local_experts": config.n_experts, "intermediate_size": config.expert_dim,
                              "sliding_window": config.sliding_window, "router_jitter_noise": 0.0}
    return hf | common | {
        "num_experts": config.n_experts, "moe_intermediate_size": config.expert_dim,
        "shared_expert_intermediate_size": config.shared_dim, "norm_topk_prob": config.norm_topk_prob,
        "decoder_sparse_step": config.moe_every, "mlp_only_layers": list(config.dense_layers), "qkv_bias": True}


def _moe_problem(config: ModelConfig, model_type: str) -> str | None:
    """Why ``config`` is no ``model_type`` model (None when it is one)."""
    if config.router_gate != "softmax":
        return f"{model_type} routes with softmax, this model with {config.router_gate} scores"
    if model_type == "mixtral":
        if config.n_shared_experts or not config.norm_topk_prob or config.moe_every != 1 or config.dense_layers:
            return ("Mixtral has no shared experts or dense layers and renormalises the top-k scores (family "
                    "'qwen2', Qwen2-MoE, has those)")
        return None
    if config.sliding_window is not None:
        return "omnilm reads no qwen2_moe sliding window (Mixtral's, family 'llama', is supported)"
    if config.n_shared_experts != 1 or not config.shared_expert_gate:
        return "Qwen2-MoE has exactly one shared expert with a sigmoid gate"
    return None


def _moe_config_from_hf(hf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """ModelConfig fields of a Mixtral / Qwen2-MoE config.json."""
    common = {"n_experts_per_tok": _require(hf, "num_experts_per_tok", source),
              "router_aux_loss_coef": hf.get("router_aux_loss_coef", 0.01),
              "router_z_loss_coef": hf.get("router_z_loss_coef", 0.0)}
    if model_type == "mixtral":
        return common | {"n_experts": _require(hf, "num_local_experts", source), "norm_topk_prob": True}
    if not hf.get("qkv_bias", True):
        raise CheckpointError(f"{source}: qwen2_moe without qkv_bias is not supported")
    shared = hf.get("shared_expert_intermediate_size", 0)
    return common | {
        "n_experts": _require(hf, "num_experts", source), "moe_d_ff": _require(hf, "moe_intermediate_size", source),
        "n_shared_experts": 1 if shared else 0, "shared_d_ff": shared or None, "shared_expert_gate": bool(shared),
        "norm_topk_prob": hf.get("norm_topk_prob", False), "moe_every": hf.get("decoder_sparse_step", 1),
        "dense_layers": tuple(hf.get("mlp_only_layers") or ())}


def _bloom_config_to_hf(config: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    """A gpt2-family model with ALiBi and an embedding norm is BLOOM's architecture."""
    if not config.embedding_norm or not config.tie_embeddings or config.ff_dim != 4 * config.d_model \
            or config.head_dim not in (None, config.d_model // config.n_head):
        raise CheckpointError("an ALiBi model saves as BloomForCausalLM, which needs embedding_norm, a tied head, "
                              "d_ff = 4·d_model and head_dim = d_model // n_head")
    return common | {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": config.d_model,
        "n_layer": config.n_layer, "n_head": config.n_head, "layer_norm_epsilon": config.norm_eps,
        "apply_residual_connection_post_layernorm": False, "hidden_dropout": config.dropout,
        "attention_dropout": config.dropout, "pretraining_tp": 1, "slow_but_exact": False,
        # BLOOM has no position table; the length a model is meant for is recorded for omnilm.
        "seq_length": config.max_seq_len}


def _bloom_config_from_hf(hf: dict[str, Any], ids: dict[str, Any], source: str) -> ModelConfig:
    if hf.get("apply_residual_connection_post_layernorm") or hf.get("pretraining_tp", 1) != 1 \
            and hf.get("slow_but_exact"):
        raise CheckpointError(f"{source}: BLOOM variants apply_residual_connection_post_layernorm / "
                              "slow_but_exact are not supported")
    d = _require(hf, "hidden_size", source)
    return ModelConfig(
        family="gpt2", alibi=True, embedding_norm=True, vocab_size=_require(hf, "vocab_size", source),
        n_layer=_require(hf, "n_layer", source), n_head=_require(hf, "n_head", source), d_model=d, d_ff=4 * d,
        max_seq_len=hf.get("seq_length", 2048), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02), **ids)


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise CheckpointError(f"{source}: config.json lacks {key!r}")
    return hf[key]


def _mrope_section(hf: dict[str, Any]) -> tuple[int, ...] | None:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    section = params.get("mrope_section")
    return tuple(section) if section else None


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling(hf: dict[str, Any], source: str) -> dict[str, Any] | None:
    """ModelConfig.rope_scaling from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x), with
    transformers' defaults filled in (original_max_position_embeddings = max_position_embeddings; a YaRN factor
    of None = the ratio of the two)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type in ("default", "mrope"):  # mrope: Qwen2-VL's spelling of default frequencies with mrope_section
        return None
    if rope_type not in ROPE_SCALING_KEYS:
        raise CheckpointError(f"{source}: unsupported RoPE scaling type {rope_type!r} (supported: default, "
                              f"{', '.join(sorted(ROPE_SCALING_KEYS))})")
    required, optional = ROPE_SCALING_KEYS[rope_type]
    scaling = {k: v for k, v in params.items() if k in required | optional}
    if "original_max_position_embeddings" in required:
        scaling.setdefault("original_max_position_embeddings",
                           hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return {"rope_type": rope_type} | scaling


def _sliding_window(hf: dict[str, Any], model_type: str, n_layer: int, source: str) -> dict[str, Any]:
    """sliding_window / window_from_layer of a Mistral or Qwen2 config.json."""
    if model_type in ("mistral", "mixtral"):  # every layer slides (or none, without a window)
        return {"sliding_window": hf.get("sliding_window")}
    if model_type == "qwen2_moe" and hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: qwen2_moe sliding-window attention is not supported")
    if model_type != "qwen2" or not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return {}
    start = hf.get("max_window_layers", 28)
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        start = sliding[0] if sliding else n_layer
        if sliding != list(range(start, n_layer)):
            raise CheckpointError(f"{source}: layer_types {layer_types} is not full attention followed by "
                                  "sliding-window layers")
    if start >= n_layer:
        return {}
    return {"sliding_window": hf["sliding_window"], "window_from_layer": start}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict; unsupported features are errors."""
    model_type = hf.get("model_type")
    ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {k: (v[0] if isinstance(v, list) and v else v) for k, v in ids.items()}
    if model_type == OMNILM_MOE:
        from omnilm.config import from_dict

        return from_dict(ModelConfig, _require(hf, "omnilm_config", source), source=source)
    if model_type == "bloom":
        return _bloom_config_from_hf(hf, ids, source)
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{source}: unsupported gpt2 activation {act!r} (omnilm uses tanh-GELU)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise CheckpointError(f"{source}: gpt2 attention variants scale_attn_by_inverse_layer_idx / "
                                  "reorder_and_upcast_attn are not supported")
        d = _require(hf, "n_embd", source)
        return ModelConfig(
            family="gpt2", vocab_size=_require(hf, "vocab_size", source), n_layer=_require(hf, "n_layer", source),
            n_head=_require(hf, "n_head", source), d_model=d, d_ff=hf.get("n_inner") or 4 * d,
            max_seq_len=hf.get("n_positions", 1024), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02),
            **ids)
    if model_type in ("llama", "qwen2", "mixtral", "qwen2_moe", "mistral"):
        family = {"mixtral": "llama", "qwen2_moe": "qwen2", "mistral": "llama"}.get(model_type, model_type)
        moe = _moe_config_from_hf(hf, model_type, source) if model_type in MOE_ARCHITECTURES else {}
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: unsupported activation {hf.get('hidden_act')!r} (expected silu)")
        if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise CheckpointError(f"{source}: llama attention_bias/mlp_bias are not supported")
        n_head = _require(hf, "num_attention_heads", source)
        d = _require(hf, "hidden_size", source)
        return ModelConfig(
            family=family, vocab_size=_require(hf, "vocab_size", source),
            n_layer=_require(hf, "num_hidden_layers", source), n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d,
            d_ff=_require(hf, "intermediate_size", source), head_dim=hf.get("head_dim") or d // n_head,
            max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=_rope_theta(hf, source),
            mrope_section=_mrope_section(hf), rope_scaling=_rope_scaling(hf, source),
            **_sliding_window(hf, model_type, _require(hf, "num_hidden_layers", source), source),
            norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=family == "qwen2",
            tie_embeddings=hf.get("tie_word_embeddings", model_type == "qwen2"),
            init_std=hf.get("initializer_range", 0.02), **ids, **moe)
    raise CheckpointError(f"{source}: unsupported model_type {model_type!r}; omnilm reads gpt2, bloom, llama, "
                          "qwen2, mistral, mixtral and qwen2_moe")


# ---------------------------------------------------------------------------------------------
# parameter names and layouts


def _llama_name(name: str, moe_module: str = "mlp") -> str:
    """omnilm parameter name -> Llama/Qwen2 name (a one-to-one renaming; stacked MoE experts excepted, see
    ``_expert_names``). ``moe_module`` is the MoE feed-forward's module name (Mixtral's block_sparse_moe)."""
    if name in ("tok_emb.weight", "norm_f.weight"):
        return {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}[name]
    if name.startswith("blocks."):
        return ("model.layers." + name[len("blocks."):]).replace(".norm1.", ".input_layernorm.").replace(
            ".norm2.", ".post_attention_layernorm.").replace(".attn.", ".self_attn.").replace(
            ".mlp.router.", f".{moe_module}.gate.").replace(".mlp.shared.", ".mlp.shared_expert.").replace(
            ".mlp.shared_gate.", ".mlp.shared_expert_gate.")
    return name  # lm_head.weight


def _is_stacked_experts(name: str) -> bool:
    return ".mlp.experts." in name


def _expert_names(name: str, n_experts: int, config: ModelConfig) -> list[str]:
    """The Hugging Face names of the per-expert slices of a stacked expert tensor, e.g.
    blocks.0.mlp.experts.gate_proj -> model.layers.0.block_sparse_moe.experts.{j}.w1.weight (Mixtral)."""
    module, names = MOE_LAYOUTS[MOE_MODEL_TYPES[config.family]]
    layer, projection = name.split(".")[1], name.rsplit(".", 1)[1]
    return [f"model.layers.{layer}.{module}.experts.{j}.{names[projection]}.weight" for j in range(n_experts)]


def _moe_module(config: ModelConfig) -> str:
    return MOE_LAYOUTS[MOE_MODEL_TYPES[config.family]][0] if config.n_experts else "mlp"


def _gpt2_state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 keeps q/k/v fused in ``c_attn`` and stores linears as Conv1D (in, out) matrices."""
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"]}
    for suffix in ("weight", "bias"):
        out[f"transformer.ln_f.{suffix}"] = state[f"norm_f.{suffix}"]
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [state[f"{ours}attn.{p}_proj.weight"] for p in "qkv"]
        out[hf + "attn.c_attn.weight"] = torch.cat(qkv, 0).t()
        out[hf + "attn.c_attn.bias"] = torch.cat([state[f"{ours}attn.{p}_proj.bias"] for p in "qkv"], 0)
        for hf_name, our_name in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                                  ("mlp.c_proj", "mlp.down_proj")):
            out[f"{hf}{hf_name}.weight"] = state[f"{ours}{our_name}.weight"].t()
            out[f"{hf}{hf_name}.bias"] = state[f"{ours}{our_name}.bias"]
        for hf_name, our_name in (("ln_1", "norm1"), ("ln_2", "norm2")):
            for suffix in ("weight", "bias"):
                out[f"{hf}{hf_name}.{suffix}"] = state[f"{ours}{our_name}.{suffix}"]
    # A model without an LM head (a reward model's backbone) has none to write.
    if not config.tie_embeddings and "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def _gpt2_state_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    # Original GPT-2 files have no "transformer." prefix and carry causal-mask buffers; accept both.
    hf = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in hf.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    out: dict[str, torch.Tensor] = {}
    renames = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "norm_f.weight",
               "ln_f.bias": "norm_f.bias", "lm_head.weight": "lm_head.weight"}
    layer_renames = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj",
                     "mlp.c_proj": "mlp.down_proj"}
    for key, tensor in hf.items():
        if key in renames:
            out[renames[key]] = tensor
            continue
        parts = key.split(".")
        if parts[0] != "h" or len(parts) < 4:
            out[key] = tensor  # reported as unexpected by the caller
            continue
        ours, module, suffix = f"blocks.{parts[1]}.", ".".join(parts[2:-1]), parts[-1]
        if module == "attn.c_attn":
            # Split into q/k/v; weights go back from Conv1D (in, out) to Linear (out, in).
            chunks = tensor.chunk(3, dim=-1)
            for p, chunk in zip("qkv", chunks, strict=True):
                out[f"{ours}attn.{p}_proj.{suffix}"] = chunk.t() if suffix == "weight" else chunk
        elif module in layer_renames:
            is_linear_weight = suffix == "weight" and not module.startswith("ln_")
            out[f"{ours}{layer_renames[module]}.{suffix}"] = tensor.t() if is_linear_weight else tensor
        else:
            out[key] = tensor
    return out


#: BLOOM tensor names (one template list, both directions); q/k/v are fused per head and handled apart.
BLOOM_KEYS = [("tok_emb.weight", "transformer.word_embeddings.weight"), ("lm_head.weight", "lm_head.weight")] + [
    (f"{ours}.{suffix}", f"{theirs}.{suffix}") for suffix in ("weight", "bias") for ours, theirs in (
        ("emb_norm", "transformer.word_embeddings_layernorm"), ("norm_f", "transformer.ln_f"),
        ("blocks.{i}.norm1", "transformer.h.{i}.input_layernorm"),
        ("blocks.{i}.norm2", "transformer.h.{i}.post_attention_layernorm"),
        ("blocks.{i}.attn.o_proj", "transformer.h.{i}.self_attention.dense"),
        ("blocks.{i}.mlp.up_proj", "transformer.h.{i}.mlp.dense_h_to_4h"),
        ("blocks.{i}.mlp.down_proj", "transformer.h.{i}.mlp.dense_4h_to_h"))]


def _bloom_state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    from omnilm.model.hf_table import KeyTable

    state = dict(state)
    for i in range(config.n_layer):
        for suffix in ("weight", "bias"):
            # BLOOM's fused rows are per head (q, k, v) interleaved: (H, 3, D, ...) flattened.
            parts = [state.pop(f"blocks.{i}.attn.{p}_proj.{suffix}") for p in "qkv"]
            fused = torch.stack([x.unflatten(0, (config.n_head, -1)) for x in parts], dim=1).flatten(0, 2)
            state[f"transformer.h.{i}.self_attention.query_key_value.{suffix}"] = fused
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return KeyTable(BLOOM_KEYS).to_hf(state)


def _bloom_state_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    from omnilm.model.hf_table import KeyTable

    hf = {(k if k.startswith(("transformer.", "lm_head")) else "transformer." + k): v for k, v in hf.items()}
    if config.tie_embeddings:
        hf.pop("lm_head.weight", None)
    out = {}
    for key in [k for k in hf if k.endswith(("query_key_value.weight", "query_key_value.bias"))]:
        layer, suffix = key.split(".")[2], key.rsplit(".", 1)[1]
        q, k, v = hf.pop(key).unflatten(0, (config.n_head, 3, -1)).unbind(1)
        for name, tensor in zip("qkv", (q, k, v), strict=True):
            out[f"blocks.{layer}.attn.{name}_proj.{suffix}"] = tensor.flatten(0, 1)
    return out | KeyTable(BLOOM_KEYS).from_hf(hf)


def state_to_hf(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights (or ``state``, omnilm-named, e.g. gathered from shards) under Hugging Face names and
    layouts (contiguous, tied head omitted)."""
    state = {k: v.detach() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.alibi:
        out = _bloom_state_to_hf(state, model.config)
    elif model.config.family == "gpt2":
        out = _gpt2_state_to_hf(state, model.config)
    else:
        out = {}
        for k, v in state.items():
            if k == "lm_head.weight" and model.config.tie_embeddings:
                continue
            if _is_stacked_experts(k):
                out |= dict(zip(_expert_names(k, v.shape[0], model.config), v.unbind(0), strict=True))
            else:
                out[_llama_name(k, _moe_module(model.config))] = v
    return {k: v.contiguous() for k, v in out.items()}


def state_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face weights renamed to omnilm's names (unknown names are kept, to be reported).

    Every tensor is contiguous: loaders assign them as parameters, and a transposed view (GPT-2's Conv1D
    layout) would give a parameter whose memory layout differs from that of optimizer moments restored from a
    checkpoint, which PyTorch's fused AdamW kernel does not handle (it pairs elements by memory position)."""
    if config.alibi:
        return {k: v.contiguous() for k, v in _bloom_state_from_hf(hf, config).items()}
    if config.family == "gpt2":
        return {k: v.contiguous() for k, v in _gpt2_state_from_hf(hf, config).items()}
    expected = _expected_shapes(config)
    module = _moe_module(config)
    reverse = {_llama_name(k, module): k for k in expected if not _is_stacked_experts(k)}
    experts = {k: _expert_names(k, shape[0], config) for k, shape in expected.items() if _is_stacked_experts(k)}
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    out = {}
    for name, parts in experts.items():
        if all(part in hf for part in parts):  # else missing: check_tensors names it
            out[name] = torch.stack([hf.pop(part) for part in parts])
    return out | {reverse.get(k, k): v for k, v in hf.items()}


def _expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = Transformer(config)
    return {k: v.shape for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# save / load


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  ) -> None:
    """Write ``tensors`` (Hugging Face names) into ``folder`` as ``model.safetensors``, or as shards plus an index
    above ``max_shard_bytes``; each file atomically, the index last, stale shards removed."""
    shards = _shard(tensors, max_shard_bytes)
    old_shards = set(folder.glob("model-*-of-*.safetensors"))
    if len(shards) == 1:
        _write_safetensors(folder / SAFETENSORS_FILE, shards[0])
        (folder / SAFETENSORS_INDEX).unlink(missing_ok=True)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(folder / name, shard)
            old_shards.discard(folder / name)
            weight_map |= dict.fromkeys(shard, name)
            total += sum(t.numel() * t.element_size() for t in shard.values())
        write_json_atomic(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        (folder / SAFETENSORS_FILE).unlink(missing_ok=True)
    for stale in old_shards:
        stale.unlink()


def save_pretrained(model: Transformer, folder: str | Path, tokenizer: Any = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    state: dict[str, torch.Tensor] | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    config_updates: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and optionally its tokenizer) as a Hugging Face model folder.

    Every file is written atomically; weights above ``max_shard_bytes`` are split into
    ``model-0000i-of-0000n.safetensors`` shards with an index, which is written last. ``state`` replaces the
    model's own tensors (a full state dict gathered from a sharded model); its meta tensors are placeholders
    that are not written. ``extra_tensors`` (Hugging Face names) and ``config_updates`` let a model built around
    a Transformer (e.g. with a scoring head, or quantized layers) add its own weights and config.json entries.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Meta tensors in ``state`` stand in for weights written another way (quantized ones, in extra_tensors):
    # they keep the layout conversion (e.g. GPT-2's fused q/k/v) working and are left out of the files.
    tensors = {k: v for k, v in state_to_hf(model, state).items() if not v.is_meta}
    tensors |= {k: v.detach().contiguous() for k, v in (extra_tensors or {}).items()}
    write_weights(folder, tensors, max_shard_bytes)
    config = model.config
    write_json_atomic(folder / "config.json",
                      config_to_hf(config) | {"dtype": _dtype_name(tensors)} | (config_updates or {}))
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    write_json_atomic(folder / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def _dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    return str(next(iter(tensors.values())).dtype).removeprefix("torch.")


def read_hf_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (single file or sharded), read with safetensors (no pickle)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_FILE).is_file():
        files = [folder / SAFETENSORS_FILE]
    elif (folder / SAFETENSORS_INDEX).is_file():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text())
        files = [folder / name for name in dict.fromkeys(index["weight_map"].values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard file(s) named in {SAFETENSORS_INDEX} are missing: {missing}")
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickle-based weights (*.bin/*.pt) found; omnilm reads safetensors "
                              "only (convert with transformers: save_pretrained(..., safe_serialization=True))")
    else:
        raise CheckpointError(f"{folder}: missing file {SAFETENSORS_FILE} (or {SAFETENSORS_INDEX})")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    return tensors


def read_config_json(folder: str | Path) -> tuple[dict[str, Any], str]:
    """A model folder's ``config.json`` as a mapping, and its path (for error messages)."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing file config.json")
    return json.loads(path.read_text(encoding="utf-8")), str(path)


def read_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model folder."""
    hf, source = read_config_json(folder)
    return config_from_hf(hf, source=source)


def check_tensors(folder: str | Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """Raise a CheckpointError naming every missing, unexpected and wrongly shaped tensor of ``state``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected}")
    if wrong:
        problems.append(f"shape mismatch {wrong}")
    if problems:
        raise CheckpointError(f"{folder}: " + "; ".join(problems))


def load_pretrained(folder: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Transformer:
    """Load a Hugging Face model folder (omnilm's or transformers') into a Transformer.

    Checks every tensor: missing, unexpected and wrongly shaped ones are named in the error.
    ``dtype`` None keeps the stored precision. A folder written by ``omnilm.infer.quantized_checkpoint`` (its
    config.json has ``quantization_config.quant_method == "omnilm"``) loads with its quantized layers; ``dtype``
    then applies to the unquantized tensors only.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    hf_config, source = read_config_json(folder)
    config = config_from_hf(hf_config, source=source)
    tensors = read_hf_tensors(folder)
    with torch.device("meta"):
        model = Transformer(config)
    quantized: dict[str, torch.Tensor] = {}
    if "quantization_config" in hf_config:
        from omnilm.infer.quantized_checkpoint import prepare_quantized

        # Swaps the quantized layers in and takes their tensors out of ``tensors`` (omnilm-named).
        quantized = prepare_quantized(model, hf_config["quantization_config"], tensors, source)
    state = state_from_hf(tensors, config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # A tied head is the embedding, unless it was quantized (then a quantized copy of it is stored).
    tied = config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear)
    if tied:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    check_tensors(folder, state | quantized, expected)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state | quantized, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.tok_emb.weight
    return model.to(device).eval()
