"""Process groups and model wrapping for runs launched by ``torchrun`` (DDP or FSDP2)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``world_size`` 1 means a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: (replica, replicas) among the data-parallel replicas when tensor- or pipeline-parallel ranks share their
    #: batches (see omnilm.train.parallel); None = every process is a replica of its own.
    data: tuple[int, int] | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def data_rank(self) -> int:
        """Which share of each global batch this process reads."""
        return self.data[0] if self.data else self.rank

    @property
    def data_size(self) -> int:
        """Into how many shares each global batch is split."""
        return self.data[1] if self.data else self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Dist(rank, world_size, local_rank)


def wrap_model(model: nn.Module, strategy: str, info: Dist, device: torch.device) -> nn.Module:
    """DDP or FSDP2 (``fully_shard`` per block, then the root) around ``model``; unchanged when single-process."""
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def all_reduce_mean(values: torch.Tensor, info: Dist) -> torch.Tensor:
    """Mean over processes (a no-op for a single process)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def all_reduce_sum(values: torch.Tensor, info: Dist) -> torch.Tensor:
    """Sum over processes (a no-op for a single process)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if this process joined one (before exit: a group left to the interpreter's
    teardown can abort the process while its communication threads are destroyed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
