"""A scalar reward model: a Transformer backbone scored by a linear head on its last real token.

Folders are written in the Hugging Face sequence-classification layout (``GPT2ForSequenceClassification``,
``LlamaForSequenceClassification``, ``Qwen2ForSequenceClassification`` with ``num_labels: 1``): the backbone's
tensors under their usual names plus ``score.weight``, so ``AutoModelForSequenceClassification`` loads them
and gives the same scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.model.config import ModelConfig
from omnilm.model.hf import (
    check_tensors,
    load_pretrained,
    read_config,
    read_hf_tensors,
    save_pretrained,
    state_from_hf,
)
from omnilm.model.transformer import Transformer

HF_REWARD_ARCHITECTURES = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                           "qwen2": "Qwen2ForSequenceClassification"}
SCORE_WEIGHT = "score.weight"
BACKBONE_PREFIX = "backbone."


def last_token_index(attention_mask: torch.Tensor | None, batch: int, length: int,
                     device: torch.device) -> torch.Tensor:
    """(B,) index of each row's last real token: the rightmost position whose mask is 1, so left and right
    padding both work; without a mask, the last position."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device)
    # Rows without any real token fall back to position 0 rather than indexing out of range.
    return (positions * (attention_mask != 0).long()).argmax(-1)


def is_reward_folder(folder: str | Path) -> bool:
    """True when ``folder``'s config.json names a sequence-classification architecture."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    architectures = json.loads(path.read_text(encoding="utf-8")).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


class RewardModel(nn.Module):
    """``score(h_last)``: one scalar per sequence from the backbone's final hidden state of its last real token.

    The backbone's LM head is dropped (set to None): a reward model never produces next-token logits, and an
    untied head would be a vocabulary-sized matrix that receives no gradient. The backbone passed in is
    therefore owned by the reward model afterwards.
    """

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        backbone.lm_head = None
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=backbone.config.init_std)

    @property
    def config(self) -> ModelConfig:
        """The backbone's ModelConfig."""
        return self.backbone.config

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks (sharded one by one under FSDP)."""
        return self.backbone.blocks

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) of ``input_ids`` (B, T); ``attention_mask`` (B, T) marks real tokens with 1."""
        hidden = self.backbone.hidden_states(input_ids, attention_mask)
        index = last_token_index(attention_mask, input_ids.shape[0], input_ids.shape[1], input_ids.device)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return self.score(last).squeeze(-1)

    # ------------------------------------------------------------------------------------------ folders
    def save_pretrained(self, folder: str | Path, tokenizer: Any = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model as a Hugging Face sequence-classification folder (and the tokenizer, if given).

        ``state`` replaces the model's own tensors (a full state dict with this module's names, e.g. gathered
        from shards). The config's ``pad_token_id`` falls back to the tokenizer's pad id and then to the EOS
        id, because transformers finds the last real token by looking for the pad id.
        """
        state = self.state_dict() if state is None else state
        backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        config = self.config
        pad = next((p for p in (config.pad_token_id, getattr(tokenizer, "pad_id", None), config.eos_token_id)
                    if p is not None), None)
        if pad is None:
            raise ValueError("a reward model folder needs a pad_token_id (set the model's pad or eos id)")
        updates = {"architectures": [HF_REWARD_ARCHITECTURES[config.family]], "num_labels": 1,
                   "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad}
        return save_pretrained(self.backbone, folder, tokenizer=tokenizer, state=backbone,
                               extra_tensors={SCORE_WEIGHT: state[SCORE_WEIGHT]}, config_updates=updates)

    @staticmethod
    def read_state(folder: str | Path) -> dict[str, torch.Tensor]:
        """The tensors of a reward folder under this module's parameter names (for restoring checkpoints)."""
        tensors = read_hf_tensors(folder)
        score = tensors.pop(SCORE_WEIGHT, None)
        state = {BACKBONE_PREFIX + k: v for k, v in state_from_hf(tensors, read_config(folder)).items()}
        if score is not None:
            state[SCORE_WEIGHT] = score
        return state

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> RewardModel:
        """Load a reward folder (omnilm's or transformers'); a causal-LM folder gives its backbone a freshly
        initialised head (reported on stdout), the usual start of reward-model training."""
        folder = Path(folder)
        if not is_reward_folder(folder):
            model = cls(load_pretrained(folder, dtype=dtype))
            print(f"[reward] {folder} is a causal LM: its reward head is freshly initialised "
                  f"(normal, std {model.config.init_std})")
            return model.to(dtype).eval()
        config = read_config(folder)
        state = cls.read_state(folder)
        with torch.device("meta"):
            model = cls(Transformer(config))
        check_tensors(folder, state, {k: v.shape for k, v in model.state_dict().items()})
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
        return model.eval()
