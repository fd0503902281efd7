"""A causal LM with a value head for PPO: one backbone, two outputs (next-token logits and a value per position).

Policy and value share the backbone, the simplest arrangement: one forward pass gives both, and the value loss
(scaled by ``vf_coef``) also shapes the shared hidden states. The head is a single ``Linear(d_model, 1)``,
zero-initialised so the first values are 0 rather than noise.

Folders: the policy is written as a plain causal-LM model folder, which every loader reads, with the head beside
it in ``value_head.safetensors`` (which causal-LM loaders ignore); checkpoints restore both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnilm.model.config import ModelConfig
from omnilm.model.hf import CheckpointError, read_config, read_hf_tensors, save_pretrained, state_from_hf
from omnilm.model.transformer import Transformer
from omnilm.utils.atomic import atomic_path

VALUE_HEAD_FILE = "value_head.safetensors"
POLICY_PREFIX, HEAD_PREFIX = "policy.", "value_head."


class PolicyWithValueHead(nn.Module):
    """``policy`` (a Transformer) plus ``value_head``; ``forward`` returns (logits (B, T, V), values (B, T))."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self) -> ModelConfig:
        """The policy's ModelConfig."""
        return self.policy.config

    @property
    def blocks(self) -> nn.ModuleList:
        """The policy's blocks."""
        return self.policy.blocks

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.policy.hidden_states(input_ids, attention_mask)
        return self.policy.lm_head(hidden), self.value_head(hidden).squeeze(-1)

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        """The policy as a causal-LM folder and the head beside it; ``state`` (this module's names) replaces
        the module's own tensors."""
        state = self.state_dict() if state is None else state
        policy = {k[len(POLICY_PREFIX):]: v for k, v in state.items() if k.startswith(POLICY_PREFIX)}
        head = {k[len(HEAD_PREFIX):]: v.detach().contiguous() for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        folder = save_pretrained(self.policy, folder, tokenizer=tokenizer, state=policy)
        with atomic_path(folder / VALUE_HEAD_FILE) as tmp:
            save_file(head, str(tmp))
        return folder

    @staticmethod
    def read_state(folder: str | Path) -> dict[str, torch.Tensor]:
        """The tensors of a folder written by :meth:`save_pretrained`, under this module's parameter names."""
        head_file = Path(folder) / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise CheckpointError(f"{folder}: missing file {VALUE_HEAD_FILE} (not a PPO checkpoint?)")
        config = read_config(folder)
        policy = state_from_hf(read_hf_tensors(folder), config)
        if config.tie_embeddings:  # the folder stores the tied matrix once
            policy.setdefault("lm_head.weight", policy["tok_emb.weight"])
        return ({POLICY_PREFIX + k: v for k, v in policy.items()}
                | {HEAD_PREFIX + k: v for k, v in load_file(str(head_file)).items()})
