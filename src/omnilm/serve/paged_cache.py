"""The KV memory of the serving engine, in blocks, and the per-forward view the model's attention writes through.

Storage: keys and values of every layer, shaped (layers, num_blocks · block_size, kv_heads, head_dim), so
position ``p`` of a request with block table ``table`` lives at row ``table[p // size] · size + p % size``.
Which block belongs to whom is decided by :mod:`omnilm.serve.blocks`; this module only moves tensors.

A forward pass over a batch of requests (one row each, ``T`` new tokens per row, right-padded) gets a
:class:`PagedBatch`: every attention layer hands it the new keys/values (B, kv_heads, T, head_dim); it writes the
real tokens' entries into their rows, then gathers each request's blocks into contiguous keys/values
(B, kv_heads, blocks · size, head_dim) for ``scaled_dot_product_attention``. The engine passes explicit positions
and a (B, 1, T, blocks · size) mask that lets each query see only its own request's positions up to itself, so
the padding blocks (the null block, or a request's blocks not written yet) are never attended to.
"""

from __future__ import annotations

import torch

from omnilm.model.config import ModelConfig


class PagedKVCache:
    """Keys and values of ``num_blocks`` blocks of ``block_size`` positions, for every layer."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (config.n_layer, num_blocks * block_size, config.kv_heads, config.dim_per_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * block_size * config.kv_heads * config.dim_per_head * element

    def clear(self, blocks: list[int]) -> None:
        """Zero ``blocks``: a block handed to a new request may hold anything its last owner wrote (a NaN would
        survive the attention mask, since 0 · NaN is NaN)."""
        if not blocks:
            return
        index = torch.tensor(blocks, device=self.k.device)
        for store in (self.k, self.v):
            store.view(store.shape[0], -1, self.block_size, *store.shape[2:])[:, index] = 0


class PagedBatch:
    """What one forward pass writes and reads: the cache seen through the block tables of its rows.

    ``tables`` (B, n_blocks) holds each row's block ids padded with the null block; ``write_rows`` and
    ``write_cols`` pick the real (row, query) pairs of the padded batch and ``write_slots`` the cache rows their
    keys/values go to. Rows keep their own lengths, so the shared ``length`` of a contiguous cache does not apply:
    it is 0 and the engine passes positions and a 4-D mask to the model.
    """

    length = 0

    def __init__(self, cache: PagedKVCache, tables: torch.Tensor, write_rows: torch.Tensor,
                 write_cols: torch.Tensor, write_slots: torch.Tensor) -> None:
        self.cache, self.tables = cache, tables
        self.write_rows, self.write_cols, self.write_slots = write_rows, write_cols, write_slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, H, T, D) of ``layer``; return each row's keys/values (B, H, n·size, D)."""
        size = self.cache.block_size
        batch, n_blocks = self.tables.shape
        heads, dim = k.shape[1], k.shape[3]
        every_query_real = len(self.write_slots) == k.shape[0] * k.shape[2]
        out = []
        for store, new in ((self.cache.k[layer], k), (self.cache.v[layer], v)):
            new = new.transpose(1, 2)  # (B, T, H, D)
            # index_select over whole blocks: several times faster than advanced indexing on CPU
            real = new.reshape(-1, heads, dim) if every_query_real else new[self.write_rows, self.write_cols]
            store.index_copy_(0, self.write_slots, real.to(store.dtype))  # (N, H, D) rows of the cache
            blocks = store.view(-1, size, heads, dim).index_select(0, self.tables.flatten())  # (B·n, size, H, D)
            out.append(blocks.view(batch, n_blocks * size, heads, dim).transpose(1, 2))
        return out[0], out[1]

    def advance(self, n: int) -> None:
        """Nothing to do: the engine keeps each request's length."""
