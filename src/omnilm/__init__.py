"""omnilm: a language model through its whole life."""

__version__ = "0.1.0"
