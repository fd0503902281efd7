"""Text embeddings from a language model: the mean of its final hidden states over a text's tokens.

Used for dense retrieval (similar questions, passages): the vectors are L2-normalised, so a dot product is the
cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from omnilm.infer.generate import left_pad
from omnilm.model.transformer import Transformer
from omnilm.tokenizer import Tokenizer


@torch.inference_mode()
def embed_ids(model: Transformer, ids: Sequence[Sequence[int]], batch_size: int = 32,
              pad_id: int = 0) -> np.ndarray:
    """Embeddings (N, d_model) float32 of token sequences: mean-pooled final hidden states, L2-normalised.

    Sequences are batched by length (left padding; positions count real tokens only, so padding changes
    nothing) and longer ones are cut to the model's context.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be ≥ 1")
    limit = model.config.max_seq_len
    seqs = [list(s)[:limit] for s in ids]
    if any(not s for s in seqs):
        raise ValueError("cannot embed an empty text (it has no tokens)")
    out = np.zeros((len(seqs), model.config.d_model), dtype=np.float32)
    device = model.tok_emb.weight.device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch: less padding
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch, mask = left_pad([seqs[i] for i in rows], pad_id, device)
        hidden = model.hidden_states(batch, mask).float()
        real = (mask if mask is not None else torch.ones_like(batch)).bool()[..., None]
        # where(), not a product: a padding row's hidden state is masked out even if it were not finite
        summed = torch.where(real, hidden, torch.zeros_like(hidden)).sum(dim=1)
        mean = summed / real.sum(dim=1).clamp(min=1)
        out[rows] = torch.nn.functional.normalize(mean, dim=-1).cpu().numpy()
    return out


def embed_texts(model: Transformer, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Embeddings (N, d_model) float32 of ``texts`` (encoded as plain text: no special tokens); see ``embed_ids``."""
    ids = [tokenizer.encode(t, special=False) for t in texts]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    return embed_ids(model, ids, batch_size=batch_size, pad_id=pad)
