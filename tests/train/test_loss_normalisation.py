"""Losses normalised over the global batch: accumulated micro-batches and DDP processes holding different numbers
of reply tokens (SFT) or pairs (DPO) give the gradient of the whole batch computed at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers import small_model
from omnilm.config import ConfigError
from omnilm.data.chat_data import load_chat_examples, load_preference_examples
from omnilm.data.examples import pad_right
from omnilm.model.hf import read_hf_tensors, save_pretrained
from omnilm.objectives.lm import causal_lm_loss, masked_lm_loss
from omnilm.objectives.logprobs import sequence_logprobs
from omnilm.objectives.preference import dpo_loss
from omnilm.tokenizer import Tokenizer
from omnilm.train.config import TrainConfig
from omnilm.train.dpo import dpo_objective
from omnilm.train.sft import SFT_OBJECTIVE, replay_objective
from omnilm.train.trainer import Trainer


class Batches:
    """The given micro-batches, in order (a batch source for one optimizer step)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = list(batches)

    def next_batch(self) -> Any:
        return self.batches.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def accumulated(model: torch.nn.Module, objective: Any, micro_batches: list[Any], tmp_path: Path,
                ) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and gradients of one step that accumulates ``micro_batches`` in the trainer."""
    config = TrainConfig(max_steps=1, batch_size=1, seq_len=1, tokens_per_step=len(micro_batches), device="cpu",
                         progress=False)
    trainer = Trainer(model, objective, Batches(micro_batches), config, tmp_path)
    assert trainer.accumulation == len(micro_batches)
    model.zero_grad(set_to_none=True)
    loss, _ = trainer.accumulate()
    return float(loss), grads(model)


def whole(model: torch.nn.Module, loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach()), grads(model)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def chat_batch(examples: list[Any], pad: int) -> dict[str, torch.Tensor]:
    return {"tokens": pad_right([e.ids for e in examples], pad), "loss_mask": pad_right([e.mask for e in examples], 0)}


def test_accumulated_sft_equals_the_whole_batch_at_once(chat_data: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    examples = sorted(load_chat_examples([str(chat_data["qa"])], tokenizer, max_len=128)[:12],
                      key=lambda e: sum(e.mask))
    # One short conversation alone, then the five longest: very different numbers of reply tokens.
    micro = [chat_batch(examples[:1], tokenizer.pad_id), chat_batch(examples[-5:], tokenizer.pad_id)]
    counts = [int(b["loss_mask"][:, 1:].sum()) for b in micro]
    assert counts[1] > 3 * counts[0]
    model = small_model("llama", vocab_size=tokenizer.vocab_size, init_std=0.02)

    loss, got = accumulated(model, SFT_OBJECTIVE, micro, tmp_path)
    expected_loss, expected = whole(model, masked_lm_loss(model, chat_batch(examples[:1] + examples[-5:],
                                                                            tokenizer.pad_id))[0])
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_same(got, expected)
    # The mean of per-micro-batch means, as before, is measurably another gradient.
    _, naive = whole(model, (masked_lm_loss(model, micro[0])[0] + masked_lm_loss(model, micro[1])[0]) / 2)
    assert max_difference(naive, expected) > 1e-3

    # With replayed pre-training windows: each term is normalised over its own tokens in the whole batch.
    windows = torch.randint(0, tokenizer.vocab_size, (6, 17), generator=torch.Generator().manual_seed(0))
    replay = [{"main": micro[0], "replay": windows[:4]}, {"main": micro[1], "replay": windows[4:]}]
    loss, got = accumulated(model, replay_objective(0.5), replay, tmp_path / "replay")
    both = chat_batch(examples[:1] + examples[-5:], tokenizer.pad_id)
    expected_loss, expected = whole(model, masked_lm_loss(model, both)[0] + 0.5 * causal_lm_loss(model, windows)[0])
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_same(got, expected)
    # Rows of similar length in separate forward passes (length_groups): the same loss and gradient.
    loss, got = accumulated(model, replay_objective(0.5, length_groups=3), replay, tmp_path / "grouped")
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_same(got, expected)


def test_accumulated_dpo_equals_the_whole_batch_at_once(chat_data: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    pairs = load_preference_examples([str(chat_data["prefs"])], tokenizer, max_len=128)[:4]
    policy = small_model("llama", vocab_size=tokenizer.vocab_size, init_std=0.02)
    reference = small_model("llama", seed=1, vocab_size=tokenizer.vocab_size, init_std=0.02)

    def batch(chosen: list[Any]) -> dict[str, torch.Tensor]:
        return chat_batch([p.chosen for p in chosen] + [p.rejected for p in chosen], tokenizer.pad_id)

    def mean_loss(chosen: list[Any]) -> torch.Tensor:
        b = batch(chosen)
        logps = sequence_logprobs(policy, b["tokens"], None, b["loss_mask"])
        with torch.no_grad():
            ref = sequence_logprobs(reference, b["tokens"], None, b["loss_mask"])
        n = len(chosen)
        return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.5)[0]

    # One pair, then three (a last, short batch, or ranks holding different numbers of pairs).
    loss, got = accumulated(policy, dpo_objective(reference, beta=0.5), [batch(pairs[:1]), batch(pairs[1:])],
                            tmp_path)
    expected_loss, expected = whole(policy, mean_loss(pairs))
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_same(got, expected)
    _, naive = whole(policy, (mean_loss(pairs[:1]) + mean_loss(pairs[1:])) / 2)
    assert max_difference(naive, expected) > 1e-3

    # RPO: each pair adds α × its chosen reply's mean token NLL, token counts taken per reply.
    def chosen_nll(chosen: list[Any]) -> torch.Tensor:
        b = chat_batch([p.chosen for p in chosen], tokenizer.pad_id)
        return -sequence_logprobs(policy, b["tokens"], None, b["loss_mask"], average=True).mean()

    loss, got = accumulated(policy, dpo_objective(reference, beta=0.5, nll_weight=0.7),
                            [batch(pairs[:1]), batch(pairs[1:])], tmp_path / "rpo")
    expected_loss, expected = whole(policy, mean_loss(pairs) + 0.7 * chosen_nll(pairs))
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_same(got, expected)
    assert {len(p.chosen.ids) for p in pairs} != {len(pairs[0].chosen.ids)}  # unequal lengths: a per-reply mean
    with pytest.raises(ConfigError, match="nll_weight"):
        dpo_objective(reference, nll_weight=-1.0)


# ------------------------------------------------------------------------------ torchrun: DDP equals one process


def run_cli(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "omnilm.cli", *args], capture_output=True, text=True,
                          env=env)


def stage_file(path: Path, stage: dict[str, Any], **train: object) -> Path:
    settings = {"max_steps": 6, "seq_len": 96, "lr": 1e-3, "log_every": 1, "progress": False, "device": "cpu",
                "checkpoint_every": 0} | train
    path.write_text(yaml.safe_dump(stage | {"train": settings}), encoding="utf-8")
    return path


def step_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_runs_agree(reference: Path, *others: Path) -> None:
    expected, weights = step_losses(reference), read_hf_tensors(reference / "final")
    assert sorted(expected) == list(range(1, 7))
    for run in others:
        got = step_losses(run)
        assert got.keys() == expected.keys()
        for step in expected:
            assert abs(got[step] - expected[step]) < 1e-5, (run.name, step, got[step], expected[step])
        theirs = read_hf_tensors(run / "final")
        for key in weights:
            torch.testing.assert_close(theirs[key], weights[key], atol=1e-5, rtol=1e-4, msg=f"{run.name}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_and_accumulation_match_one_process(kind: str, chat_data: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """A global batch of 8 conversations (4 pairs for DPO) in one process at once = split between two torchrun
    processes = accumulated over two micro-batches in one process. The halves hold different numbers of reply
    tokens, so averaging per process or per micro-batch would not agree (by 3e-4 on the first SFT loss)."""
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    if kind == "sft":
        stage = {"name": "sft", "type": "sft", "tokenizer": str(chat_data["tokenizer"]),
                 "model": {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 128},
                 "data": {"qa": {"path": str(chat_data["qa"]), "where": {"split": "train"}}}}
        batch = 8
    else:
        base = small_model("llama", vocab_size=tokenizer.vocab_size, init_std=0.02, max_seq_len=128)
        stage = {"name": "dpo", "type": "dpo", "options": {"beta": 0.5},
                 "init_from": str(save_pretrained(base, tmp_path / "base", tokenizer=tokenizer)),
                 "data": {"prefs": {"path": str(chat_data["prefs"]), "where": {"split": "train"}}}}
        batch = 4
    one = stage_file(tmp_path / "one.yaml", stage, batch_size=batch)
    half = stage_file(tmp_path / "half.yaml", stage, batch_size=batch // 2)
    accumulate = stage_file(tmp_path / "accumulate.yaml", stage, batch_size=batch // 2,
                            tokens_per_step=batch * 96)
    for config, run, processes in ((one, "one", 1), (half, "two", 2), (accumulate, "accumulated", 1)):
        result = run_cli("train", "--config", str(config), "--out", str(tmp_path / run), processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_runs_agree(tmp_path / "one", tmp_path / "two", tmp_path / "accumulated")
