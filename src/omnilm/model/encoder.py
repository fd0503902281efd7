"""The bidirectional encoder of the BERT family (BERT, ELECTRA) and its task heads.

A block is post-norm: ``x = LN(x + attn(x)); x = LN(x + mlp(x))`` with exact-GELU MLP and biased projections;
attention sees every real token of the sequence (padding hidden by the mask). Embeddings are token + learned
position + token type, layer-normed; ELECTRA embeds in a narrower ``embedding_size`` and projects up.

Heads (each composed with an ``Encoder``, never a subclass of it):
- ``EncoderForMaskedLM``: dense, GELU, LayerNorm, then the tied token embedding plus a bias (BERT's MLM head;
  ELECTRA's generator, whose dense maps down to ``embedding_size``);
- ``EncoderForSequenceClassification``: BERT's tanh pooler over the first token ([CLS]) and a linear classifier,
  or ELECTRA's dense–GELU–linear head on it;
- ``EncoderForTokenDetection``: ELECTRA's discriminator, one replaced/original logit per token;
- ``EncoderForPreTraining``: BERT's masked LM plus next-sentence prediction on the pooled [CLS].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ConfigError, from_preset_or_dict
from omnilm.model.mha import MultiHeadAttention, padding_bias

EncoderFamily = Literal["bert", "electra"]


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of an encoder (``family`` bert or electra picks the Hugging Face layout and the embedding size)."""

    family: EncoderFamily = "bert"
    vocab_size: int = 2048
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    #: Hidden width of the MLP (None = 4·d_model).
    d_ff: int | None = None
    #: Width of the token embeddings (electra; None = d_model, as BERT always has).
    embedding_size: int | None = None
    #: Size of the learned position table, the longest sequence.
    max_seq_len: int = 512
    #: Number of token types (segments A/B).
    type_vocab_size: int = 2
    #: LayerNorm epsilon.
    norm_eps: float = 1e-12
    #: Dropout on embeddings, attention probabilities, residual branches and the classifier input.
    dropout: float = 0.1
    #: Standard deviation of the normal initialisation.
    init_std: float = 0.02
    #: Number of classes of the sequence-classification head.
    num_labels: int = 2
    #: Padding token id (config.json's pad_token_id).
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.family not in ("bert", "electra"):
            raise ConfigError(f"unknown encoder family {self.family!r}; expected bert or electra")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.family == "bert" and self.embedding_size not in (None, self.d_model):
            raise ConfigError("bert embeds at d_model; a separate embedding_size is electra's")

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def emb_dim(self) -> int:
        return self.embedding_size or self.d_model


class EncoderBlock(nn.Module):
    """Post-norm transformer block: LN(x + attn(x)), then LN(x + down(gelu(up(x))))."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        d = config.d_model
        self.attn = MultiHeadAttention(d, config.n_head, d // config.n_head, bias=True, dropout=config.dropout)
        self.attn_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.up_proj = nn.Linear(d, config.ff_dim)
        self.down_proj = nn.Linear(config.ff_dim, d)
        self.mlp_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, bias)))
        return self.mlp_norm(x + self.drop(self.down_proj(F.gelu(self.up_proj(x)))))


class Encoder(nn.Module):
    """Embeddings and post-norm blocks: ``forward`` returns the final hidden states (B, T, d_model)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        e = config.emb_dim
        self.tok_emb = nn.Embedding(config.vocab_size, e)
        self.pos_emb = nn.Embedding(config.max_seq_len, e)
        self.type_emb = nn.Embedding(config.type_vocab_size, e)
        self.emb_norm = nn.LayerNorm(e, eps=config.norm_eps)
        self.emb_proj = nn.Linear(e, config.d_model) if e != config.d_model else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` (B, T): 1 = token, 0 = padding. ``token_type_ids`` default to segment 0."""
        B, T = input_ids.shape
        if self.config.max_seq_len < T:
            raise ValueError(f"sequence of {T} tokens exceeds the encoder's {self.config.max_seq_len} positions")
        positions = torch.arange(T, device=input_ids.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)[None] + self.type_emb(types)
        x = self.drop(self.emb_norm(x))
        if self.emb_proj is not None:
            x = self.emb_proj(x)  # (B, T, embedding_size) -> (B, T, d_model)
        bias = padding_bias(attention_mask, x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        return x


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) linear and embedding weights, zero biases, unit LayerNorms (BERT's initialisation)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class MLMHead(nn.Module):
    """dense (d_model → embedding width), GELU, LayerNorm; the caller multiplies by the tied embedding."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.emb_dim)
        self.norm = nn.LayerNorm(config.emb_dim, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), embedding, self.bias)


class EncoderTask(nn.Module):
    """What every encoder-with-a-head shares: Hugging Face folders (``hf_encoder``) and the FLOPs estimate that
    the trainer reads. Subclasses set ``config`` and ``encoder`` and add their head."""

    config: EncoderConfig
    encoder: Encoder

    def save_pretrained(self, folder: str | Path, tokenizer: object = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        from omnilm.model.hf_encoder import save_encoder

        return save_encoder(self, folder, tokenizer, state)  # type: ignore[arg-type]

    def read_state(self, folder: str | Path) -> dict[str, torch.Tensor]:
        from omnilm.model.hf_encoder import read_encoder_state

        return read_encoder_state(folder, self)  # type: ignore[arg-type]

    def flops_per_token(self, seq_len: int) -> float:
        return num_flops_per_token(self.config, seq_len)


class EncoderForMaskedLM(EncoderTask):
    """Masked-LM logits (B, T, vocab) for every position (BertForMaskedLM, ElectraForMaskedLM)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.head = MLMHead(config)
        init_weights(self, config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids), self.encoder.tok_emb.weight)


class EncoderForPreTraining(EncoderTask):
    """BERT's two pre-training heads (BertForPreTraining): masked-LM logits (B, T, vocab) and next-sentence logits
    (B, 2) from the tanh-pooled [CLS] (0 = segment B follows segment A, 1 = B is a random segment)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if config.family != "bert":
            raise ConfigError("next-sentence prediction is BERT's; electra has no such head")
        self.config = config
        self.encoder = Encoder(config)
        self.head = MLMHead(config)
        self.pooler = nn.Linear(config.d_model, config.d_model)
        self.nsp = nn.Linear(config.d_model, 2)
        init_weights(self, config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(input_ids, attention_mask, token_type_ids)
        return self.head(h, self.encoder.tok_emb.weight), self.nsp(torch.tanh(self.pooler(h[:, 0])))


class EncoderForSequenceClassification(EncoderTask):
    """Class logits (B, num_labels) from the first token ([CLS]). BERT (BertForSequenceClassification): tanh
    pooler, then a linear classifier. ELECTRA (ElectraForSequenceClassification): dense, GELU, then a linear
    output projection."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        d = config.d_model
        if config.family == "bert":
            self.pooler = nn.Linear(d, d)
            self.classifier = nn.Linear(d, config.num_labels)
        else:
            self.dense = nn.Linear(d, d)
            self.out = nn.Linear(d, config.num_labels)
        self.drop = nn.Dropout(config.dropout)
        init_weights(self, config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        first = self.encoder(input_ids, attention_mask, token_type_ids)[:, 0]  # (B, d_model): the [CLS] position
        if self.config.family == "bert":
            return self.classifier(self.drop(torch.tanh(self.pooler(first))))
        return self.out(self.drop(F.gelu(self.dense(self.drop(first)))))


class EncoderForTokenDetection(EncoderTask):
    """ELECTRA's discriminator: one logit per token (B, T), positive = replaced (ElectraForPreTraining)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.out = nn.Linear(config.d_model, 1)
        init_weights(self, config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(input_ids, attention_mask, token_type_ids)
        return self.out(F.gelu(self.dense(h))).squeeze(-1)

    def flops_per_token(self, seq_len: int) -> float:
        return num_flops_per_token(self.config, seq_len, mlm_head=False)


def num_flops_per_token(config: EncoderConfig, seq_len: int, mlm_head: bool = True) -> float:
    """Training FLOPs per token (forward + backward ≈ 6 × the weights a token meets + attention): the blocks,
    ELECTRA's embedding projection, and the MLM head (dense + vocabulary projection) or, with ``mlm_head`` false,
    the discriminator's (dense + one logit)."""
    d, e, L = config.d_model, config.emb_dim, config.n_layer
    weights = L * (4 * d * d + 2 * d * config.ff_dim) + (e * d if e != d else 0)
    weights += d * e + config.vocab_size * e if mlm_head else d * d + d
    return 6 * weights + 12 * L * d * seq_len


PRESETS: dict[str, EncoderConfig] = {
    # A few-hundred-thousand-parameter BERT for tests and CPU runs.
    "bert-tiny": EncoderConfig(family="bert", vocab_size=2048, n_layer=2, n_head=2, d_model=128, max_seq_len=512),
    # bert-base-uncased: https://huggingface.co/google-bert/bert-base-uncased/blob/main/config.json
    "bert-base": EncoderConfig(family="bert", vocab_size=30522, n_layer=12, n_head=12, d_model=768),
    # The shape of electra-small's discriminator (embedding 128, hidden 256, 12 layers, 4 heads, MLP 1024):
    # https://huggingface.co/google/electra-small-discriminator/blob/main/config.json
    "electra-small": EncoderConfig(family="electra", vocab_size=30522, n_layer=12, n_head=4, d_model=256,
                                   d_ff=1024, embedding_size=128),
    # electra-small's generator: hidden 64 (a quarter of the discriminator's), 1 head, MLP 256:
    # https://huggingface.co/google/electra-small-generator/blob/main/config.json
    "electra-small-generator": EncoderConfig(family="electra", vocab_size=30522, n_layer=12, n_head=1, d_model=64,
                                             d_ff=256, embedding_size=128),
    # A CPU-sized ELECTRA discriminator (embedding 64, hidden 128).
    "electra-tiny": EncoderConfig(family="electra", vocab_size=2048, n_layer=2, n_head=2, d_model=128,
                                  embedding_size=64),
}


def load_encoder_config(values: dict | str | Path) -> EncoderConfig:
    """A EncoderConfig from a mapping or YAML/JSON file; a ``preset`` key starts from that preset."""
    return from_preset_or_dict(EncoderConfig, PRESETS, values, "encoder")


def electra_generator_config(discriminator: EncoderConfig, size_divisor: int = 4) -> EncoderConfig:
    """ELECTRA's generator shape: the discriminator's with hidden size, heads and MLP divided by ``size_divisor``
    and the same embedding width (the embeddings are shared)."""
    d = max(discriminator.d_model // size_divisor, 1)
    heads = max(discriminator.n_head // size_divisor, 1)
    return replace(discriminator, family="electra", d_model=d, n_head=heads,
                   d_ff=max(discriminator.ff_dim // size_divisor, 1), embedding_size=discriminator.emb_dim)


__all__ = ["Encoder", "EncoderConfig", "EncoderTask", "EncoderForMaskedLM", "EncoderForPreTraining",
           "EncoderForSequenceClassification",
           "EncoderForTokenDetection", "PRESETS", "electra_generator_config", "load_encoder_config",
           "num_flops_per_token"]
