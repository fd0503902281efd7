"""BART checkpoints in the layout of transformers' ``BartForConditionalGeneration``, both ways.

The head is always tied to ``model.shared`` (copies named ``encoder.embed_tokens`` / ``decoder.embed_tokens`` /
``lm_head`` in some folders are dropped); ``final_logits_bias`` is stored as (1, vocab).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omnilm.model.bart import Bart, BartConfig
from omnilm.model.hf import CheckpointError, read_config_json, read_hf_tensors
from omnilm.model.hf_table import KeyTable, distinct_state, load_into, read_state, save_folder

ALIASES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


def _linear(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.{w}", f"{theirs}.{w}") for w in ("weight", "bias")]


def key_table() -> KeyTable:
    pairs = [("tok_emb.weight", "model.shared.weight"), ("final_logits_bias", "final_logits_bias")]
    for stack in ("encoder", "decoder"):
        ours, theirs = f"{stack}.blocks.{{i}}", f"model.{stack}.layers.{{i}}"
        pairs += [(f"{stack}.pos_emb.weight", f"model.{stack}.embed_positions.weight")]
        pairs += _linear(f"{stack}.emb_norm", f"model.{stack}.layernorm_embedding")
        for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out")):
            pairs += _linear(f"{ours}.attn.{a}_proj", f"{theirs}.self_attn.{b}_proj")
            pairs += _linear(f"{ours}.cross_attn.{a}_proj", f"{theirs}.encoder_attn.{b}_proj")
        pairs += _linear(f"{ours}.attn_norm", f"{theirs}.self_attn_layer_norm")
        pairs += _linear(f"{ours}.cross_norm", f"{theirs}.encoder_attn_layer_norm")
        pairs += _linear(f"{ours}.up_proj", f"{theirs}.fc1") + _linear(f"{ours}.down_proj", f"{theirs}.fc2")
        pairs += _linear(f"{ours}.mlp_norm", f"{theirs}.final_layer_norm")
    return KeyTable(pairs)


def config_to_hf(config: BartConfig) -> dict[str, Any]:
    return {"architectures": ["BartForConditionalGeneration"], "model_type": "bart", "vocab_size": config.vocab_size,
            "d_model": config.d_model, "encoder_layers": config.n_layer, "decoder_layers": config.decoder_layers,
            "encoder_attention_heads": config.n_head, "decoder_attention_heads": config.n_head,
            "encoder_ffn_dim": config.ff_dim, "decoder_ffn_dim": config.ff_dim,
            "max_position_embeddings": config.max_seq_len, "activation_function": "gelu",
            "scale_embedding": config.scale_embedding, "dropout": config.dropout,
            "attention_dropout": config.dropout, "activation_dropout": config.dropout, "init_std": config.init_std,
            "is_encoder_decoder": True, "tie_word_embeddings": True, "bos_token_id": config.bos_token_id,
            "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
            "decoder_start_token_id": config.decoder_start_token_id, "forced_eos_token_id": config.eos_token_id}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> BartConfig:
    """A BartConfig from a BART config.json; unsupported features are errors."""
    if hf.get("model_type") != "bart":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not bart")
    if hf.get("activation_function", "gelu") != "gelu":
        raise CheckpointError(f"{source}: unsupported activation {hf.get('activation_function')!r} (expected gelu)")
    for flag in ("normalize_before", "add_final_layer_norm", "add_bias_logits"):  # mBART-style variants
        if hf.get(flag):
            raise CheckpointError(f"{source}: BART variant with {flag}=true is not supported")
    if (hf["encoder_attention_heads"], hf["encoder_ffn_dim"]) != (hf["decoder_attention_heads"],
                                                                    hf["decoder_ffn_dim"]):
        raise CheckpointError(f"{source}: encoder and decoder with different heads/ffn sizes are not supported")
    return BartConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layer=hf["encoder_layers"],
        n_decoder_layer=hf["decoder_layers"], n_head=hf["encoder_attention_heads"], d_ff=hf["encoder_ffn_dim"],
        max_seq_len=hf.get("max_position_embeddings", 1024), scale_embedding=hf.get("scale_embedding", False),
        dropout=hf.get("dropout", 0.1), init_std=hf.get("init_std", 0.02), bos_token_id=hf.get("bos_token_id", 0),
        pad_token_id=hf.get("pad_token_id", 1), eos_token_id=hf.get("eos_token_id", 2),
        decoder_start_token_id=hf.get("decoder_start_token_id", 2))


def save_bart(model: Bart, folder: str | Path, tokenizer: Any = None,
              state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or its weights ``state``) as a BartForConditionalGeneration folder (and its tokenizer)."""
    c = model.config
    tensors = key_table().to_hf(distinct_state(model, state))
    tensors["final_logits_bias"] = tensors["final_logits_bias"][None]  # (vocab,) -> (1, vocab)
    generation = {"bos_token_id": c.bos_token_id, "decoder_start_token_id": c.decoder_start_token_id,
                  "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    return save_folder(folder, tensors, config_to_hf(c), generation, tokenizer)


def _read_tensors(folder: Path | str, config: BartConfig) -> dict[str, torch.Tensor]:
    tensors = read_hf_tensors(folder)
    if "final_logits_bias" in tensors:
        tensors["final_logits_bias"] = tensors["final_logits_bias"].reshape(-1)
    else:  # transformers lists it as optional
        tensors["final_logits_bias"] = torch.zeros(config.vocab_size)
    return tensors


def read_bart_state(folder: str | Path, model: Bart) -> dict[str, torch.Tensor]:
    """A folder's weights under ``model``'s names."""
    return read_state(folder, model, key_table(), ALIASES, _read_tensors(folder, model.config))


def load_bart(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Bart:
    """Load a BartForConditionalGeneration folder (omnilm's or transformers')."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    hf, source = read_config_json(folder)
    config = config_from_hf(hf, source)
    tensors = _read_tensors(folder, config)
    return load_into(folder, lambda: Bart(config), key_table(), ALIASES, dtype, device, tensors)
