"""Reward model: scores match transformers' sequence-classification models, padding does not change a score."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from helpers import small_model
from omnilm.model.hf import CheckpointError, save_pretrained
from omnilm.model.reward import RewardModel

TOL = dict(atol=1e-4, rtol=0)
PAD = 0


def reward_model(family: str, tied: bool = True, seed: int = 0) -> RewardModel:
    model = RewardModel(small_model(family, seed=seed, tie_embeddings=tied, pad_token_id=PAD)).eval()
    torch.nn.init.normal_(model.score.weight, std=0.5)  # scores of order one, so the comparison means something
    return model


def right_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (never the pad id) right-padded with PAD, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 320, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("family, tied", [("gpt2", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_reward_folder_loads_in_transformers_with_same_scores(tmp_path, family, tied):
    model = reward_model(family, tied)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_labels"] == 1 and config["pad_token_id"] == PAD
    ids, mask = right_padded([9, 4, 7])
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == config["architectures"][0] and config["architectures"][0].endswith(
        "ForSequenceClassification")
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_transformers_reward_folder_loads_with_same_scores(tmp_path, family):
    source = reward_model(family, tied=family != "llama")
    source.save_pretrained(tmp_path / "ours")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    hf.save_pretrained(tmp_path / "theirs")
    loaded = RewardModel.from_pretrained(tmp_path / "theirs")
    ids, mask = right_padded([6, 8])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
                                   **TOL)


def test_save_load_round_trip_is_exact(tmp_path, family):
    model = reward_model(family)
    model.save_pretrained(tmp_path)
    loaded = RewardModel.from_pretrained(tmp_path)
    ids, mask = right_padded([5, 8])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), atol=0, rtol=0)
    assert "lm_head.weight" not in dict(loaded.named_parameters())


def test_padding_does_not_change_a_score(family):
    model = reward_model(family)
    ids, mask = right_padded([3, 10, 6])
    with torch.no_grad():
        batched = model(ids, mask)
        alone = torch.stack([model(ids[i:i + 1, :n]) for i, n in enumerate([3, 10, 6])]).squeeze(-1)
        # Left padding selects the same (rightmost) real token.
        left = torch.stack([model(torch.cat([torch.full((1, 10 - n), PAD), ids[i:i + 1, :n]], 1),
                                  torch.cat([torch.zeros(1, 10 - n, dtype=torch.long), torch.ones(1, n).long()], 1))
                            for i, n in enumerate([3, 10, 6])]).squeeze(-1)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


def test_causal_lm_folder_gets_a_fresh_head(tmp_path, capsys):
    backbone = small_model("llama", tie_embeddings=False, pad_token_id=PAD)
    save_pretrained(backbone, tmp_path)
    model = RewardModel.from_pretrained(tmp_path)
    assert "freshly initialised" in capsys.readouterr().out
    ids = torch.randint(1, 320, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.hidden_states(ids), backbone.hidden_states(ids), atol=0, rtol=0)
        assert torch.isfinite(model(ids)).all() and float(model.score.weight.std()) < 0.5


def test_reward_folder_with_wrong_head_is_refused(tmp_path):
    model = reward_model("qwen2")
    model.score = torch.nn.Linear(64, 2, bias=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="score.weight"):
        RewardModel.from_pretrained(tmp_path)
