"""The multi-token and selective-LM labs end to end at toy size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnilm.cli import main

TOY = {"people": 8, "bios_per_person": 5, "vocab_size": 400, "batch_size": 2, "seq_len": 16, "eval_examples": 20,
       "steps": 6, "eval_every": 3, "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "n_kv_head": 1}}


def run_lab(name: str, tmp_path: Path, **overrides: object) -> dict:
    (tmp_path / "lab.json").write_text(json.dumps(TOY | overrides))
    assert main(["lab", name, "--config", str(tmp_path / "lab.json"), "--out", str(tmp_path / "out")]) == 0
    assert main(["lab", name, "--out", str(tmp_path / "out"), "--report-only"]) == 0
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_mtp_lab(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = run_lab("mtp", tmp_path, heads=2)
    runs = results["runs"]
    assert list(runs) == ["next-token", "mtp independent", "mtp sequential"]
    # The heads cost compute: more FLOPs per step than the next-token run, same steps.
    for name in ("mtp independent", "mtp sequential"):
        assert runs[name]["curve"][-1]["flops"] > runs["next-token"]["curve"][-1]["flops"]
        assert [r["step"] for r in runs[name]["curve"]] == [3, 6]
    assert "| mtp sequential |" in capsys.readouterr().out and (tmp_path / "out" / "mtp.png").is_file()


def test_selective_lab_mixes_in_noise(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = run_lab("selective", tmp_path, reference_steps=3, keep=0.5)
    noise = [json.loads(line)["text"] for line in (tmp_path / "out" / "data" / "noise.jsonl").read_text().splitlines()]
    bios = [json.loads(line)["text"] for line in
            (tmp_path / "out" / "data" / "bios" / "train.jsonl").read_text().splitlines()]
    assert len(noise) == len(bios) and not set(noise) & set(bios)
    assert any(word.isdigit() for word in noise[0].split())
    runs = results["runs"]
    assert runs["selective"]["curve"][-1]["flops"] == pytest.approx(runs["standard"]["curve"][-1]["flops"] * 4 / 3)
    assert "Reference (clean biographies only" in capsys.readouterr().out
