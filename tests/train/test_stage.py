"""End-to-end training runs through the real CLI: resume after SIGKILL, SIGTERM, torchrun DDP/FSDP, NaN guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from omnilm.errors import UserError
from omnilm.model.hf import read_hf_tensors
from omnilm.train.stage import StageConfig, run_stage
from omnilm.train.trainer import TrainingError


def write_config(path: Path, data: dict[str, Path], **train: object) -> Path:
    settings = {"max_steps": 40, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup_steps": 4, "log_every": 1,
                "checkpoint_every": 10, "eval_batches": 2, "progress": False, "device": "cpu"} | train
    config = {"name": "toy", "type": "pretrain", "tokenizer": str(data["tokenizer"]),
              "model": {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 64},
              "data": {"toy": str(data["tokens"])}, "train": settings}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def omnilm(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "omnilm.cli", *args], capture_output=True, text=True, env=env,
                          **kwargs)


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return read_hf_tensors(run / "final")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, lm_data: dict[str, Path]) -> None:
    config = write_config(tmp_path / "stage.yaml", lm_data)
    full = omnilm("train", "--config", str(config), "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "omnilm.cli", "train", "--config", str(config), "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-0000020" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-20 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()

    resumed = omnilm("train", "--config", str(config), "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    full_losses, resumed_losses = losses(tmp_path / "full"), losses(run)
    assert resumed_losses[40] == full_losses[40]
    assert resumed_losses == full_losses  # the resumed log reads as one run, with no duplicate steps
    assert_same_weights(tmp_path / "full", run)


def test_sigterm_checkpoints_and_exits(tmp_path: Path, lm_data: dict[str, Path]) -> None:
    config = write_config(tmp_path / "stage.yaml", lm_data, max_steps=100000, checkpoint_every=0)
    run = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "omnilm.cli", "train", "--config", str(config), "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len(losses(run)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "model.safetensors").is_file()
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert step >= 3 and max(losses(run)) == step


def test_resume_under_a_changed_config_names_the_keys_unless_forced(
        tmp_path: Path, lm_data: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from omnilm.cli import main

    small = {"max_steps": 4, "batch_size": 2, "seq_len": 16, "checkpoint_every": 2, "eval_batches": 1}
    config = write_config(tmp_path / "stage.yaml", lm_data, **small)
    run = str(tmp_path / "run")
    assert main(["train", "--config", str(config), "--out", run]) == 0
    assert json.loads((tmp_path / "run" / "stage_config.json").read_text())["train"]["max_steps"] == 4
    changed = write_config(tmp_path / "changed.yaml", lm_data, **small | {"lr": 2e-3})
    capsys.readouterr()
    assert main(["train", "--config", str(changed), "--out", run, "--resume", "--set", "max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "--force" in err
    assert "train.lr: 0.003 → 0.002" in err and "train.max_steps: 4 → 6" in err
    assert max(losses(tmp_path / "run")) == 4  # refused before training anything
    # Settings that only change logging and checkpointing may differ.
    assert main(["train", "--config", str(config), "--out", run, "--resume", "--set", "log_every=2",
                 "--set", "checkpoint_every=3"]) == 0
    # Extending the budget is the use of --force: the run continues from step 4 to step 6.
    assert main(["train", "--config", str(config), "--out", run, "--resume", "--set", "max_steps=6",
                 "--force"]) == 0
    out = capsys.readouterr().out
    assert "resuming under a changed config (--force): train.max_steps: 4 → 6" in out
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "run" / "stage_config.json").read_text())["train"]["max_steps"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path: Path, lm_data: dict[str, Path], strategy: str) -> None:
    """Same global batch: 2 processes x 4 rows under torchrun = 1 process x 8 rows, step by step."""
    steps = {"max_steps": 20, "checkpoint_every": 0}
    single = write_config(tmp_path / "single.yaml", lm_data, batch_size=8, distributed=strategy, **steps)
    double = write_config(tmp_path / "double.yaml", lm_data, batch_size=4, distributed=strategy, **steps)
    one = omnilm("train", "--config", str(single), "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "omnilm.cli", "train", "--config", str(double), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == set(range(1, 21))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


def test_non_finite_loss_skips_then_stops_with_last_checkpoint_kept(tmp_path: Path, lm_data: dict[str, Path]) -> None:
    """A loss that turns NaN from step 7 on (a poisoned batch stream): steps are skipped, counted, then the
    run stops; checkpoints from before the streak stay, none is written during it."""
    from omnilm.data.loader import BatchLoader, TokenDataset
    from omnilm.model.config import get_preset
    from omnilm.model.transformer import Transformer
    from omnilm.objectives.lm import causal_lm_loss
    from omnilm.train.config import TrainConfig
    from omnilm.train.trainer import Trainer

    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=300, d_model=64, n_layer=2))
    loader = BatchLoader(TokenDataset.open(lm_data["tokens"]), batch_size=4, seq_len=32)
    config = TrainConfig(max_steps=30, batch_size=4, seq_len=32, checkpoint_every=2, max_bad_steps=3,
                         log_every=1, progress=False)
    trainer: Trainer

    def poisoned(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, extra = causal_lm_loss(model, batch)
        return (loss * float("nan") if trainer.step >= 6 else loss), extra

    trainer = Trainer(model, poisoned, loader, config, tmp_path / "run")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match="non-finite for 3 consecutive steps") as err:
        trainer.fit()
    assert "step-0000006" in str(err.value)
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").glob("step-*"))] == ["step-0000004",
                                                                                              "step-0000006"]
    assert trainer.skipped_steps == 3
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unimplemented_stage_type_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import omnilm.train.stage as stage

    # A stage type the project plans (it is known) but this build has no builder for.
    monkeypatch.setattr(stage, "KNOWN_STAGE_TYPES", (*stage.KNOWN_STAGE_TYPES, "future"))
    config = StageConfig.from_mapping({"name": "align", "type": "future", "train": {"max_steps": 1}})
    with pytest.raises(UserError, match="'future' is not implemented"):
        run_stage(config, tmp_path)
    with pytest.raises(UserError, match="unknown stage type 'magic'"):
        run_stage(StageConfig.from_mapping({"type": "magic", "train": {"max_steps": 1}}), tmp_path)


def test_schedule_horizon_longer_than_the_budget(tmp_path: Path, lm_data: dict[str, Path]) -> None:
    """With ``schedule_steps`` the run follows the first part of a longer schedule, step for step."""
    from omnilm.data.loader import BatchLoader, TokenDataset
    from omnilm.model.config import get_preset
    from omnilm.model.transformer import Transformer
    from omnilm.objectives.lm import causal_lm_loss
    from omnilm.train.config import TrainConfig
    from omnilm.train.schedule import lr_multiplier
    from omnilm.train.trainer import Trainer

    model = Transformer(get_preset("tiny", vocab_size=300, d_model=32, n_layer=1))
    loader = BatchLoader(TokenDataset.open(lm_data["tokens"]), batch_size=2, seq_len=16)
    config = TrainConfig(max_steps=6, schedule_steps=20, lr=1e-3, batch_size=2, seq_len=16, log_every=1,
                         progress=False)
    Trainer(model, causal_lm_loss, loader, config, tmp_path / "run").fit()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in logged if "lr" in r]
    assert lrs == pytest.approx([1e-3 * lr_multiplier(step, 20, config) for step in range(6)])
    assert lrs[-1] > 0.8e-3  # far from the end of the 20-step cosine (a 6-step one would end at 1e-4)


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses(tmp_path: Path, lm_data: dict[str, Path]) -> None:
    """``train.compile: true`` (inductor on CPU here) trains to the eager model's losses."""
    runs = {}
    for compiled in (False, True):
        config = write_config(tmp_path / f"stage-{compiled}.yaml", lm_data, max_steps=8, checkpoint_every=8,
                              compile=compiled)
        result = omnilm("train", "--config", str(config), "--out", str(tmp_path / f"run-{compiled}"), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[compiled] = losses(tmp_path / f"run-{compiled}")
    assert runs[True].keys() == runs[False].keys() and len(runs[True]) == 8
    for step, loss in runs[False].items():
        # Fused kernels sum in another order: equal to float32 rounding, compounded over a few steps.
        assert runs[True][step] == pytest.approx(loss, rel=1e-4), step
