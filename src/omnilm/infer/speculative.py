"""Speculative decoding: a small draft model (or the target's own multi-token heads, ``omnilm.infer.mtp_draft``)
proposes tokens, the target model verifies them in one pass.

Each round the draft proposes up to ``k`` tokens one by one; the target scores all of them in a single
forward pass. Proposal x_i, drawn from the draft's distribution q_i, is accepted with probability
min(1, p_i(x_i) / q_i(x_i)) where p_i is the target's; at the first rejection the token is resampled from
the normalised residual max(0, p_i - q_i), and when all are accepted one more token comes from p_{k+1}.
The tokens then follow the target's distribution exactly (Leviathan et al. 2023; Chen et al. 2023).
Both distributions are the *processed* ones (temperature, top-k, top-p, min-p), so the output follows
what plain sampling with the same settings would draw. Greedy decoding (temperature 0) accepts while the
draft's argmax equals the target's, and so returns exactly the target's greedy tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from omnilm.infer.generate import check_length, make_generator
from omnilm.infer.sampling import SamplingParams, probabilities
from omnilm.model.attention import KVCache
from omnilm.model.transformer import Transformer


@dataclass
class SpeculativeStats:
    """Counters of one speculative generation."""

    #: Draft tokens offered to the target.
    proposed: int = 0
    #: Draft tokens the target kept.
    accepted: int = 0
    #: Target forward passes, the prompt's prefill included.
    target_forward_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"proposed": self.proposed, "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "target_forward_passes": self.target_forward_passes}


def check_compatible(target: Transformer, draft: Transformer, params: SamplingParams) -> None:
    """Refuse a draft/target pair or settings that speculative decoding cannot serve."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size})")
    if params.num_beams > 1:
        raise ValueError("speculative decoding samples; it does not do beam search")
    if params.repetition_penalty != 1.0:
        raise ValueError("speculative decoding does not support repetition_penalty")


def verify(target_probs: torch.Tensor, draft_probs: torch.Tensor, proposals: Sequence[int],
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """The acceptance rule: (how many proposals are kept, the token that follows them).

    ``target_probs`` (n + 1, V) are the target's distributions at each proposal and after the last one;
    ``draft_probs`` (n, V) the draft's, from which ``proposals`` (n tokens) were drawn.
    """
    for i, token in enumerate(proposals):
        p, q = target_probs[i, token], draft_probs[i, token]
        # u < p/q, written without the division; q > 0 because the draft drew this token.
        if torch.rand((), generator=generator, device=p.device) * q < p:
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)
        # A rejection leaves residual mass except for rounding; then p itself is the exact fallback.
        weights = residual if float(residual.sum()) > 0 else target_probs[i]
        return i, int(torch.multinomial(weights, 1, generator=generator))
    bonus = int(torch.multinomial(target_probs[len(proposals)], 1, generator=generator))
    return len(proposals), bonus


def verify_greedy(target_logits: torch.Tensor, proposals: Sequence[int]) -> tuple[int, int]:
    """Greedy acceptance: keep proposals while they are the target's argmax, then take the target's token."""
    best = target_logits.argmax(-1).tolist()
    for i, token in enumerate(proposals):
        if token != best[i]:
            return i, best[i]
    return len(proposals), best[len(proposals)]


def _feed(model: Transformer, cache: KVCache, tokens: list[int]) -> torch.Tensor:
    """Run the tokens not yet in ``cache`` (all of ``tokens`` past cache.length); logits (n, V) of those."""
    return _feed_hidden(model, cache, tokens)[0]


def _feed_hidden(model: Transformer, cache: KVCache, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``_feed``, also returning the final hidden states (n, D) of the tokens run."""
    device = model.tok_emb.weight.device
    new = torch.tensor([tokens[cache.length:]], dtype=torch.long, device=device)
    hidden = model.hidden_states(new, cache=cache)[0]
    return model.lm_head(hidden).float(), hidden


class Drafter(Protocol):
    """Where proposals come from: a small draft model (``ModelDrafter``) or the target's own extra heads.

    ``sync`` is called once the target has scored a chunk: with every committed token so far and the target's
    final hidden state at the position before the last committed one (the state that predicted it; None
    before any target pass). ``propose`` then offers up to ``n`` tokens following ``tokens`` and, when
    sampling, the distributions (m, V) they were drawn from (None when greedy); it may offer fewer.
    """

    def propose(self, tokens: list[int], n: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]: ...

    def sync(self, tokens: list[int], hidden: torch.Tensor | None) -> None: ...


class ModelDrafter:
    """A separate draft model with its own KV cache (rejected proposals are dropped from it on ``sync``)."""

    def __init__(self, draft: Transformer, max_len: int) -> None:
        self.draft = draft
        self.cache = draft.new_cache(1, max_len)

    def propose(self, tokens: list[int], n: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        return _propose(self.draft, self.cache, tokens, n, params, generator)

    def sync(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        # The next proposal feeds whatever the cache lacks of ``tokens`` (the prompt, in one pass, at first).
        self.cache.truncate(min(self.cache.length, len(tokens) - 1))


def _propose(draft: Transformer, cache: KVCache, tokens: list[int], n: int, params: SamplingParams,
             generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
    """``n`` draft tokens following ``tokens`` and, when sampling, their distributions (n, V)."""
    proposals: list[int] = []
    dists = []
    for _ in range(n):
        logits = _feed(draft, cache, tokens + proposals)[-1]
        if params.greedy:
            proposals.append(int(logits.argmax()))
            continue
        q = probabilities(logits, params)
        dists.append(q)
        proposals.append(int(torch.multinomial(q, 1, generator=generator)))
    return proposals, (torch.stack(dists) if dists else None)


@torch.inference_mode()
def speculative_tokens(target: Transformer, draft: Transformer | Drafter, prompt_ids: Sequence[int],
                       params: SamplingParams, k: int = 4, eos_ids: Sequence[int] = (),
                       generator: torch.Generator | None = None,
                       stats: SpeculativeStats | None = None) -> Iterator[list[int]]:
    """Yield the new tokens of each round (1 to k + 1 of them), ending after an ``eos_ids`` token (yielded)
    or at ``params.max_new_tokens``. ``draft`` is a draft model or any ``Drafter`` (e.g. the target's
    multi-token heads). ``stats``, when given, is updated as the rounds go."""
    if k < 1:
        raise ValueError("k must be ≥ 1")
    if not prompt_ids:
        raise ValueError("the prompt needs at least one token")
    stats = stats if stats is not None else SpeculativeStats()
    limit = len(prompt_ids) + params.max_new_tokens
    check_length(target, limit)
    if isinstance(draft, Transformer):
        check_compatible(target, draft, params)
        check_length(draft, limit)
        # Room for the proposals of a round on top of the committed tokens.
        draft = ModelDrafter(draft, limit + k)
    else:
        check_compatible(target, target, params)
    target_cache = target.new_cache(1, limit + k)
    if generator is None:
        generator = make_generator(params.seed, target.tok_emb.weight.device)
    tokens = list(prompt_ids)
    # Invariant between rounds: the caches hold at most tokens[:-1]; each round feeds what they lack.
    hidden = None
    if len(tokens) > 1:
        hidden = _feed_hidden(target, target_cache, tokens[:-1])[1][-1]
        stats.target_forward_passes += 1
    draft.sync(tokens, hidden)
    eos = set(eos_ids)
    while len(tokens) < limit:
        # At most the tokens still allowed: all n accepted plus the target's bonus token.
        proposals, draft_probs = draft.propose(tokens, min(k, limit - len(tokens) - 1), params, generator)
        n = len(proposals)
        target_logits, target_hidden = _feed_hidden(target, target_cache, tokens + proposals)
        target_logits, target_hidden = target_logits[-(n + 1):], target_hidden[-(n + 1):]
        stats.target_forward_passes += 1
        if params.greedy:
            kept, following = verify_greedy(target_logits, proposals)
        else:
            target_probs = probabilities(target_logits, params)
            if draft_probs is None:
                draft_probs = target_probs[:0]
            kept, following = verify(target_probs, draft_probs, proposals, generator)
        stats.proposed += n
        stats.accepted += kept
        new = proposals[:kept] + [following]
        ends = [i for i, token in enumerate(new) if token in eos]
        if ends:
            new = new[:ends[0] + 1]
        tokens += new
        yield new
        if ends:
            return
        # Rejected proposals leave the caches; the last token is fed next round.
        target_cache.truncate(min(target_cache.length, len(tokens) - 1))
        draft.sync(tokens, target_hidden[kept])


def speculative_generate(target: Transformer, draft: Transformer | Drafter, prompt_ids: list[int],
                         params: SamplingParams,
                         k: int = 4, eos_ids: Sequence[int] = (),
                         generator: torch.Generator | None = None) -> tuple[list[int], dict[str, float]]:
    """Continue one prompt with ``target``, drafting with ``draft``: (new tokens, stats).

    The stats are ``proposed``, ``accepted``, ``acceptance_rate`` (accepted / proposed) and
    ``target_forward_passes`` (prefill included). At most ``params.max_new_tokens`` tokens are returned,
    ending with an end-of-sequence token when one was produced. Without ``generator`` the random draws
    use ``params.seed`` (or torch's global generator).
    """
    stats = SpeculativeStats()
    new: list[int] = []
    for chunk in speculative_tokens(target, draft, prompt_ids, params, k, eos_ids, generator, stats):
        new += chunk
    return new, stats.as_dict()
