"""Replies to prompts given as chat messages, from a chat model (ChatML) or a plain-text one (``text_prompt``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from omnilm.infer.sampling import SamplingParams
from omnilm.infer.text import TextGenerator
from omnilm.prompting.prompts import text_prompt
from omnilm.tokenizer.chat import IM_END, encode_chat, format_chat

#: Where a plain-text reply ends: the data puts every answer on one line.
TEXT_STOP = ("\n",)


class Responder:
    """A ``TextGenerator`` that takes chat messages: with ``chat`` they are formatted with the chat template and a
    reply ends at ``<|im_end|>``; without, they become a ``Question:/Answer:`` text and a reply ends at a newline."""

    def __init__(self, generator: TextGenerator, chat: bool = True) -> None:
        self.generator = generator
        self.chat = chat
        if chat:
            im_end = generator.tokenizer.token_to_id(IM_END)
            if im_end is None:
                raise ValueError(f"the tokenizer has no {IM_END} token: not a chat model (use chat=False)")
            generator.eos_ids = sorted(set(generator.eos_ids) | {im_end})

    @property
    def tokenizer(self):  # noqa: ANN201  (omnilm.tokenizer.Tokenizer)
        return self.generator.tokenizer

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt as the text the model continues."""
        return format_chat(messages, add_generation_prompt=True) if self.chat else text_prompt(messages)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt's tokens; message text is encoded as text, never as control tokens."""
        if self.chat:
            return encode_chat(self.tokenizer, messages, add_generation_prompt=True)[0]
        return self.tokenizer.encode(text_prompt(messages), special=False)

    def params(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the stop strings a reply ends at."""
        return params if self.chat else replace(params, stop=tuple(dict.fromkeys((*params.stop, *TEXT_STOP))))

    def replies(self, prompts: Sequence[Sequence[dict[str, str]]], params: SamplingParams,
                seeds: Sequence[int | None] | None = None) -> list[str]:
        """One reply per prompt, all in one batch (``seeds``: one random generator per prompt), stripped."""
        texts = self.generator.generate([self.prompt_ids(p) for p in prompts], self.params(params), seeds)
        return [t.strip() for t in texts]
