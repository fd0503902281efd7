"""The BART encoder–decoder (a denoising autoencoder: corrupted text in, original text out).

Both stacks embed tokens (optionally scaled by sqrt(d_model)) plus learned positions, whose table starts two
rows in (BART's offset: position p reads row p + 2), then LayerNorm. Blocks are post-norm with exact-GELU
MLPs and biased projections, like BERT's; the decoder block adds post-norm cross-attention. The head is tied
to the embedding and adds ``final_logits_bias``. Same generation interface as ``t5.T5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ConfigError, from_preset_or_dict
from omnilm.model.mha import EncDecCache, EncoderDecoderLM, MultiHeadAttention, causal_bias, padding_bias

POSITION_OFFSET = 2


@dataclass(frozen=True)
class BartConfig:
    """Shape of a BART model (config.json spellings in ``hf_bart``)."""

    vocab_size: int = 2048
    d_model: int = 128
    n_layer: int = 2
    #: Decoder layers (None = n_layer).
    n_decoder_layer: int | None = None
    n_head: int = 4
    #: Hidden width of the MLPs (None = 4·d_model).
    d_ff: int | None = None
    #: Longest sequence (rows of each position table, BART's two offset rows not counted).
    max_seq_len: int = 512
    #: Multiply token embeddings by sqrt(d_model).
    scale_embedding: bool = False
    #: LayerNorm epsilon.
    norm_eps: float = 1e-5
    #: Dropout on residual branches (attention and activation dropout as well).
    dropout: float = 0.1
    init_std: float = 0.02
    #: BART's special ids: <s>=0, <pad>=1, </s>=2; the decoder starts from </s>.
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer


class BartBlock(nn.Module):
    """Post-norm: x = LN(x + self_attn(x)); (decoder) x = LN(x + cross_attn(x, enc)); x = LN(x + mlp(x))."""

    def __init__(self, config: BartConfig, cross: bool) -> None:
        super().__init__()
        d, eps = config.d_model, config.norm_eps
        attn = lambda: MultiHeadAttention(d, config.n_head, d // config.n_head, bias=True,  # noqa: E731
                                          dropout=config.dropout)
        self.attn = attn()
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.cross_attn = attn() if cross else None
        self.cross_norm = nn.LayerNorm(d, eps=eps) if cross else None
        self.up_proj = nn.Linear(d, config.ff_dim)
        self.down_proj = nn.Linear(config.ff_dim, d)
        self.mlp_norm = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, memory: torch.Tensor | None = None,
                memory_bias: torch.Tensor | None = None, cache: EncDecCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, bias, cache=cache, layer=layer)))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self.drop(self.cross_attn(x, memory_bias, memory=memory, cache=cache,
                                                              layer=layer)))
        return self.mlp_norm(x + self.drop(self.down_proj(self.drop(F.gelu(self.up_proj(x))))))


class BartStack(nn.Module):
    """Positions, embedding LayerNorm and blocks of the encoder or the decoder (token embedding is shared)."""

    def __init__(self, config: BartConfig, decoder: bool) -> None:
        super().__init__()
        n = config.decoder_layers if decoder else config.n_layer
        self.pos_emb = nn.Embedding(config.max_seq_len + POSITION_OFFSET, config.d_model)
        self.emb_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.blocks = nn.ModuleList(BartBlock(config, cross=decoder) for _ in range(n))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, memory: torch.Tensor | None = None,
                memory_bias: torch.Tensor | None = None, cache: EncDecCache | None = None) -> torch.Tensor:
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        if past + T + POSITION_OFFSET > self.pos_emb.num_embeddings:
            raise ValueError(f"{past + T} positions exceed BART's {self.pos_emb.num_embeddings - POSITION_OFFSET}")
        positions = torch.arange(past, past + T, device=x.device) + POSITION_OFFSET
        x = self.drop(self.emb_norm(x + self.pos_emb(positions)[None]))
        for i, block in enumerate(self.blocks):
            x = block(x, bias, memory, memory_bias, cache, i)
        return x


class Bart(EncoderDecoderLM):
    """BART for conditional generation: ``forward(input_ids, attention_mask, decoder_input_ids)`` → logits."""

    def __init__(self, config: BartConfig) -> None:
        super().__init__()
        self.config = config
        self.cache_head_dim = config.d_model // config.n_head
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = BartStack(config, decoder=False)
        self.decoder = BartStack(config, decoder=True)
        # A buffer, as in BART's checkpoints: a fixed bias that training leaves alone.
        self.register_buffer("final_logits_bias", torch.zeros(config.vocab_size))
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit LayerNorms, zero logit bias (BART's initialisation)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.final_logits_bias)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, d_model); ``attention_mask`` (B, S) 1 = token, 0 = padding (right padding)."""
        x = self.tok_emb(input_ids) * self.embed_scale
        return self.encoder(x, padding_bias(attention_mask, x.dtype))

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               attention_mask: torch.Tensor | None = None, cache: EncDecCache | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab) given the encoder output; with ``cache`` it advances by T."""
        x = self.tok_emb(decoder_input_ids) * self.embed_scale
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        h = self.decoder(x, causal_bias(T, past, x.device, x.dtype), memory, padding_bias(attention_mask, x.dtype),
                         cache)
        if cache is not None:
            cache.advance(T)
        return F.linear(h, self.tok_emb.weight, self.final_logits_bias)

    def save_pretrained(self, folder: str | Path, tokenizer: object = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        from omnilm.model.hf_bart import save_bart

        return save_bart(self, folder, tokenizer, state)

    def read_state(self, folder: str | Path) -> dict[str, torch.Tensor]:
        from omnilm.model.hf_bart import read_bart_state

        return read_bart_state(folder, self)

    def num_flops_per_token(self) -> float:
        """Training FLOPs per (encoder + decoder) token, as ``T5.num_flops_per_token`` counts them."""
        c = self.config
        attn, ff = 4 * c.d_model * c.d_model, 2 * c.d_model * c.ff_dim
        enc, dec = c.n_layer * (attn + ff), c.decoder_layers * (2 * attn + ff) + c.d_model * c.vocab_size
        return 6 * (enc + dec) / 2


PRESETS: dict[str, BartConfig] = {
    # A CPU-sized BART for tests and small runs.
    "bart-tiny": BartConfig(vocab_size=2048, d_model=128, n_layer=2, n_head=4, max_seq_len=512),
    # bart-base: https://huggingface.co/facebook/bart-base/blob/main/config.json
    "bart-base": BartConfig(vocab_size=50265, d_model=768, n_layer=6, n_head=12, d_ff=3072, max_seq_len=1024),
    # bart-large: https://huggingface.co/facebook/bart-large/blob/main/config.json
    "bart-large": BartConfig(vocab_size=50265, d_model=1024, n_layer=12, n_head=16, d_ff=4096, max_seq_len=1024),
}


def load_bart_config(values: dict | str | Path) -> BartConfig:
    """A BartConfig from a mapping or YAML/JSON file; a ``preset`` key starts from that preset."""
    return from_preset_or_dict(BartConfig, PRESETS, values, "bart")
