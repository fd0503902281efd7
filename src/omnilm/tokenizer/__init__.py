"""Tokenizers: a wrapper over the ``tokenizers`` library and BPE training."""

from omnilm.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer
from omnilm.tokenizer.train import train_bpe

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "train_bpe"]
