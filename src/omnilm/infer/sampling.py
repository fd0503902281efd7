"""Choosing the next token: temperature, top-k, top-p (nucleus), min-p and repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. The defaults sample from the model's own distribution."""

    #: Most tokens to generate (the end-of-sequence token counts).
    max_new_tokens: int = 128
    #: Softmax temperature; 0 means greedy (argmax).
    temperature: float = 1.0
    #: Keep only the k most likely tokens (0 = off).
    top_k: int = 0
    #: Keep the smallest set of most likely tokens whose probability mass is ≥ top_p (1 = off; 0 keeps only the
    #: most likely token, the most restrictive setting).
    top_p: float = 1.0
    #: Drop tokens less likely than min_p × the most likely token's probability (0 = off).
    min_p: float = 0.0
    #: Divide positive / multiply negative logits of tokens already present (1 = off; CTRL/HF convention).
    repetition_penalty: float = 1.0
    #: Beam search width (1 = no beam search; beam search is deterministic and ignores the sampling knobs).
    num_beams: int = 1
    #: Beam scores are divided by generated_length ** length_penalty.
    length_penalty: float = 1.0
    #: Text stop strings: generation ends before the first one, which is not returned.
    stop: tuple[str, ...] = ()
    #: Seed of the sampling random generator (None = torch's global generator).
    seed: int | None = None
    #: Streaming with attention sinks (StreamingLLM): keep only the first attention_sinks tokens plus the
    #: sink_window most recent ones in the KV cache, so memory stays constant however long the output
    #: (0 = the usual full cache). Unpadded prompts only (one prompt, or prompts of equal length).
    attention_sinks: int = 0
    #: Recent tokens kept with attention_sinks (0 = the rest of the model's max_seq_len).
    sink_window: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1"),
            (self.temperature >= 0, "temperature must be ≥ 0"),
            (self.top_k >= 0, "top_k must be ≥ 0"),
            (0 <= self.top_p <= 1, "top_p must be in [0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.num_beams >= 1, "num_beams must be ≥ 1"),
            (self.attention_sinks >= 0 and self.sink_window >= 0, "attention_sinks and sink_window must be ≥ 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens marked in ``seen`` (B, V bool): positive logits / penalty, negative × penalty."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set the logits of tokens removed by top-k, top-p and min-p (applied in that order) to -inf."""
    neg_inf = torch.finfo(logits.dtype).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # A token goes once the more likely tokens already hold mass ≥ top_p; the first always stays.
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, neg_inf)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, neg_inf)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (…, V) that sampling draws from: temperature, then top-k / top-p / min-p filtering.

    Repetition penalty is not applied here (it depends on the tokens seen so far). Needs temperature > 0.
    """
    if params.greedy:
        raise ValueError("greedy decoding (temperature 0) has no sampling distribution")
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p, params.min_p)
    return logits.softmax(-1)


def next_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V) -> (B,)."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)
