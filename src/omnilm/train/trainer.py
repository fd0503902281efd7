"""The training loop shared by every stage.

A stage supplies what differs (its objective, its batches, its evaluation); the loop owns what is common:
gradient accumulation, precision, clipping, the schedule, skipping non-finite steps, logging, samples,
checkpoints, resume, interruption and distribution. Written by hand: this loop is the point of the project.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from omnilm.train.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from omnilm.train.config import TrainConfig
from omnilm.train.distributed import Dist, all_reduce_mean, all_reduce_sum, unwrap
from omnilm.train.optim import build_optimizer, freeze_modules
from omnilm.train.parallel import clip_grad_norm, is_parallel
from omnilm.train.schedule import lr_multiplier
from omnilm.utils.atomic import write_text_atomic

# Dense bf16 peak FLOP/s of common accelerators, for the MFU estimate.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


class BatchSource(Protocol):
    """Where training batches come from (``omnilm.data.loader.BatchLoader`` and the post-training loaders)."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: Loss of one micro-batch: returns the mean loss (a scalar with grad) and extra scalars to log. Every
#: micro-batch weighs the same, which is exact when all hold as many loss units (fixed-size token windows).
Objective = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class SummedObjective:
    """An objective whose micro-batches hold different numbers of loss units (the reply tokens of padded
    conversations, preference pairs), normalised over the global batch.

    The step's loss is, for each term, the sum of its unit losses over every micro-batch on every process
    divided by its number of units there: the gradient of the whole global batch computed at once, whatever
    the accumulation and the number of processes. ``units(batch)`` counts each term's units in a micro-batch
    without the model, so the trainer adds the counts up over the global batch before the first backward pass;
    ``loss_sums(model, batch)`` returns each term's summed loss (its weight included) and extra scalars to log.
    """

    loss_sums: Callable[[nn.Module, Any], tuple[dict[str, torch.Tensor], dict[str, float]]]
    units: Callable[[Any], dict[str, float]]


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss keeps being non-finite); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    status: str  # "complete" or "interrupted"
    step: int
    total_steps: int
    final_dir: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if device.type == "cuda" and not bf16_ok:
            raise TrainingError("train.precision=bf16 but this GPU does not support bfloat16")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else None


def peak_flops(config: TrainConfig, device: torch.device) -> float | None:
    if config.peak_flops is not None:
        return config.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    return None


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors of a dict/list/tuple, to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the loop can checkpoint and stop cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Trains ``model`` with ``objective`` on ``batches`` into ``out_dir``.

    Files in ``out_dir``: ``checkpoints/step-*/`` (resumable), ``final/`` (the model, HF layout, written at the
    end), ``metrics.jsonl`` (one JSON object per logged step / evaluation), ``samples.jsonl``, ``loss.png``.
    """

    def __init__(self, model: nn.Module, objective: Objective | SummedObjective, batches: BatchSource,
                 config: TrainConfig, out_dir: str | Path, info: Dist | None = None, tokenizer: Any = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 sample: Callable[[nn.Module], str] | None = None, tokens_per_batch: int | None = None) -> None:
        self.config = config
        self.info = info or Dist()
        self.device = resolve_device(config.device)
        self.out_dir = Path(out_dir)
        self.objective, self.batches, self.tokenizer = objective, batches, tokenizer
        self.evaluate_fn, self.sample_fn = evaluate, sample
        self.model = model
        freeze_modules(unwrap(model), config)
        set_memory_options(unwrap(model), config)
        self.optimizer = build_optimizer(model, config)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        # Counted over data-parallel replicas: tensor- and pipeline-parallel ranks share their batches.
        self.accumulation = config.accumulation(self.info.data_size)
        self.total_steps = config.total_steps(self.info.data_size)
        self.tokens_per_batch = tokens_per_batch or config.batch_size * config.seq_len
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.forward_model: nn.Module = torch.compile(model) if config.compile else model
        base = unwrap(model)
        self.flops_per_token = _flops_per_token(base, config.seq_len)
        self.peak = peak_flops(config, self.device)

    # ------------------------------------------------------------------------------------------ paths
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.out_dir / "final"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    # ------------------------------------------------------------------------------------------ state
    def _trainer_state(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "tokens_seen": self.tokens_seen, "bad_steps": self.bad_steps,
                "skipped_steps": self.skipped_steps, "loader": self.batches.state_dict(),
                "config": asdict(self.config), "world_size": self.info.world_size}

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer, self._trainer_state(),
                               self.info, tokenizer=self.tokenizer, keep=self.config.keep_checkpoints)

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from checkpoint ``path`` (default: the latest one in ``out_dir``). False if there is none.

        The model weights must already come from that checkpoint (see ``omnilm.train.stage``).
        """
        path = Path(path) if path is not None else latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        state = restore_checkpoint(path, self.model, self.optimizer)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.bad_steps, self.skipped_steps = state["bad_steps"], state["skipped_steps"]
        self.batches.load_state_dict(state["loader"])
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from, so the log reads as one run."""
        if not self.info.is_main or not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------------------------------ logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _progress(self) -> Any:
        if not (self.config.progress and self.info.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------------------------------------ one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _micro_batches(self) -> Iterator[tuple[int, Any]]:
        for micro in range(self.accumulation):
            yield micro, to_device(self.batches.next_batch(), self.device)

    def _unit_scales(self, batches: list[Any]) -> dict[str, float]:
        """1 / (units of each loss term in the global batch): every micro-batch here, summed over processes."""
        counts: dict[str, float] = {}
        for batch in batches:
            for key, value in self.objective.units(batch).items():
                counts[key] = counts.get(key, 0.0) + float(value)
        keys = sorted(counts)
        totals = all_reduce_sum(torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=self.device),
                                self.info)
        # A term with no units anywhere has a zero sum; dividing by 1 keeps it zero rather than NaN.
        return {k: 1.0 / max(float(total), 1.0) for k, total in zip(keys, totals.tolist(), strict=True)}

    def _micro_loss(self, model: nn.Module, batch: Any, scales: dict[str, float] | None,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step's loss, scaled so that the gradients the processes average
        (DDP and FSDP divide by the world size) add up to the gradient of the global batch's loss."""
        if scales is None:
            loss, extra = self.objective(model, batch)
            return loss / self.accumulation, extra
        sums, extra = self.objective.loss_sums(model, batch)
        share = sum(total * scales[key] for key, total in sums.items())
        return share * self.info.data_size, extra

    def accumulate(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward and backward passes over this step's micro-batches, leaving the step's gradients in the
        parameters; returns the step's loss (the same on every process) and the extras of this process."""
        model = self.forward_model
        summed = isinstance(self.objective, SummedObjective)
        if summed:
            # Counting the units of the whole step first needs its micro-batches in hand (token ids only).
            batches = [to_device(self.batches.next_batch(), self.device) for _ in range(self.accumulation)]
            scales = self._unit_scales(batches)
            micro_batches: Iterator[tuple[int, Any]] = iter(enumerate(batches))
        else:
            scales, micro_batches = None, self._micro_batches()
        shares, extras = [], {}
        for micro, batch in micro_batches:
            last = micro == self.accumulation - 1
            # Gradients are reduced across processes only on the last micro-batch (DDP and FSDP2 spell it apart).
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            if hasattr(model, "pipeline_step"):  # pipeline stages: the schedule runs forward and backward itself
                with self._autocast():
                    share, extra = model.pipeline_step(batch, 1.0 / self.accumulation), {}
            else:
                with sync:
                    with self._autocast():
                        share, extra = self._micro_loss(model, batch, scales)
                    if not share.requires_grad:  # else autograd's "element 0 of tensors does not require grad"
                        raise RuntimeError(
                            f"step {self.step}: this batch's loss reaches no trainable parameter; every module it "
                            f"passes through is frozen (train.frozen_until: {self.config.frozen_until}). Unfreeze "
                            "a module on its path or give the batch's task no weight")
                    share.backward()
            shares.append(share.detach().float())
            for key, value in extra.items():
                extras[key] = extras.get(key, 0.0) + float(value) / self.accumulation
        # Summed shares were multiplied by the world size for the gradient average: their mean is their sum.
        return all_reduce_mean(torch.stack(shares).sum(), self.info), extras

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (accumulating micro-batches); returns what to log."""
        config = self.config
        self.forward_model.train()
        lr = config.lr * lr_multiplier(self.step, config.schedule_steps or self.total_steps, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) if self.step >= group.get("frozen_until", 0) else 0.0
        mean_loss, extras = self.accumulate()
        grad_norm = self._clip()
        finite = bool(torch.isfinite(mean_loss)) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += self.tokens_per_batch * self.accumulation * self.info.data_size
        return {"loss": float(mean_loss), "lr": lr, "grad_norm": grad_norm, "finite": finite} | extras

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        if is_parallel(self.config):
            return clip_grad_norm(self.model, params, max_norm)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------------------------------ the loop
    def run_evaluation(self) -> dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self._autocast():
            result = self.evaluate_fn(self.model)
        # On the training device: NCCL reduces only CUDA tensors.
        return {k: float(all_reduce_mean(torch.tensor(float(v), device=self.device), self.info))
                for k, v in result.items()}

    def _agree(self, flag: bool) -> bool:
        """True on every process when it is true on any (a signal may reach only some ranks)."""
        return bool(all_reduce_mean(torch.tensor(float(flag), device=self.device), self.info) > 0)

    def _maybe_sample(self, force: bool = False) -> None:
        every = self.config.sample_every
        if self.sample_fn is None or not self.info.is_main or not (force or (every and self.step % every == 0)):
            return
        if self.info.enabled and (self.config.distributed == "fsdp" or is_parallel(self.config)):
            return  # a sharded model cannot run a forward pass on one process alone
        unwrap(self.model).eval()
        with torch.no_grad():
            text = self.sample_fn(unwrap(self.model))
        with open(self.out_dir / "samples.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": self.step, "prompt": self.config.sample_prompt, "text": text}) + "\n")

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the budget. With ``resume``, continue from the latest checkpoint when there is one."""
        config = self.config
        if resume:
            self.resume()
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = self._progress()
        window_start, window_tokens = time.perf_counter(), 0
        last: dict[str, Any] = {}
        try:
            with _Interrupt() as interrupt:
                while self.step < self.total_steps:
                    record = self.train_step()
                    self.step += 1
                    window_tokens += self.tokens_per_batch * self.accumulation * self.info.data_size
                    if not record["finite"] and self.bad_steps >= config.max_bad_steps:
                        kept = latest_checkpoint(self.checkpoint_dir)
                        raise TrainingError(
                            f"loss or gradient non-finite for {self.bad_steps} consecutive steps (step {self.step}); "
                            f"stopping. Last good checkpoint: {kept or 'none'}. Lower train.lr or check the data.")
                    if self.step % config.log_every == 0 or self.step == self.total_steps:
                        elapsed = time.perf_counter() - window_start
                        tokens_per_s = window_tokens / max(elapsed, 1e-9)
                        record |= {"step": self.step, "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s,
                                   "skipped_steps": self.skipped_steps}
                        if self.peak:
                            record["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.info.world_size)
                        del record["finite"]
                        self._log(record)
                        last = record
                        window_start, window_tokens = time.perf_counter(), 0
                        if bar is not None:
                            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                    if bar is not None:
                        bar.update(1)
                    if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                        self._log({"step": self.step} | self.run_evaluation())
                    self._maybe_sample()
                    # No periodic checkpoint during a non-finite streak: the last one stays the last good one.
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0 and not self.bad_steps:
                        self.save()
                    if self._agree(interrupt.signal is not None):
                        self.save()
                        return TrainResult("interrupted", self.step, self.total_steps, None, last)
        finally:
            if bar is not None:
                bar.close()
        final_eval = self.run_evaluation()
        if final_eval:
            self._log({"step": self.step} | final_eval)
        self._maybe_sample(force=True)
        self.save()
        self._write_final()
        if self.info.is_main and self.metrics_path.is_file():
            from omnilm.eval.plots import plot_training_curves

            plot_training_curves(self.metrics_path, self.out_dir / "loss.png")
        return TrainResult("complete", self.step, self.total_steps, self.final_dir, last | final_eval)

    def _write_final(self) -> None:
        """The trained model as a plain model folder (a copy of the last checkpoint's model files)."""
        import shutil

        from omnilm.train.checkpoint import STATE_FILE, TENSORS_FILE

        if not self.info.is_main:
            return
        source = latest_checkpoint(self.checkpoint_dir)
        tmp = self.out_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(STATE_FILE, TENSORS_FILE))
        shutil.rmtree(self.final_dir, ignore_errors=True)
        tmp.rename(self.final_dir)


def set_memory_options(model: nn.Module, config: TrainConfig) -> None:
    """Pass ``loss_chunk_tokens`` and ``activation_checkpointing`` to every omnilm decoder in ``model``."""
    from omnilm.model.transformer import Transformer

    for module in model.modules():
        if isinstance(module, Transformer):
            module.set_memory_options(config.loss_chunk_tokens, config.activation_checkpointing)


def _flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6·(non-embedding parameters) + attention scores (12·layers·d·T), as in the
    scaling-law literature's estimate; a mixture of experts counts the k/E of its routed experts a token uses."""
    from omnilm.model.moe import active_params

    if hasattr(model, "flops_per_token"):  # a model that is more than a decoder counts its own
        return model.flops_per_token(seq_len)
    config = getattr(model, "config", None)
    params = active_params(model)
    if config is None:
        return 6.0 * params
    return 6.0 * params + 12.0 * config.n_layer * config.n_head * config.dim_per_head * seq_len
