"""Self-speculative decoding: the model's own multi-token-prediction heads draft, the model verifies.

After the target has scored a chunk, its final hidden state h at the position that predicted the last committed
token x is known; head k applied to h guesses the token k places after x (head 1: the one right after x). Those
guesses are the proposals of the next round, verified by the usual speculative-decoding rule
(``omnilm.infer.speculative``), so greedy output is the model's own greedy output and sampled output follows the
model's distribution. A sequential head also reads the embedding of the token before its guess: x for head 1,
then the previous head's proposal. No second model and no second KV cache are needed: the heads are
position-wise.
"""

from __future__ import annotations

import torch

from omnilm.infer.sampling import SamplingParams, probabilities
from omnilm.model.mtp import MTPHeads
from omnilm.model.transformer import Transformer


class MTPDrafter:
    """Proposals from ``heads`` (trained on ``target``'s trunk); a ``Drafter`` for ``speculative_tokens``."""

    def __init__(self, target: Transformer, heads: MTPHeads) -> None:
        self.target = target
        self.heads = heads
        self.hidden: torch.Tensor | None = None

    def sync(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        self.hidden = hidden

    def propose(self, tokens: list[int], n: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``n`` proposals (as many as there are heads), and their distributions when sampling."""
        if self.hidden is None or n < 1:
            return [], None
        device = self.hidden.device
        proposals: list[int] = []
        dists = []
        z = self.hidden[None]  # (1, D)
        previous = tokens[-1]
        for head in self.heads.heads[:n]:
            embedding = None
            if self.heads.sequential:
                embedding = self.target.tok_emb(torch.tensor([previous], device=device))
            z = head(z, embedding)
            logits = self.target.lm_head(head.norm_out(z))[0].float()
            if params.greedy:
                previous = int(logits.argmax())
            else:
                q = probabilities(logits, params)
                dists.append(q)
                previous = int(torch.multinomial(q, 1, generator=generator))
            proposals.append(previous)
        return proposals, (torch.stack(dists) if dists else None)
