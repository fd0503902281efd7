"""The causal-LM stage's options: multi-token-prediction heads and selective language modelling (Rho-1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import small_model
from omnilm.config import ConfigError
from omnilm.model.hf import save_pretrained
from omnilm.objectives.selective import select_tokens, selective_objective
from omnilm.train.stage import StageConfig, run_stage


def stage(data: dict[str, Path], **options: object) -> StageConfig:
    return StageConfig.from_mapping({
        "name": "toy", "type": "pretrain", "tokenizer": str(data["tokenizer"]),
        "model": {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 64},
        "data": {"toy": str(data["tokens"])}, "options": options,
        "train": {"max_steps": 12, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "log_every": 1,
                  "checkpoint_every": 6, "eval_batches": 1, "progress": False, "device": "cpu"}})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_with_multi_token_heads_saves_and_resumes_them(tmp_path, lm_data):
    from omnilm.model.mtp import MultiTokenModel

    config = stage(lm_data, mtp={"n_heads": 2, "variant": "sequential", "loss_weights": [0.5, 0.25]})
    run_stage(config, tmp_path / "run")
    rows = [r for r in metrics(tmp_path / "run") if "mtp_loss_2" in r]
    assert len(rows) == 12 and rows[-1]["mtp_loss_1"] < rows[0]["mtp_loss_1"]
    final = tmp_path / "run" / "final"
    model = MultiTokenModel.from_pretrained(final)
    assert model.heads.mtp.loss_weights == (0.5, 0.25)
    # Resuming from the step-6 checkpoint continues with the saved heads: the same final heads.
    import shutil

    shutil.rmtree(tmp_path / "run" / "final")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000012")
    run_stage(config, tmp_path / "run", resume=True)
    again = MultiTokenModel.from_pretrained(final)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_select_tokens_keeps_the_top_fraction():
    excess = torch.tensor([[0.5, -1.0, 2.0, 0.1], [3.0, 0.0, -0.2, 1.0]])
    assert select_tokens(excess, 0.25).tolist() == [[False, False, True, False], [True, False, False, False]]
    assert select_tokens(excess, 0.3).sum() == 3  # ceil(0.3 · 8)
    assert select_tokens(excess, 1.0).all()


def test_selective_loss_is_the_mean_over_the_highest_excess_tokens():
    model, reference = small_model("llama"), small_model("llama", seed=1)
    tokens = torch.randint(0, 320, (2, 17))
    loss, logs = selective_objective(reference, 0.4)(model, tokens)
    with torch.no_grad():
        ours = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        ref = F.cross_entropy(reference(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    order = sorted(range(32), key=lambda i: -(ours[i] - ref[i]).item())[:13]  # ceil(0.4 · 32)
    torch.testing.assert_close(loss, ours[order].mean())
    assert logs["lm_loss_all"] == pytest.approx(ours.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="keep fraction"):
        selective_objective(reference, 0.0)


def test_pretrain_with_selective_tokens(tmp_path, lm_data):
    from omnilm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(lm_data["tokenizer"])
    reference = small_model("llama", vocab_size=tokenizer.vocab_size)
    save_pretrained(reference, tmp_path / "reference", tokenizer=tokenizer)
    run_stage(stage(lm_data, selective={"reference": str(tmp_path / "reference"), "keep": 0.5}), tmp_path / "run")
    rows = [r for r in metrics(tmp_path / "run") if "selected_loss" in r]
    assert len(rows) == 12 and all(r["selected_loss"] >= r["lm_loss_all"] - 1.0 for r in rows)
    with pytest.raises(ConfigError, match="cannot be combined"):
        run_stage(stage(lm_data, mtp={"n_heads": 1}, selective={"reference": "x"}), tmp_path / "bad")
    with pytest.raises(ConfigError, match="unknown option"):
        run_stage(stage(lm_data, heads=2), tmp_path / "bad2")


def test_pretrain_an_moe_logs_router_losses_and_saves_a_mixtral(tmp_path, lm_data):
    from transformers import AutoModelForCausalLM

    from omnilm.model.hf import load_pretrained

    config = stage(lm_data)
    config.model = dict(config.model) | {"n_experts": 4, "n_experts_per_tok": 2, "router_z_loss_coef": 0.01}
    run_stage(config, tmp_path / "run")
    rows = [r for r in metrics(tmp_path / "run") if "moe_load_balance" in r]
    assert len(rows) == 12 and all(0 < r["moe_load_balance"] <= 4 for r in rows)  # E·Σ f·P ≤ E
    assert all(r["loss"] > r["lm_loss"] for r in rows)
    final = tmp_path / "run" / "final"
    ours = load_pretrained(final)
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)
