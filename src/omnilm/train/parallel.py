"""Tensor and pipeline parallelism with PyTorch's own tools, combinable with FSDP2 on one device mesh.

Processes form a (pipeline, data, tensor) mesh of ``pipeline_parallel × dp × tensor_parallel`` ranks, tensor
parallel innermost (neighbouring ranks: one node, where its per-layer all-reduces are cheapest), pipeline stages
outermost. Ranks of one tensor-parallel group or one pipeline see the same batches; only the ``dp`` replicas read
different data, and they shard parameters with ``fully_shard`` (FSDP2) over the mesh's data dimension.

- Tensor parallelism (``torch.distributed.tensor.parallel``): q/k/v and MLP gate/up projections column-parallel,
  o and down projections row-parallel (one all-reduce after attention and one after the MLP, Megatron's layout);
  each rank computes ``n_head / tp`` heads. With ``sequence_parallel`` the norms and residual stream between
  them are split along the sequence (all-gather before attention and MLP, reduce-scatter after). Embeddings and
  the head stay replicated, so the loss is the ordinary one on full logits.
- Pipeline parallelism (``torch.distributed.pipelining``): each stage holds a contiguous run of blocks (the first
  also the embeddings, the last the final norm and head) and a GPipe or 1F1B schedule runs the micro-batches
  through the stages; a tied embedding is held by the first and last stage and its gradients summed between them.

Checkpoints are gathered into the ordinary single-process model folder (see ``omnilm.train.checkpoint``), so
they load anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnilm.config import ConfigError
from omnilm.model.attention import layer_masks, rope_cos_sin
from omnilm.train.config import TrainConfig
from omnilm.train.distributed import Dist, wrap_model


def is_parallel(config: TrainConfig) -> bool:
    """Whether the run splits its model over ranks by tensor or pipeline parallelism."""
    return config.tensor_parallel > 1 or config.pipeline_parallel > 1


def check_layout(train: TrainConfig, model_config: Any, world_size: int) -> int:
    """The data-parallel degree of ``world_size`` processes under ``train``'s tensor/pipeline degrees; a
    ``ConfigError`` naming the conflict when the model or the process count cannot be split that way."""
    tp, pp = train.tensor_parallel, train.pipeline_parallel
    if world_size % (tp * pp):
        raise ConfigError(f"{world_size} processes cannot form a mesh of train.tensor_parallel={tp} × "
                          f"train.pipeline_parallel={pp}: launch a multiple of {tp * pp} processes")
    dp = world_size // (tp * pp)
    if dp > 1 and train.distributed != "fsdp":
        raise ConfigError(f"{world_size} processes with tensor_parallel={tp} × pipeline_parallel={pp} leave "
                          f"{dp} data-parallel replicas: set train.distributed: fsdp (the data dimension of the "
                          "mesh is sharded with FSDP2)")
    if model_config is None:
        raise ConfigError("tensor and pipeline parallelism split omnilm's decoder only")
    if tp > 1:
        sizes = {"n_head": model_config.n_head, "n_kv_head": model_config.kv_heads, "d_ff": model_config.ff_dim}
        for name, size in sizes.items():
            if size % tp:
                raise ConfigError(f"model {name}={size} is not divisible by train.tensor_parallel={tp}")
        if model_config.n_experts:
            raise ConfigError("train.tensor_parallel does not split mixture-of-experts layers yet")
        if model_config.alibi:
            raise ConfigError("train.tensor_parallel does not support ALiBi models (its biases span all heads)")
    if pp > 1:
        if model_config.n_layer < pp:
            raise ConfigError(f"model n_layer={model_config.n_layer} is fewer than train.pipeline_parallel={pp} "
                              "stages")
        micro = train.pipeline_microbatches
        if train.batch_size % micro:
            raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by train.microbatches={micro}")
        if train.pipeline_schedule == "1f1b" and micro < pp:
            raise ConfigError(f"the 1f1b schedule needs train.microbatches ≥ pipeline_parallel={pp}, got {micro}")
    return dp


def parallelize(model: nn.Module, train: TrainConfig, info: Dist, device: torch.device) -> tuple[nn.Module, Dist]:
    """``model`` split over the processes as ``train`` asks, and where this process stands among the data
    replicas. Without tensor or pipeline parallelism: DDP or FSDP2 as before (``wrap_model``)."""
    if not is_parallel(train):
        return wrap_model(model, train.distributed, info, device), info
    from torch.distributed.device_mesh import init_device_mesh

    dp = check_layout(train, getattr(model, "config", None), info.world_size)
    if not isinstance(model, _decoder_class()):
        raise ConfigError("tensor and pipeline parallelism split omnilm's decoder only (no heads around it)")
    tp, pp = train.tensor_parallel, train.pipeline_parallel
    mesh = init_device_mesh(device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    info = dataclasses.replace(info, data=(mesh["dp"].get_local_rank(), dp))
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"], train.sequence_parallel)
    if pp > 1:
        model = PipelineStageModel(model, mesh["pp"], train, device)
    if dp > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks.values() if pp > 1 else model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        if pp > 1:  # FSDP2 shards dim 0 in torch.chunk's pieces
            pieces = torch.arange(model.config.vocab_size).chunk(dp)
            replica = mesh["dp"].get_local_rank()
            model.tied_rows = len(pieces[replica]) if replica < len(pieces) else 0
    return model, info


def _decoder_class() -> type:
    from omnilm.model.transformer import Transformer

    return Transformer


# ---------------------------------------------------------------------------------------------- tensor parallel


def apply_tensor_parallel(model: nn.Module, mesh: Any, sequence_parallel: bool) -> None:
    """Split every block's attention heads and MLP width over the ranks of ``mesh`` (in place)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = mesh.size()
    # Row-parallel outputs: all-reduced to full activations, or reduce-scattered along the sequence.
    out = dict(output_layouts=Shard(1), use_local_output=False) if sequence_parallel else {}
    for block in model.blocks:
        plan: dict[str, Any] = {
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(**out), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(**out)}
        if block.mlp.gate_proj is not None:
            plan["mlp.gate_proj"] = ColwiseParallel()
        if sequence_parallel:
            # Norms see a slice of the sequence; attention and the MLP all-gather it (rope, mask: full length).
            gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan |= {"norm1": SequenceParallel(), "norm2": SequenceParallel(), "mlp": gather,
                     "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                desired_input_layouts=(Replicate(), None, None, None))}
        parallelize_module(block, mesh, plan)
        # Each rank now computes its own heads: the attention reshapes by the local head counts.
        block.attn.n_head //= tp
        block.attn.n_kv_head //= tp
    if sequence_parallel:
        # The stream enters the first block whole (cut along the sequence there: no communication) and leaves
        # the final norm whole again, so embeddings, the head and the loss stay ordinary tensors.
        parallelize_module(model.blocks[0], mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None, None, None), desired_input_layouts=(Shard(1), None, None, None)))
        parallelize_module(model.norm_f, mesh, SequenceParallel())
        parallelize_module(model.norm_f, mesh, PrepareModuleOutput(
            output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),), use_local_output=True))


# ---------------------------------------------------------------------------------------------- pipeline parallel


def split_layers(n_layer: int, stages: int) -> list[range]:
    """Contiguous runs of blocks, one per stage, as even as possible (earlier stages take the extra blocks)."""
    base, extra = divmod(n_layer, stages)
    bounds = [0]
    for stage in range(stages):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


class PipelineStageModel(nn.Module):
    """The part of a decoder that one pipeline stage runs, under the full model's parameter names (so its state
    dict is a slice of the full one), plus the schedule that runs the pipeline.

    The first stage maps token ids to the stream of the first block, the others take the stream their predecessor
    sent, and the last returns logits.
    """

    def __init__(self, model: nn.Module, mesh: Any, train: TrainConfig, device: torch.device) -> None:
        super().__init__()
        self.config = model.config
        self.group = mesh.get_group()
        self.index, self.stages = mesh.get_local_rank(), mesh.size()
        self.is_first, self.is_last = self.index == 0, self.index == self.stages - 1
        self.layers = split_layers(self.config.n_layer, self.stages)[self.index]
        tied = self.config.tie_embeddings
        # The last stage of a tied model keeps the embedding module too: its weight is the head's, and the
        # optimizer recognises it as an embedding (no weight decay), as in one process.
        self.tok_emb = model.tok_emb if self.is_first or (self.is_last and tied) else None
        self.pos_emb = model.pos_emb if self.is_first else None
        self.emb_norm = model.emb_norm if self.is_first else None
        self.drop = model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in self.layers})
        self.norm_f = model.norm_f if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.tied = tied and self.stages > 1
        self.device, self.scale, self.train_config = device, 1.0, train
        #: Rows of the tied embedding this rank holds (fewer once FSDP2 shards the stage over data replicas).
        self.tied_rows = self.config.vocab_size
        self._schedule: Any = None

    @property
    def schedule(self) -> Any:
        """The pipeline schedule, built on first use: after FSDP2 may have wrapped this module."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if self._schedule is None:
            stage = PipelineStage(self, self.index, self.stages, self.device, group=self.group)
            kind = ScheduleGPipe if self.train_config.pipeline_schedule == "gpipe" else Schedule1F1B
            self._schedule = kind(stage, self.train_config.pipeline_microbatches, loss_fn=self._loss)
        return self._schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, the residual stream (B, T, d) elsewhere; logits on the last."""
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        if self.is_first:  # the input half of Transformer.hidden_states (windows of whole documents: no padding)
            x = self.tok_emb(x)
            if self.pos_emb is not None:
                x = x + self.pos_emb(positions)
            if self.emb_norm is not None:
                x = self.emb_norm(x)
            x = self.drop(x)
        config = self.config
        rope = rope_cos_sin(positions, config.dim_per_head, config.rope_theta, x.dtype, config.mrope_section,
                            config.rope_scaling, config.max_seq_len) if config.uses_rope else None
        masks = layer_masks(config, None, positions, 0, T, None, x.dtype)
        recompute = self.train_config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i in self.layers:
            block = self.blocks[str(i)]
            x = checkpoint(block, x, rope, masks[i], None, use_reentrant=False) if recompute else \
                block(x, rope, masks[i], None)
        if self.is_last:
            x = self.lm_head(self.norm_f(x))
        return x

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return loss * self.scale

    def pipeline_step(self, tokens: torch.Tensor, scale: float) -> torch.Tensor:
        """Forward and backward passes of a (B, T+1) token batch through every stage, the loss (mean over the
        batch's micro-batches, times ``scale``) weighting the gradients; returns that loss on every stage."""
        self.scale = scale
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        before = self._tied_gradient() if self.tied else None
        self.schedule.step(*args, target=targets if self.is_last else None, losses=losses, return_outputs=False)
        if self.tied:
            self._sum_tied_gradients(before)
        loss = torch.stack(losses).mean().detach() if self.is_last else torch.zeros((), device=tokens.device)
        dist.broadcast(loss, group_src=self.stages - 1, group=self.group)
        return loss

    @torch.no_grad()
    def pipeline_logits(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Logits of (B, T) token ids through every stage (forward only): on the last stage, None elsewhere."""
        tokens = tokens.to(self.device)
        args = (tokens,) if self.is_first else ()
        # The schedule scores every micro-batch on the last stage: a placeholder target, its loss unused.
        return self.schedule.eval(*args, target=torch.zeros_like(tokens) if self.is_last else None)

    def evaluate(self, evaluate_fn: Callable[[Any, list[torch.Tensor]], dict[str, float]],
                 batches: list[torch.Tensor]) -> dict[str, float]:
        """``evaluate_fn(model, batches)`` (such as ``omnilm.objectives.lm.evaluate_lm``, which calls
        ``model(tokens[:, :-1])`` once per (B, T+1) batch, in order) through the pipeline: the last stage scores
        the logits, the others run their part of the same forward passes; every stage returns the result."""
        if self.is_last:
            result = [evaluate_fn(_PipelineLogits(self), batches)]
        else:
            for tokens in batches:
                self.pipeline_logits(tokens[:, :-1])
            result = [None]
        dist.broadcast_object_list(result, group_src=self.stages - 1, group=self.group)
        return result[0]

    def _tied_gradient(self) -> torch.Tensor:
        """A copy of this rank's part of the tied embedding's gradient so far (its FSDP2 shard when the stage
        is sharded); zeros on a middle stage, or before any backward."""
        weight = self.tok_emb.weight if self.tok_emb is not None else None
        if weight is None or weight.grad is None:
            return torch.zeros(self.tied_rows, self.config.d_model, device=self.device)
        return _local(weight.grad).detach().clone()

    def _sum_tied_gradients(self, before: torch.Tensor) -> None:
        """Add to the tied embedding's gradient what this step's backward gave its other use (the head on the
        last stage, the lookup on the first): the new parts are summed over the stages, while what earlier
        micro-batches left (already summed) is kept once."""
        new = self._tied_gradient() - before
        dist.all_reduce(new, group=self.group)
        if self.tok_emb is not None:
            _local(self.tok_emb.weight.grad).copy_(before + new)

    # ------------------------------------------------------------------------------------- checkpoints
    def gather_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The full model and optimizer state (unsharded, on the CPU), every stage's slice merged on the first
        rank of the pipeline (collective over all processes; the other ranks get their own slices)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Unsharded on every rank (not only on global rank 0, as with CPU offloading): each stage sends its own.
        options = StateDictOptions(full_state_dict=True)
        model_state = {k: v.detach().cpu() for k, v in get_model_state_dict(self, options=options).items()}
        optim_state = _to_cpu(get_optimizer_state_dict(self, optimizer, options=options))
        slices: list[Any] | None = [None] * self.stages if self.index == 0 else None
        dist.gather_object((model_state, optim_state), slices, group_dst=0, group=self.group)
        if self.index != 0:
            return model_state, optim_state
        merged_model: dict[str, torch.Tensor] = {}
        state: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for model_part, optim_part in slices:
            merged_model |= model_part
            state |= optim_part["state"]
            for group in optim_part["param_groups"]:
                key = repr(sorted((k, v) for k, v in group.items() if k != "params"))
                merged = groups.setdefault(key, dict(group, params=[]))
                merged["params"] += [p for p in group["params"] if p not in merged["params"]]
        return merged_model, {"state": state, "param_groups": list(groups.values())}

    def own_state(self, weights: dict[str, torch.Tensor], optim_state: dict[str, Any],
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The slice of a full model and optimizer state that this stage holds."""
        names = set(self.state_dict())
        groups = [dict(g, params=[p for p in g["params"] if p in names]) for g in optim_state["param_groups"]]
        return ({k: v for k, v in weights.items() if k in names},
                {"state": {k: v for k, v in optim_state["state"].items() if k in names},
                 "param_groups": [g for g in groups if g["params"]]})


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor as it is)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class _PipelineLogits:
    """A stand-in for the whole model on the last stage: called with token ids, it runs the pipeline."""

    def __init__(self, stage: PipelineStageModel) -> None:
        self.stage = stage

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.stage.pipeline_logits(tokens)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.stage.parameters()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- gradients


def clip_grad_norm(model: nn.Module, params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of ``params`` (plain tensors and DTensors on different meshes mixed, as
    tensor parallelism and FSDP2 leave them; summed over pipeline stages) to ``max_norm``; returns the norm."""
    from torch.distributed.tensor import DTensor

    stage = model if isinstance(model, PipelineStageModel) else None
    # A tied embedding lives on the first and the last stage with the same gradient: counted once, on the first.
    shared = stage.tok_emb.weight if stage is not None and stage.tied and not stage.is_first else None
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for param in params:
        by_mesh.setdefault(getattr(param.grad, "device_mesh", None), []).append(param.grad)
    squares = [torch.zeros((), dtype=torch.float32, device=params[0].grad.device)]
    for grads in by_mesh.values():
        grads = [g for g in grads if shared is None or g is not shared.grad]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if norm is not None:
            squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    total = torch.stack(squares).sum()
    if stage is not None:
        dist.all_reduce(total, group=stage.group)
    norm = float(total.sqrt())
    coefficient = min(1.0, max_norm / (norm + 1e-6))
    for grads in by_mesh.values():
        torch._foreach_mul_(grads, coefficient)
    return norm
