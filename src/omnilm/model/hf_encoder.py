"""Checkpoints of the encoder family in the Hugging Face layout: BertForMaskedLM, BertForSequenceClassification,
BertForPreTraining (with next-sentence prediction), ElectraForMaskedLM, ElectraForPreTraining and
ElectraForSequenceClassification (folders load with transformers' ``from_pretrained`` and back).

The head is named by config.json's ``architectures``; the trunk's names differ between the families by their
prefix only (``bert.`` / ``electra.``), so one trunk table serves both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.model.encoder import (
    EncoderConfig,
    EncoderForMaskedLM,
    EncoderForPreTraining,
    EncoderForSequenceClassification,
    EncoderForTokenDetection,
)
from omnilm.model.hf import CheckpointError, read_config_json
from omnilm.model.hf_table import KeyTable, distinct_state, load_into, read_state, save_folder

EncoderModel = (EncoderForMaskedLM | EncoderForPreTraining | EncoderForSequenceClassification
                | EncoderForTokenDetection)

#: Head kind -> (model class, architecture name per family).
HEADS: dict[str, tuple[type[nn.Module], dict[str, str]]] = {
    "mlm": (EncoderForMaskedLM, {"bert": "BertForMaskedLM", "electra": "ElectraForMaskedLM"}),
    "classify": (EncoderForSequenceClassification, {"bert": "BertForSequenceClassification",
                                                    "electra": "ElectraForSequenceClassification"}),
    "rtd": (EncoderForTokenDetection, {"electra": "ElectraForPreTraining"}),
    "pretraining": (EncoderForPreTraining, {"bert": "BertForPreTraining"}),
}
ARCHITECTURES = {arch: (head, family) for head, (_, archs) in HEADS.items() for family, arch in archs.items()}


def _trunk(p: str) -> list[tuple[str, str]]:
    layer = f"{p}.encoder.layer.{{i}}"
    pairs = [("encoder.tok_emb.weight", f"{p}.embeddings.word_embeddings.weight"),
             ("encoder.pos_emb.weight", f"{p}.embeddings.position_embeddings.weight"),
             ("encoder.type_emb.weight", f"{p}.embeddings.token_type_embeddings.weight")]
    modules = [("encoder.emb_norm", f"{p}.embeddings.LayerNorm"), ("encoder.emb_proj", f"{p}.embeddings_project"),
               ("encoder.blocks.{i}.attn.q_proj", f"{layer}.attention.self.query"),
               ("encoder.blocks.{i}.attn.k_proj", f"{layer}.attention.self.key"),
               ("encoder.blocks.{i}.attn.v_proj", f"{layer}.attention.self.value"),
               ("encoder.blocks.{i}.attn.o_proj", f"{layer}.attention.output.dense"),
               ("encoder.blocks.{i}.attn_norm", f"{layer}.attention.output.LayerNorm"),
               ("encoder.blocks.{i}.up_proj", f"{layer}.intermediate.dense"),
               ("encoder.blocks.{i}.down_proj", f"{layer}.output.dense"),
               ("encoder.blocks.{i}.mlp_norm", f"{layer}.output.LayerNorm")]
    return pairs + _linear(modules)


def _linear(modules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{a}.{w}", f"{b}.{w}") for a, b in modules for w in ("weight", "bias")]


HEAD_KEYS: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("mlm", "bert"): _linear([("head.dense", "cls.predictions.transform.dense"),
                              ("head.norm", "cls.predictions.transform.LayerNorm")])
    + [("head.bias", "cls.predictions.bias")],
    ("mlm", "electra"): _linear([("head.dense", "generator_predictions.dense"),
                                 ("head.norm", "generator_predictions.LayerNorm")])
    + [("head.bias", "generator_lm_head.bias")],
    ("classify", "bert"): _linear([("pooler", "bert.pooler.dense"), ("classifier", "classifier")]),
    ("classify", "electra"): _linear([("dense", "classifier.dense"), ("out", "classifier.out_proj")]),
    ("pretraining", "bert"): _linear([("head.dense", "cls.predictions.transform.dense"),
                                      ("head.norm", "cls.predictions.transform.LayerNorm"),
                                      ("pooler", "bert.pooler.dense"), ("nsp", "cls.seq_relationship")])
    + [("head.bias", "cls.predictions.bias")],
    ("rtd", "electra"): _linear([("dense", "discriminator_predictions.dense"),
                                 ("out", "discriminator_predictions.dense_prediction")]),
}

#: Tensors some checkpoints carry that repeat another one or belong to a head this class does not have.
ALIASES = {
    ("mlm", "bert"): ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "bert.pooler.dense.weight",
                      "bert.pooler.dense.bias", "cls.seq_relationship.weight", "cls.seq_relationship.bias"],
    ("mlm", "electra"): ["generator_lm_head.weight"],
    ("classify", "bert"): [],
    ("classify", "electra"): [],
    ("rtd", "electra"): [],
    ("pretraining", "bert"): ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"],
}


def key_table(head: str, family: str) -> KeyTable:
    return KeyTable(_trunk(family) + HEAD_KEYS[(head, family)])


def head_of(model: nn.Module) -> str:
    return next(head for head, (cls, _) in HEADS.items() if isinstance(model, cls))


def config_to_hf(config: EncoderConfig, head: str) -> dict[str, Any]:
    """config.json for ``config`` with the given head."""
    archs = HEADS[head][1]
    if config.family not in archs:
        raise CheckpointError(f"no Hugging Face class for a {config.family} encoder with a {head!r} head")
    hf = {"architectures": [archs[config.family]], "model_type": config.family, "vocab_size": config.vocab_size,
          "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
          "num_attention_heads": config.n_head, "intermediate_size": config.ff_dim, "hidden_act": "gelu",
          "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
          "max_position_embeddings": config.max_seq_len, "type_vocab_size": config.type_vocab_size,
          "initializer_range": config.init_std, "layer_norm_eps": config.norm_eps,
          "pad_token_id": config.pad_token_id, "position_embedding_type": "absolute", "tie_word_embeddings": True,
          "id2label": {str(i): f"LABEL_{i}" for i in range(config.num_labels)},
          "label2id": {f"LABEL_{i}": i for i in range(config.num_labels)}}
    if config.family == "electra":
        hf["embedding_size"] = config.emb_dim
    return hf


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> tuple[EncoderConfig, str]:
    """The EncoderConfig and head kind of a BERT/ELECTRA config.json; unsupported features are errors."""
    family = hf.get("model_type")
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source}: unsupported encoder architecture {arch!r}; omnilm reads "
                              f"{', '.join(sorted(ARCHITECTURES))}")
    head, arch_family = ARCHITECTURES[arch]
    if family != arch_family:
        raise CheckpointError(f"{source}: model_type {family!r} does not match {arch}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: unsupported activation {hf.get('hidden_act')!r} (expected exact gelu)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{source}: only absolute position embeddings are supported")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise CheckpointError(f"{source}: decoder/cross-attention BERT variants are not supported")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    config = EncoderConfig(
        family=family, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
        embedding_size=hf.get("embedding_size") if family == "electra" else None,
        max_seq_len=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02), num_labels=num_labels, pad_token_id=hf.get("pad_token_id") or 0)
    return config, head


def save_encoder(model: EncoderModel, folder: str | Path, tokenizer: Any = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or its weights ``state``) as a Hugging Face folder of its head's class (and its tokenizer
    when given)."""
    head, config = head_of(model), model.config
    tensors = key_table(head, config.family).to_hf(distinct_state(model, state))
    return save_folder(folder, tensors, config_to_hf(config, head), {"pad_token_id": config.pad_token_id},
                       tokenizer)


def load_encoder(folder: str | Path, head: str | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", **overrides: Any) -> EncoderModel:
    """Load a BERT/ELECTRA folder. ``head`` (mlm / classify / rtd) other than the stored one keeps the stored
    encoder and starts that head fresh (fine-tuning a pre-trained encoder); ``overrides`` replace config fields
    of the new head (e.g. ``num_labels``)."""
    from dataclasses import replace

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    hf, source = read_config_json(folder)
    config, stored = config_from_hf(hf, source)
    cls = HEADS[stored][0]
    model = load_into(folder, lambda: cls(config), key_table(stored, config.family), ALIASES[(stored, config.family)],
                      dtype, device)
    if (head is None or head == stored) and not overrides:
        return model
    new_config = replace(config, **overrides)
    fresh = HEADS[head or stored][0](new_config).to(device)
    fresh.encoder.load_state_dict(model.encoder.state_dict())
    return fresh.to(dtype or next(model.parameters()).dtype)


def read_encoder_state(folder: str | Path, model: EncoderModel) -> dict[str, torch.Tensor]:
    """A folder's weights under ``model``'s names (the model's head must be the folder's)."""
    key = (head_of(model), model.config.family)
    return read_state(folder, model, key_table(*key), ALIASES[key])
