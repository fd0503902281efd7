"""Hyperparameters of one training run (one stage). Every default is documented here, once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from omnilm.config import ConfigError

#: Settings that change how a run is watched, logged or checkpointed, not what it trains: they may differ when a
#: run is resumed, and changing them leaves a finished recipe stage current.
OPERATIONAL_FIELDS = frozenset({"log_every", "eval_every", "eval_batches", "sample_every", "sample_prompt",
                                "sample_tokens", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
                                "peak_flops", "progress", "loss_chunk_tokens", "activation_checkpointing"})


@dataclass
class TrainConfig:
    """How long, how fast and how carefully to train. Loadable from YAML (``train:`` of a stage)."""

    #: Budget in optimizer steps. Exactly one of ``max_steps`` / ``max_tokens`` must be set.
    max_steps: int | None = None
    #: Budget in training tokens (converted to steps with ``tokens_per_step``).
    max_tokens: int | None = None
    #: Sequences per micro-batch, per process.
    batch_size: int = 16
    #: Tokens per sequence.
    seq_len: int = 256
    #: Global tokens per optimizer step; gradients are accumulated over micro-batches to reach it
    #: (None = one micro-batch per process, i.e. batch_size · seq_len · world_size).
    tokens_per_step: int | None = None

    #: Peak learning rate.
    lr: float = 3e-3
    #: Final learning rate as a fraction of ``lr`` (cosine/linear/wsd decay end there).
    min_lr_ratio: float = 0.1
    #: Shape after warmup: cosine decay, linear decay, warmup-stable-decay, or constant.
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    #: Linear warmup steps from 0 to ``lr``.
    warmup_steps: int = 0
    #: Horizon of the decay in steps (None = the budget). A longer horizon lets runs of different lengths
    #: share one schedule, each stopping part way along it.
    schedule_steps: int | None = None
    #: WSD only: the final fraction of steps spent decaying (linearly) to ``min_lr_ratio · lr``.
    decay_fraction: float = 0.2
    #: AdamW decoupled weight decay, applied to weight matrices only (not norms, biases, embeddings).
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    #: Clip the global gradient norm to this (0 = no clipping).
    grad_clip: float = 1.0
    #: Learning-rate multiplier per module (a parameter-name prefix such as ``decoder`` or ``audio_tower``; the
    #: longest matching prefix applies, the rest use 1).
    lr_scale: dict[str, float] = field(default_factory=dict)
    #: Modules left untrained until a step: ``{prefix: step}``; a negative step freezes the module for the whole
    #: run (its gradients are not even computed). Before the step the module's learning rate is 0.
    frozen_until: dict[str, int] = field(default_factory=dict)

    #: "auto" = CUDA when available, else CPU.
    device: str = "auto"
    #: "auto" = bf16 autocast on a CUDA device that supports it, fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: Wrap the model with torch.compile.
    compile: bool = False
    #: Tokens per chunk of the decoder's loss (head matmul, log-softmax, NLL and their gradients, one chunk at a
    #: time), so the fp32 (tokens × vocab) logits never exist whole: peak memory O(chunk × vocab), same loss.
    #: 0 = off (all logits at once). Worth it for large vocabularies; applies to the pretrain and sft losses.
    loss_chunk_tokens: int = 0
    #: Recompute each decoder block's activations in backward instead of keeping them (torch.utils.checkpoint,
    #: non-reentrant): activation memory of one block instead of all, at the cost of a second forward pass.
    activation_checkpointing: bool = False
    #: Strategy when launched by torchrun with several processes.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    #: Ranks that split each layer's heads and MLP width (torch tensor parallel; see omnilm.train.parallel).
    #: Processes = tensor_parallel · pipeline_parallel · data-parallel replicas (FSDP2 when more than one).
    tensor_parallel: int = 1
    #: With tensor parallelism, also split the norms and residual stream along the sequence.
    sequence_parallel: bool = False
    #: Pipeline stages, each holding a contiguous run of blocks (torch.distributed.pipelining).
    pipeline_parallel: int = 1
    #: Order of the pipeline's micro-batches: all forwards then all backwards, or one forward one backward.
    pipeline_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    #: Pipeline micro-batches each batch is cut into (divides batch_size; None = pipeline_parallel).
    microbatches: int | None = None
    #: Seeds model init (when not loaded), dropout and the data order.
    seed: int = 0

    #: Console/metrics.jsonl logging interval in steps.
    log_every: int = 10
    #: Validation interval in steps (0 = only at the end).
    eval_every: int = 0
    #: Validation micro-batches per evaluation.
    eval_batches: int = 8
    #: Greedy sample from ``sample_prompt`` every this many steps (0 = never).
    sample_every: int = 0
    sample_prompt: str = ""
    sample_tokens: int = 32
    #: Checkpoint interval in steps (0 = only at the end). Interrupts always checkpoint.
    checkpoint_every: int = 0
    #: How many step checkpoints to keep (older ones are deleted).
    keep_checkpoints: int = 2
    #: Consecutive non-finite steps (skipped) after which the run stops.
    max_bad_steps: int = 5
    #: Peak device FLOP/s for the MFU estimate (None = known GPUs only; no MFU on CPU).
    peak_flops: float | None = None
    #: Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ConfigError("set exactly one of train.max_steps and train.max_tokens")
        for name in ("batch_size", "seq_len", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive")
        if self.loss_chunk_tokens < 0:
            raise ConfigError("train.loss_chunk_tokens must be 0 (off) or positive")
        if self.schedule not in ("cosine", "linear", "wsd", "constant"):
            raise ConfigError(f"train.schedule: unknown schedule {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio must lie in [0, 1]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision: unknown precision {self.precision!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"train.distributed: unknown strategy {self.distributed!r}")
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1 or (self.microbatches or 1) < 1:
            raise ConfigError("train.tensor_parallel, pipeline_parallel and microbatches must be ≥ 1")
        if self.pipeline_schedule not in ("gpipe", "1f1b"):
            raise ConfigError(f"train.pipeline_schedule: unknown schedule {self.pipeline_schedule!r}; "
                              "expected gpipe or 1f1b")

    @property
    def pipeline_microbatches(self) -> int:
        """Micro-batches per pipelined batch (``microbatches`` resolved)."""
        return self.microbatches or self.pipeline_parallel

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process."""
        per_micro = self.batch_size * self.seq_len * world_size
        if self.tokens_per_step is None:
            return 1
        if self.tokens_per_step % per_micro:
            raise ConfigError(f"train.tokens_per_step={self.tokens_per_step} is not a multiple of "
                              f"batch_size·seq_len·world_size = {per_micro}")
        return self.tokens_per_step // per_micro

    def total_steps(self, world_size: int) -> int:
        """The budget in optimizer steps."""
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.batch_size * self.seq_len * world_size * self.accumulation(world_size)
        return max(1, -(-int(self.max_tokens) // per_step))
