"""Masked language modelling (BERT) and replaced-token detection (ELECTRA): the masking transform and losses.

Masking (BERT): each maskable token is selected with probability ``mask_prob``; of the selected, a fraction
``replace_mask`` becomes ``[MASK]``, ``replace_random`` a uniformly random token, the rest stay unchanged.
The loss is cross-entropy on the selected positions only. With whole-word masking, words (a word-start token
and the continuation tokens after it) are selected instead of tokens, and all tokens of a word share the fate.

ELECTRA: a small MLM generator fills the masked positions by sampling from its own distribution; the
discriminator labels every real token as replaced (sampled token ≠ original) or original. Loss = generator MLM
loss + λ · discriminator binary cross-entropy (λ = 50 in the paper); the generator's samples carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.objectives.lm import IGNORE_INDEX


@dataclass(frozen=True)
class MaskingConfig:
    """BERT's masking rates."""

    #: Probability that a token (or a whole word) is selected for prediction.
    mask_prob: float = 0.15
    #: Of the selected: fraction replaced by [MASK].
    replace_mask: float = 0.8
    #: Of the selected: fraction replaced by a random token (the remainder stays unchanged).
    replace_random: float = 0.1
    #: Select whole words (word-start token plus its continuations) instead of single tokens.
    whole_word: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.mask_prob < 1 or self.replace_mask + self.replace_random > 1 or \
                min(self.replace_mask, self.replace_random) < 0:
            raise ValueError(f"invalid masking rates {self}")


def word_ids(word_start: torch.Tensor) -> torch.Tensor:
    """Index of the word each position belongs to (B, T), from a boolean word-start marker (B, T); a row's
    first position always opens a word."""
    starts = word_start.clone()
    starts[:, 0] = True
    return starts.long().cumsum(-1) - 1


def mask_tokens(tokens: torch.Tensor, config: MaskingConfig, mask_id: int, vocab_size: int,
                maskable: torch.Tensor, generator: torch.Generator | None = None,
                word_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for MLM from ``tokens`` (B, T): labels hold the original token at selected positions
    and IGNORE_INDEX elsewhere. ``maskable`` (B, T bool) excludes special tokens and padding from selection.
    ``word_start`` (B, T bool) is needed with ``config.whole_word``."""
    device = tokens.device

    def uniform(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device)

    if config.whole_word:
        if word_start is None:
            raise ValueError("whole-word masking needs word_start")
        ids = word_ids(word_start)
        selected = (uniform(tokens.shape) < config.mask_prob).gather(1, ids)  # each word's draw, per token
        # a word decides for all of its tokens at once, and its fate (mask/random/keep) is shared too
        fate = uniform(tokens.shape).gather(1, ids)
    else:
        selected = uniform(tokens.shape) < config.mask_prob
        fate = uniform(tokens.shape)
    selected &= maskable
    labels = tokens.masked_fill(~selected, IGNORE_INDEX)
    to_mask = selected & (fate < config.replace_mask)
    to_random = selected & (fate >= config.replace_mask) & (fate < config.replace_mask + config.replace_random)
    random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator, device=device)
    inputs = tokens.masked_fill(to_mask, mask_id)
    inputs = torch.where(to_random, random_tokens, inputs)
    return inputs, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the selected positions (labels ≠ IGNORE_INDEX); 0 (with grad) if none is selected."""
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def electra_step(generator: nn.Module, discriminator: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor, disc_weight: float = 50.0,
                 sampler: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ELECTRA's joint loss for masked ``inputs`` with MLM ``labels``; returns the loss and its parts.

    The generator's logits at the masked positions are sampled (temperature 1, without gradient) to build the
    discriminator's input; positions where the sample equals the original count as original.
    """
    gen_logits = generator(inputs, attention_mask)
    gen_loss = mlm_loss(gen_logits, labels)
    selected = labels != IGNORE_INDEX
    with torch.no_grad():
        probs = torch.softmax(gen_logits[selected].float(), -1)
        sampled = torch.multinomial(probs, 1, generator=sampler).squeeze(-1) if probs.numel() else \
            labels[selected]
    original = torch.where(selected, labels, inputs)
    corrupted = original.clone()
    corrupted[selected] = sampled
    replaced = (corrupted != original).float()
    disc_logits = discriminator(corrupted, attention_mask)
    real = attention_mask.bool()
    disc_loss = F.binary_cross_entropy_with_logits(disc_logits[real].float(), replaced[real])
    with torch.no_grad():
        accuracy = ((disc_logits[real] > 0).float() == replaced[real]).float().mean().item()
    return gen_loss + disc_weight * disc_loss, {"gen_loss": gen_loss.item(), "disc_loss": disc_loss.item(),
                                                "disc_acc": accuracy,
                                                "replaced_frac": replaced[real].mean().item()}
