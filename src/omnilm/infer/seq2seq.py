"""Generation with encoder–decoders (T5, BART): encode the prompt once, decode with a cache.

The prompt is the encoder input, right-padded (encoder positions start at 0 in every row); the decoder starts
from ``config.decoder_start_token_id``. Cross-attention keys/values are computed on the first decoder step and
reused (``EncDecCache``). Sampling and beam search are the decoder's own loops (``decode_loop``, ``beam_loop``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from omnilm.infer.generate import beam_loop, decode_loop
from omnilm.infer.sampling import SamplingParams


def right_pad(rows: Sequence[Sequence[int]], pad_id: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack rows left-aligned: (ids, attention mask with 1 on real tokens)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every input needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def _start(model: Any, prompts: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int,
           ) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    device = model.tok_emb.weight.device
    ids, mask = right_pad(prompts, pad_id, device)
    memory = model.encode(ids, mask)
    cache = model.new_cache(len(prompts), max_new_tokens + 1)
    start = torch.full((len(prompts), 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    logits = model.decode(start, memory, mask, cache)[:, -1]
    return memory, mask, cache, logits


@torch.inference_mode()
def seq2seq_generate_ids(model: Any, prompts: Sequence[Sequence[int]], params: SamplingParams,
                         eos_ids: Sequence[int] = (), pad_id: int = 0,
                         stop_flags: list[bool] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next output token of every prompt (B,) at each step, as ``generate_ids`` does for decoders."""
    if params.num_beams > 1:
        raise ValueError("seq2seq_generate_ids samples; use seq2seq_beam_search for num_beams > 1")
    memory, mask, cache, logits = _start(model, prompts, pad_id, params.max_new_tokens)

    def step(feed: torch.Tensor) -> torch.Tensor:
        return model.decode(feed[:, None], memory, mask, cache)[:, -1]

    yield from decode_loop(logits, step, params, eos_ids, pad_id, stop_flags)


@torch.inference_mode()
def seq2seq_beam_search(model: Any, prompt: Sequence[int], num_beams: int, max_new_tokens: int,
                        eos_ids: Sequence[int] = (), length_penalty: float = 1.0, pad_id: int = 0) -> list[int]:
    """The best beam's output tokens for one prompt (ending with EOS when one was produced)."""
    memory, mask, cache, logits = _start(model, [prompt], pad_id, max_new_tokens)
    state = {"memory": memory, "mask": mask}

    def reorder(index: torch.Tensor) -> None:
        cache.reorder(index)
        state["memory"], state["mask"] = state["memory"].index_select(0, index), state["mask"].index_select(0, index)

    def step(feed: torch.Tensor) -> torch.Tensor:
        return model.decode(feed[:, None], state["memory"], state["mask"], cache)[:, -1]

    return beam_loop(logits, step, reorder, num_beams, max_new_tokens, eos_ids, length_penalty)


def generate_text(folder: str, prompt: str, params: SamplingParams, device: str = "cpu",
                  dtype: torch.dtype | None = None) -> Iterator[str]:
    """``omnilm generate`` for an encoder–decoder folder: ``prompt`` is the encoder input (ending with EOS, and
    opening with BOS where the model has its own); yields the output text piece by piece (special tokens left
    out; stop strings end it before they are printed)."""
    from omnilm.model.families import load_any
    from omnilm.tokenizer import Tokenizer

    model = load_any(folder, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(folder)
    config = model.config
    bos = getattr(config, "bos_token_id", config.eos_token_id)
    ids = ([bos] if bos != config.eos_token_id else []) + tokenizer.encode(prompt, special=False) + [
        config.eos_token_id]
    eos = [config.eos_token_id]
    if params.num_beams > 1:
        steps = iter([torch.tensor([t]) for t in seq2seq_beam_search(model, ids, params.num_beams,
                                                                     params.max_new_tokens, eos,
                                                                     params.length_penalty, config.pad_token_id)])
    else:
        steps = seq2seq_generate_ids(model, [ids], params, eos, config.pad_token_id)
    tokens: list[int] = []
    printed = ""
    for step in steps:
        token = int(step[0])
        if token < 0 or token in eos:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in params.stop if s and s in text), default=-1)
        if cut >= 0:
            yield text[len(printed):cut]
            return
        if not text.endswith("\ufffd"):  # a partial UTF-8 character waits for its next token
            yield text[len(printed):]
            printed = text
