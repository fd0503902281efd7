"""Prompting strategies: few-shot (chosen or retrieved exemplars), zero-shot chain of thought, self-consistency and
Auto-CoT, over any omnilm chat model.

- :mod:`~omnilm.prompting.answers`: read the final answer out of a reply; majority vote.
- :mod:`~omnilm.prompting.prompts`: demonstrations and the chain-of-thought trigger as chat messages.
- :mod:`~omnilm.prompting.exemplars`: a chosen exemplar list, or the training questions most similar to a question
  (cosine similarity of the model's own embeddings, :func:`omnilm.infer.embed.embed_texts`).
- :mod:`~omnilm.prompting.self_consistency`: k sampled replies in one batch, the most frequent answer.
- :mod:`~omnilm.prompting.auto_cot`: cluster questions, take the one nearest each centre, keep its zero-shot chain
  when it is short (≤ 60 tokens, ≤ 5 steps).
- :mod:`~omnilm.prompting.strategy`: the named strategies ``omnilm eval --prompting`` scores.
"""

from omnilm.prompting.answers import AnswerReader, Vote, majority_vote
from omnilm.prompting.prompts import COT_TRIGGER, Demonstration, chat_messages

__all__ = ["COT_TRIGGER", "AnswerReader", "Demonstration", "Vote", "chat_messages", "majority_vote"]
