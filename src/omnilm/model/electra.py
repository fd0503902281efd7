"""ELECTRA pre-training: a small MLM generator and the discriminator, trained together with shared embeddings.

Token, position and token-type embeddings and the embedding LayerNorm are one set of modules used by both
(ELECTRA's embedding sharing; the generator is narrower, so both embed at the discriminator's
``embedding_size`` and each projects to its own width). A checkpoint is two Hugging Face folders: the
discriminator (``ElectraForPreTraining``) at the top and the generator (``ElectraForMaskedLM``) in
``generator/``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omnilm.model.encoder import EncoderConfig, EncoderForMaskedLM, EncoderForTokenDetection, electra_generator_config

GENERATOR_FOLDER = "generator"
SHARED = ("tok_emb", "pos_emb", "type_emb", "emb_norm")


class ElectraPretraining(nn.Module):
    """Holds ``generator`` (masked LM) and ``discriminator`` (replaced-token detection); see ``objectives.mlm``."""

    def __init__(self, discriminator: EncoderForTokenDetection, generator: EncoderForMaskedLM) -> None:
        super().__init__()
        if generator.config.emb_dim != discriminator.config.emb_dim:
            raise ValueError("generator and discriminator must embed at the same width to share embeddings")
        self.discriminator, self.generator = discriminator, generator
        self.config = discriminator.config
        for name in SHARED:
            setattr(generator.encoder, name, getattr(discriminator.encoder, name))

    @classmethod
    def fresh(cls, config: EncoderConfig, size_divisor: int = 4) -> ElectraPretraining:
        return cls(EncoderForTokenDetection(config), EncoderForMaskedLM(electra_generator_config(config, size_divisor)))

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype | None = None) -> ElectraPretraining:
        from omnilm.model.hf_encoder import load_encoder

        folder = Path(folder)
        return cls(load_encoder(folder, dtype=dtype), load_encoder(folder / GENERATOR_FOLDER, dtype=dtype))

    def save_pretrained(self, folder: str | Path, tokenizer: object = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        def part(prefix: str) -> dict[str, torch.Tensor] | None:
            return None if state is None else {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        folder = Path(folder)
        self.discriminator.save_pretrained(folder, tokenizer, part("discriminator."))
        self.generator.save_pretrained(folder / GENERATOR_FOLDER, tokenizer, part("generator."))
        return folder

    def read_state(self, folder: str | Path) -> dict[str, torch.Tensor]:
        folder = Path(folder)
        disc = self.discriminator.read_state(folder)
        gen = self.generator.read_state(folder / GENERATOR_FOLDER)
        return {f"discriminator.{k}": v for k, v in disc.items()} | {f"generator.{k}": v for k, v in gen.items()}

    def flops_per_token(self, seq_len: int) -> float:
        return self.discriminator.flops_per_token(seq_len) + self.generator.flops_per_token(seq_len)
