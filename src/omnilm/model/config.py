"""The model configuration and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from omnilm.config import ConfigError, from_preset_or_dict

Family = Literal["gpt2", "llama", "qwen2"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and flavour of omnilm's decoder-only transformer.

    ``family`` picks the architecture and the Hugging Face class a checkpoint maps to:
    ``gpt2`` = learned positions, LayerNorm, GELU MLP, biases, tied embeddings;
    ``llama`` / ``qwen2`` = RoPE, RMSNorm, SwiGLU, grouped-query attention (qwen2 adds QKV biases).
    The family fixes those choices; the remaining fields are free.
    """

    family: Family = "llama"
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    #: Key/value heads for grouped-query attention; must divide ``n_head`` (None = ``n_head``, plain MHA).
    n_kv_head: int | None = None
    d_model: int = 128
    #: Hidden width of the MLP (None = 4·d_model for gpt2, else the SwiGLU size ≈ 8/3·d_model rounded up to 64).
    d_ff: int | None = None
    #: Per-head width (None = d_model // n_head).
    head_dim: int | None = None
    #: Longest sequence: size of the learned position table (gpt2) and the default KV-cache length.
    max_seq_len: int = 1024
    #: RoPE base frequency (llama/qwen2 only).
    rope_theta: float = 10000.0
    #: Multimodal RoPE (Qwen2-VL / Qwen2.5-Omni): the rotary frequencies split into temporal, height and width
    #: sections of these sizes (summing to head_dim / 2), each rotated by its own component of 3-D position ids
    #: (3, B, T). None = plain RoPE; with it, 2-D position ids act as three equal components (plain RoPE too).
    mrope_section: tuple[int, ...] | None = None
    #: RoPE scaling for contexts beyond training, spelled like transformers' ``rope_scaling`` /
    #: ``rope_parameters`` (without rope_theta): ``{"rope_type": "linear", "factor": s}`` (position
    #: interpolation), ``dynamic`` (NTK base growing with the length beyond max_seq_len; factor), ``yarn``
    #: (factor, original_max_position_embeddings; optional beta_fast, beta_slow, attention_factor, mscale,
    #: mscale_all_dim, truncate) or ``llama3`` (factor, low_freq_factor, high_freq_factor,
    #: original_max_position_embeddings). None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    #: Sliding-window attention (Mistral / Qwen2 ``sliding_window``): a query sees itself and the
    #: sliding_window − 1 tokens before it. None = full causal attention.
    sliding_window: int | None = None
    #: Layers below this index attend fully and the others through the window (Qwen2's max_window_layers;
    #: 0 = every layer slides, as Mistral).
    window_from_layer: int = 0
    #: ALiBi instead of position embeddings (BLOOM / MPT): head h adds −m_h·(i − j) to its attention scores,
    #: m_h = 2^(−8h/H) for H a power of two (interleaved otherwise). Replaces RoPE / learned positions.
    alibi: bool = False
    #: A norm right after the token embedding (BLOOM's word_embeddings_layernorm).
    embedding_norm: bool = False
    #: Epsilon of LayerNorm / RMSNorm.
    norm_eps: float = 1e-5
    #: Biases on the q/k/v projections (forced on for gpt2 and qwen2).
    qkv_bias: bool = False
    #: Share the token embedding with the output head.
    tie_embeddings: bool = True
    #: Dropout on attention probabilities and residual branches during training.
    dropout: float = 0.0
    #: Standard deviation of the normal initialisation of weight matrices.
    init_std: float = 0.02
    #: Mixture of experts (llama/qwen2 only; see omnilm.model.moe): routed experts per MoE layer (0 = dense MLP).
    n_experts: int = 0
    #: Experts each token is routed to (top-k).
    n_experts_per_tok: int = 2
    #: Hidden width of each routed expert (None = d_ff).
    moe_d_ff: int | None = None
    #: Shared experts run on every token, fused into one SwiGLU of width shared_d_ff.
    n_shared_experts: int = 0
    #: Hidden width of the fused shared experts (None = n_shared_experts · the routed expert width).
    shared_d_ff: int | None = None
    #: Scale the shared experts' output by sigmoid(w·x) (Qwen2-MoE's shared_expert_gate).
    shared_expert_gate: bool = False
    #: Router scores: softmax over experts (Mixtral, Qwen2-MoE) or an independent sigmoid per expert.
    router_gate: Literal["softmax", "sigmoid"] = "softmax"
    #: Renormalise the k selected scores to sum to 1 (Mixtral: yes; Qwen2-MoE: configurable).
    norm_topk_prob: bool = True
    #: Every moe_every-th layer is an MoE layer (Qwen2-MoE's decoder_sparse_step), the others dense.
    moe_every: int = 1
    #: Layers kept dense whatever moe_every says (Qwen2-MoE's mlp_only_layers).
    dense_layers: tuple[int, ...] = ()
    #: Weight of the Switch load-balancing loss added to the training loss.
    router_aux_loss_coef: float = 0.01
    #: Weight of the router z-loss added to the training loss.
    router_z_loss_coef: float = 0.001
    #: Special token ids written into config.json / generation_config.json (None = not set).
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "llama", "qwen2"):
            raise ConfigError(f"unknown model family {self.family!r}; expected gpt2, llama or qwen2")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.family == "gpt2" and (self.n_kv_head not in (None, self.n_head)):
            raise ConfigError("gpt2 family has no grouped-query attention (n_kv_head must equal n_head)")
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if self.n_experts:
            if self.family == "gpt2":
                raise ConfigError("mixture of experts needs a SwiGLU family (llama or qwen2), not gpt2")
            if not 1 <= self.n_experts_per_tok <= self.n_experts:
                raise ConfigError(f"n_experts_per_tok={self.n_experts_per_tok} must be in 1..n_experts="
                                  f"{self.n_experts}")
            if self.router_gate not in ("softmax", "sigmoid"):
                raise ConfigError(f"router_gate={self.router_gate!r}; expected softmax or sigmoid")
            if self.moe_every < 1:
                raise ConfigError("moe_every must be ≥ 1")
        self._check_long_context()
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
            if not self.uses_rope or len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.dim_per_head:
                raise ConfigError(f"mrope_section={list(self.mrope_section)} must be 3 sizes summing to head_dim/2 = "
                                  f"{self.dim_per_head // 2} on a rotary (llama/qwen2) model")

    def _check_long_context(self) -> None:
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            rope_type = scaling.pop("rope_type", scaling.pop("type", None))
            scaling.pop("rope_theta", None)
            if rope_type not in ROPE_SCALING_KEYS:
                raise ConfigError(f"rope_scaling.rope_type={rope_type!r}; expected one of {sorted(ROPE_SCALING_KEYS)}")
            required, optional = ROPE_SCALING_KEYS[rope_type]
            missing, unknown = sorted(required - set(scaling)), sorted(set(scaling) - required - optional)
            if missing or unknown:
                raise ConfigError(f"rope_scaling ({rope_type}): missing {missing}, unknown {unknown}; "
                                  f"expected {sorted(required)} and optionally {sorted(optional)}")
            if not float(scaling["factor"]) >= 1.0:
                raise ConfigError(f"rope_scaling.factor must be ≥ 1, got {scaling['factor']}")
            if not self.uses_rope:
                raise ConfigError("rope_scaling needs a rotary (llama/qwen2) model without alibi")
            object.__setattr__(self, "rope_scaling", {"rope_type": rope_type} | scaling)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be ≥ 1, got {self.sliding_window}")
        if self.alibi and self.mrope_section is not None:
            raise ConfigError("alibi replaces RoPE: it cannot be combined with mrope_section")

    # Derived sizes, resolved once here so the model never re-implements the defaults.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        return 64 * ((8 * self.d_model // 3 + 63) // 64)

    @property
    def expert_dim(self) -> int:
        """Hidden width of one routed expert."""
        return self.moe_d_ff or self.ff_dim

    @property
    def shared_dim(self) -> int:
        """Hidden width of the fused shared experts."""
        return self.shared_d_ff or self.n_shared_experts * self.expert_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has a mixture-of-experts feed-forward."""
        return bool(self.n_experts) and layer not in self.dense_layers and (layer + 1) % self.moe_every == 0

    @property
    def uses_rope(self) -> bool:
        return self.family != "gpt2" and not self.alibi

    @property
    def linear_bias(self) -> bool:
        """Biases on every linear layer (GPT-2 style)."""
        return self.family == "gpt2"

    @property
    def attn_qkv_bias(self) -> bool:
        return self.family in ("gpt2", "qwen2") or self.qkv_bias


#: Per RoPE-scaling type: the keys it needs and the keys it may have (transformers' validation rules).
ROPE_SCALING_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
}


PRESETS: dict[str, ModelConfig] = {
    # ≈1M parameters: fast enough for unit tests and smoke runs.
    "tiny": ModelConfig(family="llama", vocab_size=2048, n_layer=4, n_head=4, n_kv_head=2, d_model=128,
                        max_seq_len=512),
    # GPT-2 small (124M), the shapes of the original release.
    "gpt2-124m": ModelConfig(family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768,
                             max_seq_len=1024, bos_token_id=50256, eos_token_id=50256),
    # A small Llama (≈10M with an 8k vocabulary), untied, GQA: a good size for CPU experiments.
    "llama-tiny": ModelConfig(family="llama", vocab_size=8192, n_layer=6, n_head=8, n_kv_head=4, d_model=256,
                              max_seq_len=2048, tie_embeddings=False),
    # Qwen2.5-0.5B's real shapes (random weights unless loaded from a checkpoint).
    "qwen2.5-0.5b": ModelConfig(family="qwen2", vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2,
                                d_model=896, d_ff=4864, max_seq_len=32768, rope_theta=1_000_000.0,
                                norm_eps=1e-6, tie_embeddings=True, bos_token_id=151643,
                                eos_token_id=151643),
}


def get_preset(name: str, **overrides: object) -> ModelConfig:
    """A named preset, optionally with some fields replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


def load_model_config(source: str | Path | dict) -> ModelConfig:
    """A ModelConfig from a YAML/JSON file or a mapping; a ``preset`` key starts from that preset."""
    return from_preset_or_dict(ModelConfig, PRESETS, source, "model")
