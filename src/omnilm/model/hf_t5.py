"""T5 checkpoints in the layout of transformers' ``T5ForConditionalGeneration``, both ways.

Tying: a folder whose weights hold no ``lm_head.weight`` (or one equal to ``shared.weight``) has a tied head,
whatever config.json says, as transformers decides when loading. ``scale_decoder_outputs`` (written by
transformers 5; older configs imply it by ``tie_word_embeddings``) is kept separately.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from omnilm.model.hf import CheckpointError, read_config_json, read_hf_tensors
from omnilm.model.hf_table import KeyTable, distinct_state, load_into, read_state, save_folder
from omnilm.model.t5 import T5, T5Config

ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _attn(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.{a}_proj.weight", f"{theirs}.{b}.weight") for a, b in
            (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o"))]


def key_table(config: T5Config) -> KeyTable:
    pairs = [("tok_emb.weight", "shared.weight"), ("lm_head.weight", "lm_head.weight")]
    mlp = ([("gate_proj", "wi_0"), ("up_proj", "wi_1")] if config.ff_kind == "gated-gelu" else [("up_proj", "wi")])
    mlp.append(("down_proj", "wo"))
    for stack in ("encoder", "decoder"):
        block, ff = f"{stack}.block.{{i}}", 2 if stack == "decoder" else 1
        pairs += [(f"{stack}.rel_bias.weight", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                  (f"{stack}.norm_f.weight", f"{stack}.final_layer_norm.weight"),
                  (f"{stack}.blocks.{{i}}.norm1.weight", f"{block}.layer.0.layer_norm.weight"),
                  (f"{stack}.blocks.{{i}}.norm2.weight", f"{block}.layer.{ff}.layer_norm.weight")]
        pairs += _attn(f"{stack}.blocks.{{i}}.attn", f"{block}.layer.0.SelfAttention")
        pairs += [(f"{stack}.blocks.{{i}}.mlp.{a}.weight", f"{block}.layer.{ff}.DenseReluDense.{b}.weight")
                  for a, b in mlp]
    pairs += [("decoder.blocks.{i}.cross_norm.weight", "decoder.block.{i}.layer.1.layer_norm.weight")]
    pairs += _attn("decoder.blocks.{i}.cross_attn", "decoder.block.{i}.layer.1.EncDecAttention")
    return KeyTable(pairs)


def config_to_hf(config: T5Config) -> dict[str, Any]:
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": config.vocab_size,
            "d_model": config.d_model, "d_kv": config.head_dim, "d_ff": config.d_ff, "num_layers": config.n_layer,
            "num_decoder_layers": config.decoder_layers, "num_heads": config.n_head,
            "relative_attention_num_buckets": config.num_buckets,
            "relative_attention_max_distance": config.max_distance, "dropout_rate": config.dropout,
            "layer_norm_epsilon": config.norm_eps, "initializer_factor": config.init_factor,
            "feed_forward_proj": config.ff_kind, "tie_word_embeddings": config.tie_embeddings,
            "scale_decoder_outputs": config.scale_decoder_outputs, "is_encoder_decoder": True,
            "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
            "decoder_start_token_id": config.decoder_start_token_id, "n_positions": config.max_seq_len}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> T5Config:
    """A T5Config from a T5 config.json; unsupported features are errors."""
    if hf.get("model_type") != "t5":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not t5")
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in ("relu", "gated-gelu"):
        raise CheckpointError(f"{source}: unsupported feed_forward_proj {ff!r} (omnilm reads relu and gated-gelu)")
    tie = hf.get("tie_word_embeddings", True)
    eos = hf.get("eos_token_id", 1)
    return T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], head_dim=hf["d_kv"], d_ff=hf["d_ff"],
        n_layer=hf["num_layers"], n_decoder_layer=hf.get("num_decoder_layers"), n_head=hf["num_heads"],
        num_buckets=hf.get("relative_attention_num_buckets", 32),
        max_distance=hf.get("relative_attention_max_distance", 128), norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        ff_kind=ff, tie_embeddings=tie, scale_decoder_outputs=hf.get("scale_decoder_outputs", tie is not False),
        dropout=hf.get("dropout_rate", 0.1), init_factor=hf.get("initializer_factor", 1.0),
        max_seq_len=hf.get("n_positions", 512), pad_token_id=hf.get("pad_token_id") or 0,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        decoder_start_token_id=hf.get("decoder_start_token_id") or 0)


def save_t5(model: T5, folder: str | Path, tokenizer: Any = None,
            state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or its weights ``state``) as a T5ForConditionalGeneration folder (and its tokenizer)."""
    c = model.config
    tensors = key_table(c).to_hf(distinct_state(model, state))
    generation = {"decoder_start_token_id": c.decoder_start_token_id, "eos_token_id": c.eos_token_id,
                  "pad_token_id": c.pad_token_id}
    return save_folder(folder, tensors, config_to_hf(c), generation, tokenizer)


def load_t5(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> T5:
    """Load a T5ForConditionalGeneration folder (omnilm's or transformers')."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    hf, source = read_config_json(folder)
    config = config_from_hf(hf, source)
    tensors = read_hf_tensors(folder)
    head = tensors.get("lm_head.weight")
    tied = head is None or ("shared.weight" in tensors and torch.equal(head, tensors["shared.weight"]))
    config = replace(config, tie_embeddings=tied)
    if tied:
        tensors.pop("lm_head.weight", None)
    return load_into(folder, lambda: T5(config), key_table(config), ALIASES, dtype, device, tensors)


def read_t5_state(folder: str | Path, model: T5) -> dict[str, torch.Tensor]:
    """A folder's weights under ``model``'s names."""
    return read_state(folder, model, key_table(model.config), ALIASES)
