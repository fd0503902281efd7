"""Token-level generation: batched (left-padded) sampling with a KV cache, and beam search."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from omnilm.infer.sampling import SamplingParams, next_token
from omnilm.model.transformer import Transformer

FINISHED = -1  # yielded in place of a token for a sequence that has already ended


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack prompts right-aligned: (ids, attention mask), the mask None when no padding was needed."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, (None if bool(mask.all()) else mask)


def check_length(model: Transformer, total: int) -> None:
    """Refuse ``total`` positions beyond a learned-position model's context."""
    if model.pos_emb is not None and total > model.config.max_seq_len:
        raise ValueError(f"prompt plus max_new_tokens = {total} tokens exceeds the model's context of "
                         f"{model.config.max_seq_len}")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded random generator on ``device``, or None (torch's global one) without a seed."""
    return None if seed is None else torch.Generator(device).manual_seed(seed)


@torch.inference_mode()
def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 eos_ids: Sequence[int] = (), pad_id: int = 0,
                 stop_flags: list[bool] | None = None,
                 seeds: Sequence[int | None] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt (B,) at each step; ended sequences yield FINISHED.

    A sequence ends on an ``eos_ids`` token (which is yielded) or when the caller sets its entry of
    ``stop_flags`` (used for stop strings, which are matched on text). ``seeds`` (one per prompt) gives every
    row its own random generator instead of ``params.seed``'s shared one (see ``decode_loop``).
    """
    if params.num_beams > 1:
        raise ValueError("generate_ids samples; use beam_search for num_beams > 1")
    device = model.tok_emb.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    batch, width = ids.shape
    if params.attention_sinks:
        # Positions are slots of the bounded cache, so a learned-position model streams past its table too.
        limit = model.config.max_seq_len
        window = params.sink_window or limit - params.attention_sinks - 1
        if window < 1 or (model.pos_emb is not None and max(width, params.attention_sinks + window + 1) > limit):
            raise ValueError(f"attention_sinks + sink_window + 1 (and the prompt, for learned positions) must fit "
                             f"the model's context of {limit}")
        cache = model.new_cache(batch, sinks=params.attention_sinks, window=window)
    else:
        check_length(model, width + params.max_new_tokens)
        cache = model.new_cache(batch, width + params.max_new_tokens, rolling=True)
    seen = None
    if params.repetition_penalty != 1.0:
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.long, device=device)
        seen = seen.scatter_add(1, ids, real.long()) > 0
    logits = model(ids, mask, cache=cache, last_only=True)[:, -1]

    def step(feed: torch.Tensor) -> torch.Tensor:
        nonlocal mask
        if mask is not None:
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        return model(feed[:, None], mask, cache=cache)[:, -1]

    yield from decode_loop(logits, step, params, eos_ids, pad_id, stop_flags, seen, seeds)


def decode_loop(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], params: SamplingParams,
                eos_ids: Sequence[int] = (), pad_id: int = 0, stop_flags: list[bool] | None = None,
                seen: torch.Tensor | None = None,
                seeds: Sequence[int | None] | None = None) -> Iterator[torch.Tensor]:
    """The sampling loop shared by every decoder: from the prompts' last logits (B, V), yield one token per row
    (FINISHED once a row has ended) and feed it back through ``step`` (B,) -> next logits (B, V).

    ``seen`` (B, V bool) marks tokens present so far, for the repetition penalty. With ``seeds`` (one per row)
    each row samples from its own generator, so row r draws exactly what its prompt alone would draw with
    ``seed=seeds[r]`` (k samples of one prompt in one batch, each reproducible on its own).
    """
    device = logits.device
    batch = logits.shape[0]
    generator = make_generator(params.seed, device)
    if seeds is not None and len(seeds) != batch:
        raise ValueError(f"seeds: {len(seeds)} given for {batch} rows")
    generators = None if seeds is None else [make_generator(s, device) for s in seeds]
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for index in range(params.max_new_tokens):
        if generators is None:
            token = next_token(logits, params, seen, generator)
        else:
            token = torch.cat([next_token(logits[r:r + 1], params, None if seen is None else seen[r:r + 1], g)
                               for r, g in enumerate(generators)])
        token = torch.where(finished, FINISHED, token)
        yield token
        finished |= torch.isin(token, eos)
        if stop_flags is not None:
            finished |= torch.tensor(stop_flags, dtype=torch.bool, device=device)
        if bool(finished.all()) or index == params.max_new_tokens - 1:
            return
        feed = torch.where(finished, pad_id, token)
        if seen is not None:
            seen[torch.arange(batch, device=device), feed] = True
        logits = step(feed)


@torch.inference_mode()
def beam_search(model: Transformer, prompt: Sequence[int], num_beams: int, max_new_tokens: int,
                eos_ids: Sequence[int] = (), length_penalty: float = 1.0) -> list[int]:
    """The best beam's generated tokens (ending with EOS when one was produced); see ``beam_loop``."""
    device = model.tok_emb.weight.device
    check_length(model, len(prompt) + max_new_tokens)
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache, last_only=True)[:, -1]
    return beam_loop(logits, lambda feed: model(feed[:, None], cache=cache)[:, -1], cache.reorder, num_beams,
                     max_new_tokens, eos_ids, length_penalty)


def beam_loop(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor],
              reorder: Callable[[torch.Tensor], None], num_beams: int, max_new_tokens: int,
              eos_ids: Sequence[int] = (), length_penalty: float = 1.0) -> list[int]:
    """Beam search shared by every model: from one prompt's last logits (1, V), ``step`` feeds each beam's
    newest token (num_beams,) and returns the next logits (num_beams, V); ``reorder(index)`` makes the model's
    cache follow the beams (its single row is first copied to every beam).

    Follows the usual beam search of Hugging Face transformers (``early_stopping=False``): keep the
    ``num_beams`` best running beams; of the best ``num_beams`` candidates at a step, those ending in
    EOS (or at the length limit) become finished hypotheses scored sum(log p) / length ** length_penalty;
    stop when no running beam can beat the worst of ``num_beams`` finished ones.
    """
    device = logits.device
    reorder(torch.zeros(num_beams, dtype=torch.long, device=device))
    logits = logits.expand(num_beams, -1)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    n_candidates = max(2, 1 + len(eos_ids)) * num_beams
    # Only the first beam is live at the start, so the beams do not all pick the same tokens.
    running_scores = torch.full((num_beams,), -1e9, device=device)
    running_scores[0] = 0.0
    running = torch.empty(num_beams, 0, dtype=torch.long, device=device)
    finished: list[tuple[float, list[int]]] = []
    for index in range(max_new_tokens):
        vocab = logits.shape[-1]
        scores = (torch.log_softmax(logits.float(), -1) + running_scores[:, None]).flatten()
        top_scores, top_index = scores.topk(n_candidates)
        beam, token = top_index // vocab, top_index % vocab
        length = index + 1
        ends = torch.isin(token, eos) | (length == max_new_tokens)
        for j in range(num_beams):
            if ends[j]:
                finished.append((top_scores[j].item() / length**length_penalty,
                                 running[beam[j]].tolist() + [token[j].item()]))
        finished = sorted(finished, key=lambda hyp: -hyp[0])[:num_beams]
        if bool(ends.all()):
            break
        live_scores = top_scores - 1e9 * ends.float()
        keep = live_scores.topk(num_beams).indices
        running_scores = live_scores[keep]
        running = torch.cat([running[beam[keep]], token[keep, None]], dim=1)
        reorder(beam[keep])
        if len(finished) == num_beams:
            best_possible = running_scores[0].item() / length**length_penalty
            if best_possible <= min(score for score, _ in finished):
                break
        logits = step(running[:, -1])
    return finished[0][1]
