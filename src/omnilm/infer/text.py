"""Text in, text out: prompts are tokenized, generated, and decoded as a stream of deltas."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from omnilm.infer.detokenize import StreamingDecoder
from omnilm.infer.generate import FINISHED, beam_search, generate_ids
from omnilm.infer.layout import prepare_for_decoding
from omnilm.infer.mtp_draft import MTPDrafter
from omnilm.infer.sampling import SamplingParams
from omnilm.infer.speculative import check_compatible, speculative_tokens
from omnilm.model.hf import load_pretrained
from omnilm.model.mtp import MTPHeads, load_heads
from omnilm.model.transformer import Transformer
from omnilm.tokenizer import Tokenizer


class TextGenerator:
    """A model and its tokenizer, ready to continue text prompts.

    With a ``draft`` model (same vocabulary), or the model's own multi-token-prediction heads (``mtp_heads``,
    self-speculative decoding), single prompts without beam search or repetition penalty are decoded
    speculatively, ``speculative_k`` draft tokens per target pass; the output distribution is the model's own
    either way.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, draft: Transformer | None = None,
                 speculative_k: int = 4, mtp_heads: MTPHeads | None = None) -> None:
        self.model = prepare_for_decoding(model)
        self.tokenizer = tokenizer
        if draft is not None and mtp_heads is not None:
            raise ValueError("draft with a draft model or with the model's heads, not both")
        self.mtp_heads = prepare_for_decoding(mtp_heads) if mtp_heads is not None else None
        if draft is not None:
            check_compatible(model, draft, SamplingParams())
        if speculative_k < 1:
            raise ValueError("speculative_k must be ≥ 1")
        self.draft = prepare_for_decoding(draft) if draft is not None else None
        self.speculative_k = speculative_k
        eos = {tokenizer.eos_id, model.config.eos_token_id}
        self.eos_ids = sorted(i for i in eos if i is not None)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else model.config.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", draft: str | Path | None = None,
                        speculative_k: int = 4, mtp: bool = False) -> TextGenerator:
        """Load a model folder (weights + tokenizer.json), and optionally a draft model folder or (``mtp``) the
        folder's own multi-token heads as the draft."""
        draft_model = load_pretrained(draft, dtype=dtype, device=device) if draft is not None else None
        model = load_pretrained(folder, dtype=dtype, device=device)
        heads = load_heads(folder, model) if mtp else None
        return cls(model, Tokenizer.from_dir(folder), draft_model, speculative_k, heads)

    def _speculative(self, prompts: Sequence[str], params: SamplingParams) -> bool:
        drafts = self.draft is not None or self.mtp_heads is not None
        return (drafts and len(prompts) == 1 and params.num_beams == 1
                and params.repetition_penalty == 1.0 and not params.attention_sinks)

    def stream_batch(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams,
                     seeds: Sequence[int | None] | None = None) -> Iterator[list[str]]:
        """Yield, step by step, each prompt's new text (empty strings where nothing is final yet).

        A prompt is text, or token ids already encoded (a conversation from ``encode_chat``). ``seeds`` (one per
        prompt) samples each row with its own generator (``generate_ids``)."""
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        decoders = [StreamingDecoder(self.tokenizer, params.stop) for _ in prompts]
        if params.num_beams > 1:
            yield [self._beam_text(ids, params, decoder) for ids, decoder in zip(prompt_ids, decoders, strict=True)]
            return
        if self._speculative(prompts, params) and seeds is None:
            yield from self._speculative_deltas(prompt_ids[0], params, decoders[0])
            return
        stop_flags = [False] * len(prompts)
        for tokens in generate_ids(self.model, prompt_ids, params, self.eos_ids, self.pad_id, stop_flags, seeds):
            deltas = []
            for row, token in enumerate(tokens.tolist()):
                if token == FINISHED or token in self.eos_ids:
                    deltas.append("")
                    continue
                deltas.append(decoders[row].push(token))
                stop_flags[row] = decoders[row].stopped
            yield deltas
        yield [d.finish() for d in decoders]

    def _speculative_deltas(self, prompt_ids: list[int], params: SamplingParams,
                            decoder: StreamingDecoder) -> Iterator[list[str]]:
        draft = self.draft if self.mtp_heads is None else MTPDrafter(self.model, self.mtp_heads)
        for chunk in speculative_tokens(self.model, draft, prompt_ids, params, self.speculative_k, self.eos_ids):
            yield ["".join(decoder.push(token) for token in chunk if token not in self.eos_ids)]
            if decoder.stopped:
                break
        yield [decoder.finish()]

    def _beam_text(self, prompt_ids: list[int], params: SamplingParams, decoder: StreamingDecoder) -> str:
        tokens = beam_search(self.model, prompt_ids, params.num_beams, params.max_new_tokens, self.eos_ids,
                             params.length_penalty)
        pieces = [decoder.push(token) for token in tokens if token not in self.eos_ids]
        return "".join(pieces) + decoder.finish()

    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece, as soon as each piece is final."""
        for deltas in self.stream_batch([prompt], params):
            if deltas[0]:
                yield deltas[0]

    def generate(self, prompts: str | Sequence[str | Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int | None] | None = None) -> list[str]:
        """The continuation of each prompt, text or token ids (batched with left padding; ``seeds``: one random
        generator per prompt, see ``generate_ids``)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [""] * len(prompts)
        for deltas in self.stream_batch(prompts, params, seeds):
            texts = [t + d for t, d in zip(texts, deltas, strict=True)]
        return texts

