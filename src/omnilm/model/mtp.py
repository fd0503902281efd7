"""Multi-token prediction: extra output heads on the decoder's trunk that predict tokens t+2 … t+n+1.

At position t the decoder's final hidden state h_t (after its final norm) feeds the usual LM head (token t+1)
and n extra heads; head k predicts token t+1+k. Every head is one pre-norm residual feed-forward block (the
family's MLP) followed by its own final norm and the decoder's LM head (shared unembedding), so the heads need
no attention and no KV cache:
- ``independent`` (Gloeckle et al. 2024, with feed-forward heads): z_k = h_t + MLP_k(norm(h_t)).
- ``sequential`` (DeepSeek-V3's modules): head k also sees the embedding of token t+k, the token the previous
  head (or the LM head, for k = 1) is about: u_k = W_k[norm(z_{k-1}); norm(emb(x_{t+k}))], z_0 = h_t, then
  z_k = u_k + MLP_k(norm(u_k)). Training feeds the true tokens; drafting feeds the previous head's guesses.

``MultiTokenModel`` wraps a Transformer with its heads for training: its forward returns the next-token logits
(so evaluation and sampling see an ordinary LM) and, asked for it, every head's logits too. Its folder is the
decoder's ordinary Hugging Face folder (it still loads in transformers) plus two side files, ``mtp.json`` (the
heads' MTPConfig) and ``mtp.safetensors`` (their weights).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnilm.config import ConfigError, from_dict
from omnilm.model.config import ModelConfig
from omnilm.model.hf import check_tensors, load_pretrained, read_config, read_hf_tensors, save_pretrained, state_from_hf
from omnilm.model.transformer import MLP, Transformer, make_norm
from omnilm.utils.atomic import write_json_atomic

MTP_CONFIG_FILE = "mtp.json"
MTP_WEIGHTS_FILE = "mtp.safetensors"
DECODER_PREFIX = "decoder."
HEADS_PREFIX = "heads."


@dataclass(frozen=True)
class MTPConfig:
    """The extra heads of multi-token prediction."""

    #: Extra heads; head k predicts token t+1+k.
    n_heads: int = 2
    #: ``independent`` heads on the trunk, or ``sequential`` heads that also see the previous token's embedding.
    variant: Literal["independent", "sequential"] = "independent"
    #: Weight of each head's loss in the training objective (None = 1 for every head); the LM head weighs 1.
    loss_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_heads < 1:
            raise ConfigError("mtp.n_heads must be ≥ 1")
        if self.variant not in ("independent", "sequential"):
            raise ConfigError(f"mtp.variant={self.variant!r}; expected independent or sequential")
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
            if len(self.loss_weights) != self.n_heads:
                raise ConfigError(f"mtp.loss_weights has {len(self.loss_weights)} entries for {self.n_heads} heads")

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights or (1.0,) * self.n_heads


class MTPHead(nn.Module):
    """One extra head up to its hidden state z_k (the logits are lm_head(norm_out(z_k)))."""

    def __init__(self, config: ModelConfig, sequential: bool) -> None:
        super().__init__()
        d = config.d_model
        self.norm_hidden = make_norm(config) if sequential else None
        self.norm_embed = make_norm(config) if sequential else None
        self.proj = nn.Linear(2 * d, d, bias=False) if sequential else None
        self.norm = make_norm(config)
        self.mlp = MLP(config)
        self.norm_out = make_norm(config)

    def forward(self, z_prev: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """z_{k-1} (…, D) and, for a sequential head, the embedding of token t+k (…, D) -> z_k (…, D)."""
        u = z_prev
        if self.proj is not None:
            if embedding is None:
                raise ValueError("a sequential head needs the embedding of the token before its target")
            u = self.proj(torch.cat([self.norm_hidden(z_prev), self.norm_embed(embedding)], dim=-1))
        return u + self.mlp(self.norm(u))


class MTPHeads(nn.Module):
    """The n extra heads of one decoder (they borrow its token embedding and LM head at call time)."""

    def __init__(self, config: ModelConfig, mtp: MTPConfig) -> None:
        super().__init__()
        self.mtp = mtp
        self.heads = nn.ModuleList(MTPHead(config, mtp.variant == "sequential") for _ in range(mtp.n_heads))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = (2 * config.n_layer) ** -0.5 if name.endswith("down_proj") else 1.0
                nn.init.normal_(module.weight, std=config.init_std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def sequential(self) -> bool:
        return self.mtp.variant == "sequential"

    def logits(self, decoder: Transformer, hidden: torch.Tensor, tokens: torch.Tensor | None = None,
               ) -> list[torch.Tensor]:
        """Every head's logits from the trunk's hidden states ``hidden`` (B, T, D).

        Head k (1-based) gets positions 0 … T-k-1 (those whose target t+1+k lies inside a window of T+1 tokens)
        and returns (B, T-k, V). A sequential head needs ``tokens`` (B, T+1), the window whose first T tokens
        produced ``hidden``: head k reads token t+k at position t.
        """
        out, z = [], hidden
        T = hidden.shape[1]
        for k, head in enumerate(self.heads, start=1):
            z = z[:, :T - k]
            embedding = None
            if self.sequential:
                if tokens is None:
                    raise ValueError("sequential heads need the tokens")
                embedding = decoder.tok_emb(tokens[:, k:T])
            z = head(z, embedding)
            out.append(decoder.lm_head(head.norm_out(z)))
        return out


class MultiTokenModel(nn.Module):
    """A decoder with multi-token-prediction heads (for training; see the module docstring)."""

    def __init__(self, decoder: Transformer, mtp: MTPConfig, heads: MTPHeads | None = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.heads = heads if heads is not None else MTPHeads(decoder.config, mtp)
        self.heads.to(decoder.tok_emb.weight.device, decoder.tok_emb.weight.dtype)

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.blocks

    # What decoding needs of a model (periodic greedy samples run through it).
    @property
    def tok_emb(self) -> nn.Embedding:
        return self.decoder.tok_emb

    @property
    def pos_emb(self) -> nn.Embedding | None:
        return self.decoder.pos_emb

    def new_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.decoder.new_cache(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, last_only: bool = False,
                with_heads: bool = False, tokens: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Next-token logits (B, T, V); ``with_heads`` adds the heads' logits (see ``MTPHeads.logits``; a
        sequential model needs ``tokens`` (B, T+1), whose first T are ``input_ids``)."""
        if not with_heads:
            return self.decoder(input_ids, attention_mask, position_ids, cache, last_only)
        hidden = self.decoder.hidden_states(input_ids, attention_mask, position_ids, cache)
        return self.decoder.lm_head(hidden), self.heads.logits(self.decoder, hidden, tokens)

    # ------------------------------------------------------------------------------------------ folders
    def save_pretrained(self, folder: str | Path, tokenizer: Any = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        """The decoder's Hugging Face folder plus ``mtp.json`` and ``mtp.safetensors``."""
        state = self.state_dict() if state is None else state
        decoder = {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
        folder = save_pretrained(self.decoder, folder, tokenizer=tokenizer, state=decoder)
        save_heads(folder, self.heads.mtp, {k: v for k, v in state.items() if k.startswith(HEADS_PREFIX)})
        return folder

    @staticmethod
    def read_state(folder: str | Path) -> dict[str, torch.Tensor]:
        """The tensors of a multi-token folder under this module's names (for restoring checkpoints)."""
        decoder = state_from_hf(read_hf_tensors(folder), read_config(folder))
        heads = load_file(str(Path(folder) / MTP_WEIGHTS_FILE))
        return {DECODER_PREFIX + k: v for k, v in decoder.items()} | heads

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> MultiTokenModel:
        decoder = load_pretrained(folder, dtype=dtype, device=device)
        return cls(decoder, read_mtp_config(folder), load_heads(folder, decoder)).eval()


def save_heads(folder: str | Path, mtp: MTPConfig, state: dict[str, torch.Tensor]) -> None:
    """Write the side files of a folder's heads (``state`` keyed ``heads.…``)."""
    folder = Path(folder)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / MTP_WEIGHTS_FILE),
              metadata={"format": "pt"})
    write_json_atomic(folder / MTP_CONFIG_FILE, asdict(mtp))


def has_heads(folder: str | Path) -> bool:
    return (Path(folder) / MTP_CONFIG_FILE).is_file()


def read_mtp_config(folder: str | Path) -> MTPConfig:
    path = Path(folder) / MTP_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no multi-token-prediction heads ({MTP_CONFIG_FILE} missing); train with "
                          "the pretrain option mtp to get some")
    return from_dict(MTPConfig, json.loads(path.read_text(encoding="utf-8")), source=str(path))


def load_heads(folder: str | Path, decoder: Transformer) -> MTPHeads:
    """The heads saved beside the model folder ``folder``, for ``decoder`` (its device and dtype)."""
    mtp = read_mtp_config(folder)
    with torch.device("meta"):
        heads = MTPHeads(decoder.config, mtp)
    state = {k[len(HEADS_PREFIX):]: v for k, v in load_file(str(Path(folder) / MTP_WEIGHTS_FILE)).items()}
    check_tensors(folder, state, {k: v.shape for k, v in heads.state_dict().items()})
    heads.load_state_dict(state, assign=True)
    p = decoder.tok_emb.weight
    return heads.to(p.device, p.dtype).eval()
