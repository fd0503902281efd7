"""GGUF export: a GPT-2/Llama/Qwen2 model folder as one file that llama.cpp (and tools built on it) runs as it is.

The file is written with ``gguf``, llama.cpp's own Python writer, so the container format, key names and
quantised block layouts (q8_0, q4_0) are llama.cpp's. What is decided here is the mapping: tensor names,
the rotary layout, the hyperparameter keys and the tokenizer (byte-level BPE tokens, merges, special
tokens, pre-tokenizer name and chat template).

Rotary layout: omnilm (like Hugging Face) rotates the two halves of each head; llama.cpp's ``llama``
architecture rotates interleaved pairs, so q/k rows of llama-family models are permuted on export (the
same reordering llama.cpp's converter applies). Its ``qwen2`` architecture uses the halves layout, so
qwen2 tensors go through unchanged. GPT-2 models map to llama.cpp's ``gpt2`` architecture (fused q|k|v).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from omnilm.errors import UserError
from omnilm.model.config import ModelConfig
from omnilm.model.transformer import Transformer
from omnilm.tokenizer import Tokenizer
from omnilm.tokenizer.train import PRETOKENIZE_PATTERN
from omnilm.utils.atomic import atomic_path

GGUFType = Literal["f32", "f16", "q8_0", "q4_0"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_0")

# llama.cpp's token types (llama_token_type): ordinary, control (special) and unused (padding) entries.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


def _gguf():  # noqa: ANN202 - the optional module itself
    try:
        import gguf
    except ImportError as err:
        raise UserError("GGUF export needs the `gguf` package: pip install gguf (or omnilm[dev])") from err
    return gguf


# ---------------------------------------------------------------------------------------------
# tensors


def interleave_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from the halves layout (x0..x{d/2-1} | x{d/2}..) to pairs (x0, x{d/2}, ...).

    Rotating halves by (cos, sin) then equals llama.cpp's rotation of adjacent pairs on the reordered rows."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _linear(linear: torch.nn.Module) -> torch.nn.Linear:
    if not isinstance(linear, torch.nn.Linear):
        raise UserError("GGUF export reads full-precision weights: export the unquantized model folder and choose "
                        "the precision with --type (q8_0, q4_0)")
    return linear


def _gpt2_block(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """llama.cpp's gpt2 layout: one fused q|k|v projection, LayerNorms with biases, biases everywhere."""
    attn, mlp = block.attn, block.mlp
    q, k, v = _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)
    out = {"attn_qkv.weight": torch.cat((q.weight, k.weight, v.weight)),
           "attn_qkv.bias": torch.cat((q.bias, k.bias, v.bias))}
    for name, module in (("attn_output", attn.o_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj),
                         ("attn_norm", block.norm1), ("ffn_norm", block.norm2)):
        module = module if name.endswith("norm") else _linear(module)
        out |= {f"{name}.weight": module.weight, f"{name}.bias": module.bias}
    return out


def _rotary_block(block: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """llama.cpp's llama/qwen2 layout; llama's q/k rows reordered for its rotation of adjacent pairs."""
    attn, mlp = block.attn, block.mlp
    projections = {"attn_q": (attn.q_proj, config.n_head), "attn_k": (attn.k_proj, config.kv_heads),
                   "attn_v": (attn.v_proj, None), "attn_output": (attn.o_proj, None),
                   "ffn_gate": (mlp.gate_proj, None), "ffn_up": (mlp.up_proj, None), "ffn_down": (mlp.down_proj, None)}
    out = {"attn_norm.weight": block.norm1.weight, "ffn_norm.weight": block.norm2.weight}
    for name, (module, heads) in projections.items():
        linear = _linear(module)
        reorder = config.family == "llama" and heads is not None
        out[name + ".weight"] = interleave_rotary_rows(linear.weight, heads) if reorder else linear.weight
        if linear.bias is not None:
            out[name + ".bias"] = interleave_rotary_rows(linear.bias, heads) if reorder else linear.bias
    return out


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """omnilm's parameters under llama.cpp's tensor names, in llama.cpp's layout (fp32, (out, in) rows)."""
    config = model.config
    if config.mrope_section is not None:
        raise UserError("GGUF export of multimodal-RoPE (mrope_section) models is not supported")
    out: dict[str, torch.Tensor] = {"token_embd.weight": model.tok_emb.weight,
                                    "output_norm.weight": model.norm_f.weight}
    if config.family == "gpt2":
        out |= {"position_embd.weight": model.pos_emb.weight, "output_norm.bias": model.norm_f.bias}
    if not config.tie_embeddings:  # llama.cpp reuses token_embd as the output head when output.weight is absent
        out["output.weight"] = _linear(model.lm_head).weight
    for i, block in enumerate(model.blocks):
        tensors = _gpt2_block(block) if config.family == "gpt2" else _rotary_block(block, config)
        out |= {f"blk.{i}.{name}": tensor for name, tensor in tensors.items()}
    return {name: t.detach().float().contiguous() for name, t in out.items()}


def _encode_tensor(name: str, tensor: torch.Tensor, kind: GGUFType) -> tuple[np.ndarray, Any]:
    """The stored array and its GGML type: 1-D tensors (norms, biases) stay f32 as in llama.cpp's files.

    q4_0 keeps the embedding and output head in q8_0 (llama.cpp's own q4_0 recipe keeps them at higher precision
    too); a matrix whose rows are no multiple of the 32-value block stays f16."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    data = tensor.numpy()
    if data.ndim == 1 or kind == "f32":
        return data.astype(np.float32), q.F32
    qtype = {"f16": q.F16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[kind]
    if qtype == q.Q4_0 and name in ("token_embd.weight", "output.weight"):
        qtype = q.Q8_0
    if qtype == q.F16 or data.shape[-1] % 32:
        return data.astype(np.float16), q.F16
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


# ---------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str


def pre_tokenizer_name(backend_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenisation (it re-implements each known regex by name)."""
    pre = backend_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    for part in parts:
        if part.get("type") == "Split" and part.get("pattern", {}).get("Regex") == PRETOKENIZE_PATTERN:
            return "qwen2"
        if part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return "gpt-2"
    raise UserError("GGUF export: the tokenizer's pre-tokenizer is neither omnilm's (Qwen2 pattern) nor GPT-2's "
                    "byte-level one; llama.cpp would split text differently")


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """Tokens in id order (padded with unused entries to the model's vocabulary), their types and the merges."""
    backend_json = json.loads(tokenizer.backend.to_str())
    model = backend_json.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export needs a byte-level BPE tokenizer, not {model.get('type')!r}")
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size:
        raise UserError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    special = {t["content"] for t in backend_json.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(token)
            types.append(TOKEN_CONTROL if token in special else TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab(tokens, types, merges, pre_tokenizer_name(backend_json))


# ---------------------------------------------------------------------------------------------
# the file


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama.cpp's llama_ftype numbers


def _add_hyperparameters(writer: Any, config: ModelConfig) -> None:
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ff_dim)
    writer.add_head_count(config.n_head)
    writer.add_vocab_size(config.vocab_size)
    if config.family == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.kv_heads)
    writer.add_key_length(config.dim_per_head)
    writer.add_value_length(config.dim_per_head)
    writer.add_rope_dimension_count(config.dim_per_head)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, config: ModelConfig) -> None:
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for setter, token_id in ((writer.add_eos_token_id, tokenizer.eos_id), (writer.add_bos_token_id, tokenizer.bos_id),
                             (writer.add_pad_token_id, tokenizer.pad_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(False)  # omnilm prompts carry no BOS
    template = tokenizer.extra_config.get("chat_template")
    if isinstance(template, str):
        writer.add_chat_template(template)


def export_gguf(model: Transformer, tokenizer: Tokenizer, out: str | Path, kind: GGUFType = "f32",
                name: str = "omnilm") -> Path:
    """Write ``model`` and ``tokenizer`` as a GGUF file (atomically: a temporary file renamed into place)."""
    if kind not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {kind!r}; expected one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    config = model.config
    tensors = gguf_tensors(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), config.family)
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[kind])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, config)
        _add_tokenizer(writer, tokenizer, config)
        for tensor_name, tensor in tensors.items():
            data, qtype = _encode_tensor(tensor_name, tensor, kind)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
