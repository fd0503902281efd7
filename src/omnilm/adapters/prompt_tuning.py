"""Soft prompt tuning: a few trainable input vectors in front of every sequence of a frozen model.

Folders use PEFT's PROMPT_TUNING format (``prompt_embeddings`` of shape (virtual tokens, d_model)),
so a prompt trained here loads with ``peft.PeftModel.from_pretrained`` on the Hugging Face export
of the base model, and one trained with PEFT loads here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from omnilm.adapters.peft_files import read_adapter_folder, write_adapter_folder
from omnilm.config import ConfigError
from omnilm.model.transformer import Transformer


class SoftPrompt(nn.Module):
    """``n_virtual_tokens`` vectors of the embedding's width.

    Initialised from the embeddings of ``init_token_ids`` (repeated or cut to length, as PEFT's text
    init does) or, without them, normal with the embedding table's standard deviation, so the prompt
    starts at the scale the model is used to.
    """

    def __init__(self, embedding: nn.Embedding, n_virtual_tokens: int,
                 init_token_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        if n_virtual_tokens <= 0:
            raise ConfigError(f"n_virtual_tokens must be positive, got {n_virtual_tokens}")
        table = embedding.weight.detach()
        if init_token_ids is not None:
            ids = list(init_token_ids)
            if not ids or not all(0 <= i < table.shape[0] for i in ids):
                raise ConfigError(f"init_token_ids must be non-empty ids below {table.shape[0]}, got {ids}")
            ids = (ids * (n_virtual_tokens // len(ids) + 1))[:n_virtual_tokens]
            init = table[torch.tensor(ids, device=table.device)].clone()
        else:
            init = torch.randn(n_virtual_tokens, table.shape[1], device=table.device, dtype=table.dtype)
            init *= table.float().std().to(table.dtype)
        self.embeddings = nn.Parameter(init)

    @property
    def n_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt for every row: (batch_size, n_virtual_tokens, d_model)."""
        return self.embeddings.unsqueeze(0).expand(batch_size, -1, -1)


class PromptTunedModel(nn.Module):
    """A frozen Transformer reading a trainable soft prompt before its input tokens."""

    def __init__(self, model: Transformer, n_virtual_tokens: int,
                 init_token_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.prompt = SoftPrompt(model.tok_emb, n_virtual_tokens, init_token_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of the input positions; the prompt's own positions are dropped.

        ``attention_mask`` (B, T) covers the input tokens only; the prompt is always attended to.
        """
        batch, n = input_ids.shape[0], self.prompt.n_virtual_tokens
        tokens = self.model.tok_emb(input_ids)
        embeds = torch.cat((self.prompt(batch).to(tokens.dtype), tokens), dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, n)
            attention_mask = torch.cat((ones, attention_mask), dim=1)
        return self.model(None, attention_mask, inputs_embeds=embeds)[:, n:]

    def save_pretrained(self, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write the prompt as a PEFT PROMPT_TUNING folder for a causal LM."""
        config = self.model.config
        peft_config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "num_virtual_tokens": self.prompt.n_virtual_tokens,
            "token_dim": config.d_model,
            # Decoder-only models have one transformer stack that reads the prompt.
            "num_transformer_submodules": 1,
            "num_attention_heads": config.n_head,
            "num_layers": config.n_layer,
            # The stored embeddings replace any init on load; naming text init would make PEFT load a tokenizer.
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
            "modules_to_save": None,
        }
        return write_adapter_folder(folder, peft_config, {"prompt_embeddings": self.prompt.embeddings})

    @classmethod
    def from_pretrained(cls, model: Transformer, folder: str | Path) -> PromptTunedModel:
        """Wrap ``model`` with the soft prompt stored in a PEFT PROMPT_TUNING folder."""
        config, tensors = read_adapter_folder(folder, "PROMPT_TUNING")
        if config.get("num_transformer_submodules") not in (None, 1):
            raise ConfigError(f"{folder}: prompts for {config['num_transformer_submodules']} transformer "
                              "submodules (encoder-decoder) do not fit a decoder-only model")
        if "prompt_embeddings" not in tensors:
            raise ConfigError(f"{folder}: no 'prompt_embeddings' tensor (found {sorted(tensors)})")
        embeddings = tensors["prompt_embeddings"]
        n, d = int(config["num_virtual_tokens"]), model.config.d_model
        if tuple(embeddings.shape) != (n, d):
            raise ConfigError(f"{folder}: prompt_embeddings has shape {tuple(embeddings.shape)}, expected "
                              f"({n}, {d}) for {n} virtual tokens and this model's width")
        wrapped = cls(model, n)
        with torch.no_grad():
            wrapped.prompt.embeddings.copy_(embeddings)
        return wrapped
