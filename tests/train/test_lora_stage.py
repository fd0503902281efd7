"""LoRA as an option of a stage: only adapters train, folders hold the merged model + a PEFT adapter, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import small_model
from omnilm.config import ConfigError
from omnilm.model.hf import read_hf_tensors, save_pretrained
from omnilm.tokenizer import Tokenizer
from omnilm.train.stage import StageConfig, run_stage

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


@pytest.fixture
def base_dir(tmp_path: Path, chat_data: dict[str, Path]) -> Path:
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    model = small_model("llama", vocab_size=tokenizer.vocab_size, init_std=0.02, max_seq_len=128)
    return save_pretrained(model, tmp_path / "base", tokenizer=tokenizer)


def sft_config(base: Path, qa: Path, steps: int, **train: object) -> StageConfig:
    settings = {"max_steps": steps, "batch_size": 8, "seq_len": 96, "lr": 1e-2, "log_every": 1, "progress": False,
                "device": "cpu", "checkpoint_every": 5} | train
    return StageConfig.from_mapping({"name": "sft", "type": "sft", "init_from": str(base), "lora": LORA,
                                     "data": {"qa": {"path": str(qa), "where": {"split": "train"}}},
                                     "train": settings})


def test_lora_sft_trains_adapters_and_exports_merged_model_and_peft_adapter(
        base_dir: Path, chat_data: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_stage(sft_config(base_dir, chat_data["qa"], 12), tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert sum(losses[-3:]) < sum(losses[:3])
    before, after = read_hf_tensors(base_dir), read_hf_tensors(result.final_dir)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(t in k for t in LORA["target_modules"]) for k in changed)  # only adapted layers

    ids = torch.tensor([[3, 40, 41, 42, 9, 77]])
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                        result.final_dir / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-4, rtol=0)


def test_lora_stage_resumes_exactly(base_dir: Path, chat_data: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    config = sft_config(base_dir, chat_data["qa"], 10, keep_checkpoints=2)
    run_stage(config, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    # Back to the state after step 5: the step-10 checkpoint and the final model are gone.
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000010")
    shutil.rmtree(tmp_path / "resumed" / "final")
    result = run_stage(config, tmp_path / "resumed", resume=True)
    assert result.step == 10
    a, b = read_hf_tensors(tmp_path / "full" / "final"), read_hf_tensors(result.final_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (result.final_dir / "adapter" / "adapter_config.json").is_file()


def test_lora_errors(base_dir: Path, chat_data: dict[str, Path], tmp_path: Path) -> None:
    config = sft_config(base_dir, chat_data["qa"], 2)
    config.lora = {"r": 4, "target_modules": ["nonexistent_proj"]}
    with pytest.raises(ConfigError, match="nonexistent_proj"):
        run_stage(config, tmp_path / "bad")
    config.lora = {"rank": 4}
    with pytest.raises(ConfigError, match="unknown key"):
        run_stage(config, tmp_path / "bad2")


def test_lora_that_cannot_be_exported_is_refused_before_training(chat_data: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2's q/k/v are one fused c_attn layer in Hugging Face's model: adapters on them are refused at setup,
    not at the first checkpoint; adapters on its separate layers train and export."""
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    model = small_model("gpt2", vocab_size=tokenizer.vocab_size, init_std=0.02, max_seq_len=128)
    base = save_pretrained(model, tmp_path / "gpt2", tokenizer=tokenizer)
    config = sft_config(base, chat_data["qa"], 2, checkpoint_every=1)
    with pytest.raises(ConfigError, match=r"stage 'sft': .*blocks\.0\.attn\.q_proj.*c_attn.*"
                                          r"\['attn\.o_proj', 'mlp\.down_proj', 'mlp\.up_proj'\].*llama/qwen2"):
        run_stage(config, tmp_path / "refused")
    assert not (tmp_path / "refused" / "checkpoints").exists() and not (tmp_path / "refused" / "metrics.jsonl").exists()
    config.lora = LORA | {"target_modules": ["attn.o_proj", "up_proj"]}
    result = run_stage(config, tmp_path / "run")
    assert result.step == 2 and (result.final_dir / "adapter" / "adapter_config.json").is_file()


def test_lora_is_refused_where_a_head_wraps_the_model(tmp_path: Path) -> None:
    from omnilm.errors import UserError

    config = StageConfig.from_mapping({"name": "rm", "type": "reward", "lora": LORA, "train": {"max_steps": 1}})
    with pytest.raises(UserError, match="lora is not supported for stage type 'reward'"):
        run_stage(config, tmp_path)
