"""GRPO and PPO stages: rollout rows and masks, seeded resumable sampling, rewards going up, config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helpers import small_model
from omnilm.config import ConfigError
from omnilm.data.examples import ExampleLoader
from omnilm.infer.sampling import SamplingParams
from omnilm.model.hf import load_pretrained, read_hf_tensors, save_pretrained
from omnilm.tokenizer.chat import IM_END
from omnilm.train.rl_stage import policy_logprobs
from omnilm.train.rollout import Rollout, RolloutPrompt, RolloutSource, checker_scorer, load_prompts
from omnilm.train.stage import StageConfig, run_stage
from omnilm.train.value_head import VALUE_HEAD_FILE

TRAIN = {"seq_len": 96, "log_every": 1, "progress": False, "device": "cpu", "checkpoint_every": 0,
         "weight_decay": 0.0}


def metric(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def tokenizer(chat_data: dict[str, Path]) -> Any:
    from omnilm.tokenizer import Tokenizer

    return Tokenizer.from_dir(chat_data["tokenizer"])


@pytest.fixture(scope="module")
def eager_stopper(tokenizer: Any) -> torch.nn.Module:
    """A random tiny model whose ``<|im_end|>`` logit is raised, so its samples stop at varied lengths."""
    model = small_model("llama", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id)
    boost = torch.zeros(tokenizer.vocab_size)
    boost[tokenizer.token_to_id(IM_END)] = 6.0
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + boost)
    return model


def rollout_source(model: torch.nn.Module, tokenizer: Any, prompts: list[RolloutPrompt],
                   seed: int = 0) -> RolloutSource:
    def prepare(rollout: Rollout) -> dict[str, Any]:
        return {"rollout": rollout}

    loader = ExampleLoader(len(prompts), 3, list, seed=seed)
    return RolloutSource(model, tokenizer, prompts, loader, SamplingParams(max_new_tokens=10), group_size=4,
                         score=checker_scorer("qa"), prepare=prepare, seed=seed)


def test_rollout_rows_masks_and_logprobs(chat_data: dict[str, Path], tokenizer: Any,
                                         eager_stopper: torch.nn.Module) -> None:
    prompts = load_prompts([str(chat_data["qa"])], tokenizer, 64, {"split": "train"}, need_answer=True)
    expected = sum('"split": "train"' in line for line in chat_data["qa"].read_text().splitlines())
    assert len(prompts) == expected > 0 and all(p.answer for p in prompts)
    source = rollout_source(eager_stopper, tokenizer, prompts)
    rollout = source.next_batch()["rollout"]
    stops = {tokenizer.token_to_id(IM_END), tokenizer.eos_id}
    assert rollout.tokens.shape[0] == 12 and len(rollout.prompts) == 12
    assert all(rollout.prompts[4 * g + i] == rollout.prompts[4 * g] for g in range(3) for i in range(4))
    lengths = set()
    for row, prompt in enumerate(rollout.prompts):
        ids, response_mask = rollout.tokens[row].tolist(), rollout.response_mask[row].tolist()
        real = int(rollout.attention_mask[row].sum())
        response = ids[len(prompt.ids):real]
        lengths.add(len(response))
        assert ids[:len(prompt.ids)] == prompt.ids
        assert response_mask == [0] * len(prompt.ids) + [1] * len(response) + [0] * (len(ids) - real)
        assert 1 <= len(response) <= 10
        assert not stops & set(response[:-1])  # sampling ended at the first stop token...
        assert response[-1] in stops or len(response) == 10  # ...which is part of the response
        assert rollout.texts[row] == tokenizer.decode([t for t in response if t not in stops])
    assert len(lengths) > 2  # rows of different lengths share the padded batch

    # Batched, right-padded log-probabilities of the response tokens equal a per-token recomputation.
    with torch.no_grad():
        _, batched = policy_logprobs(eager_stopper, rollout.tokens)
        for row in range(0, 12, 5):
            ids = rollout.tokens[row]
            for t in torch.nonzero(rollout.response_mask[row]).flatten().tolist():
                logits = eager_stopper(ids[None, :t])[0, -1].double()
                expected = float(F.log_softmax(logits, -1)[ids[t]])
                assert batched[row, t - 1].item() == pytest.approx(expected, abs=1e-4)


def test_rollouts_are_seeded_and_resume_exactly(chat_data: dict[str, Path], tokenizer: Any,
                                                eager_stopper: torch.nn.Module) -> None:
    prompts = load_prompts([str(chat_data["qa"])], tokenizer, 64, {"split": "train"})
    first, again = rollout_source(eager_stopper, tokenizer, prompts), rollout_source(eager_stopper, tokenizer, prompts)
    batches = [first.next_batch()["rollout"] for _ in range(3)]
    assert torch.equal(again.next_batch()["rollout"].tokens, batches[0].tokens)
    assert not torch.equal(batches[1].tokens[:4], batches[2].tokens[:4])
    resumed = rollout_source(eager_stopper, tokenizer, prompts)
    state = json.loads(json.dumps(again.state_dict()))  # it travels in a checkpoint's JSON
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch()["rollout"].tokens, batches[1].tokens)


def test_checkers_reward_stated_answers() -> None:
    def rollout(answer: Any, *texts: str) -> Rollout:
        empty = torch.zeros(len(texts), 1)
        return Rollout(empty, empty, empty, [RolloutPrompt([1], answer, "x")] * len(texts), list(texts))

    assert checker_scorer("qa")(rollout("East Lori", "east lori.", "West Lori")).tolist() == [1.0, 0.0]
    assert checker_scorer("arithmetic")(rollout(42, "So the answer is 42.", "The answer is 41.")).tolist() == [1.0,
                                                                                                              0.0]
    with pytest.raises(ConfigError, match="unknown reward 'bleu'"):
        checker_scorer("bleu")


def rl_config(kind: str, init_from: Path, data: Path, options: dict[str, Any], **train: Any) -> StageConfig:
    return StageConfig.from_mapping({
        "name": kind, "type": kind, "init_from": str(init_from), "options": options,
        "data": {"qa": {"path": str(data), "where": {"split": "train", "attribute": "major"}}},
        "train": TRAIN | train})


@pytest.fixture(scope="module")
def tiny_policy(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = small_model("gpt2", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id)
    return save_pretrained(model, tmp_path_factory.mktemp("policy") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def reward_folder(tiny_policy: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model on the tiny policy's backbone (its head untrained, but fixed once saved)."""
    from omnilm.model.reward import RewardModel

    torch.manual_seed(0)
    return RewardModel(load_pretrained(tiny_policy)).save_pretrained(tmp_path_factory.mktemp("rm") / "model",
                                                                      tokenizer=tokenizer)


def test_config_errors(chat_data: dict[str, Path], tiny_policy: Path, tmp_path: Path) -> None:
    cases = [("grpo", {"reward": "bleu"}, "unknown reward 'bleu'"),
             ("ppo", {"reward_model": str(tmp_path / "missing")}, "reward_model: folder not found"),
             ("ppo", {}, "exactly one of options.reward_model"),
             ("ppo", {"reward_model": str(tiny_policy)}, "is not a reward-model folder"),
             ("ppo", {"reward": "qa", "reward_model": str(tiny_policy)}, "exactly one of"),
             ("grpo", {"temperature": 0.0}, "temperature must be > 0"),
             ("grpo", {"group_sz": 4}, "unknown option")]
    for kind, options, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_stage(rl_config(kind, tiny_policy, chat_data["qa"], options, max_steps=2), tmp_path / "run")
    no_init = rl_config("grpo", tiny_policy, chat_data["qa"], {}, max_steps=2)
    no_init.init_from, no_init.tokenizer = None, str(chat_data["tokenizer"])
    with pytest.raises(ConfigError, match="needs init_from"):
        run_stage(no_init, tmp_path / "run")


def test_ppo_with_a_reward_model_resumes_bit_identically(chat_data: dict[str, Path], tiny_policy: Path,
                                                         reward_folder: Path, tmp_path: Path) -> None:
    """A reward model scores the samples; the value head is checkpointed and sampling is seeded, so a run
    resumed from step 2 ends exactly where the uninterrupted one did."""
    options = {"reward_model": str(reward_folder), "group_size": 2, "max_new_tokens": 6, "ppo_epochs": 2}
    config = rl_config("ppo", tiny_policy, chat_data["qa"], options, max_steps=4, batch_size=2, lr=1e-3,
                       checkpoint_every=2)
    full = run_stage(config, tmp_path / "full")
    assert full.status == "complete"
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "resumed" / "final")
    run_stage(config, tmp_path / "resumed", resume=True)
    for name in ("model.safetensors", VALUE_HEAD_FILE):
        expected, got = (read_hf_tensors(tmp_path / run / "final") if name == "model.safetensors" else
                         _read(tmp_path / run / "final" / name) for run in ("full", "resumed"))
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    assert metric(tmp_path / "full", "reward") == metric(tmp_path / "resumed", "reward")
    assert len(metric(tmp_path / "full", "value_loss")) == 4
    assert (tmp_path / "full" / "rl.png").stat().st_size > 0
    load_pretrained(tmp_path / "full" / "final")  # the policy is a plain causal-LM folder


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def sft_model(chat_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model briefly fine-tuned on the biography QA: it answers in the right format, mostly wrongly."""
    config = StageConfig.from_mapping({
        "name": "sft", "type": "sft", "tokenizer": str(chat_data["tokenizer"]),
        "model": {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 128},
        "data": {"qa": {"path": str(chat_data["qa"]), "where": {"split": "train"}}},
        "train": TRAIN | {"batch_size": 16, "lr": 3e-3, "max_steps": 120, "warmup_steps": 5, "weight_decay": 0.1}})
    return run_stage(config, tmp_path_factory.mktemp("sft") / "run").final_dir


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rl_raises_the_reward(kind: str, chat_data: dict[str, Path], sft_model: Path, tmp_path: Path) -> None:
    """30 steps on the 7 training questions about majors (every prompt in every step) lift the mean reward of
    sampled answers from about 0.2 to above 0.3 (observed for several seeds)."""
    options = {"group_size": 16, "max_new_tokens": 12, "reward": "qa"}
    config = rl_config(kind, sft_model, chat_data["qa"], options, max_steps=30, batch_size=7, lr=1e-3,
                       warmup_steps=3)
    result = run_stage(config, tmp_path / kind)
    reward, kl = metric(tmp_path / kind, "reward"), metric(tmp_path / kind, "kl")
    assert result.status == "complete" and len(reward) == 30
    assert mean(reward[-8:]) > mean(reward[:8]) + 0.07, reward
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and max(kl) < 1.0  # starts at the reference, stays near it
    assert set(metric(tmp_path / kind, "clipfrac")) == {0.0}  # one update per rollout: the ratio is 1
    assert all(len(metric(tmp_path / kind, key)) == 30 for key in ("entropy", "response_length"))
    assert (tmp_path / kind / "rl.png").stat().st_size > 0
