"""Tokenizers: a wrapper over the ``tokenizers`` library, BPE training and the ChatML chat format."""

from omnilm.tokenizer.chat import CHAT_TEMPLATE, encode_chat, format_chat, validate_messages
from omnilm.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer
from omnilm.tokenizer.train import train_bpe

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "Tokenizer", "encode_chat", "format_chat", "train_bpe",
           "validate_messages"]
