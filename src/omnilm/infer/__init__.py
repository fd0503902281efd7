"""Inference: sampling, generation (KV cache, batching, beam search) and streaming text output."""

from omnilm.infer.generate import beam_search, generate_ids
from omnilm.infer.sampling import SamplingParams
from omnilm.infer.text import TextGenerator

__all__ = ["SamplingParams", "TextGenerator", "beam_search", "generate_ids"]
