from pathlib import Path

import torch

from helpers import small_model
from omnilm.train.config import TrainConfig
from omnilm.train.optim import build_optimizer, decay_groups, freeze_modules


class SameBatch:
    """A batch source giving the same token ids at every step (nothing to save for resume)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def next_batch(self) -> torch.Tensor:
        return self.tokens

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_weight_decay_only_on_matrices(family):
    model = small_model(family, vocab_size=64)
    decay, no_decay = decay_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    kept = {names[id(p)] for p in no_decay}
    assert "tok_emb.weight" in kept and all("norm" not in n and not n.endswith("bias") for n in decayed)
    assert all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "up_proj.weight",
                           "down_proj.weight", "gate_proj.weight", "lm_head.weight")) for n in decayed)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))  # tied weights counted once


def test_adamw_step_matches_torch_reference():
    """Our grouping + torch AdamW equals a hand-built two-group AdamW on a copy of the model."""
    torch.manual_seed(0)
    model = small_model("llama", vocab_size=64)
    reference = small_model("llama", vocab_size=64)
    reference.load_state_dict(model.state_dict())
    config = TrainConfig(max_steps=1, lr=1e-2, weight_decay=0.5)
    ours = build_optimizer(model, config)
    assert all(group["fused"] for group in ours.param_groups)  # contiguous CPU tensors: the fused kernel
    decay = [p for n, p in reference.named_parameters() if p.dim() >= 2 and "emb" not in n]
    other = [p for n, p in reference.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    theirs = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5}, {"params": other, "weight_decay": 0.0}],
                               lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ids = torch.randint(0, 64, (2, 9))
    for net, opt in ((model, ours), (reference, theirs)):
        for _ in range(3):
            net(ids).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_lr_scale_and_frozen_modules_in_a_real_training_run(tmp_path):
    """Through the trainer: a module frozen until step 3 keeps its weights for 3 steps, then moves; a module frozen
    for good has no gradient and never moves; a module with lr_scale 0.5 takes steps half as large in its first
    Adam step (Adam's first update is lr·sign-like, so the ratio is exact)."""
    from omnilm.objectives.lm import causal_lm_loss
    from omnilm.train.trainer import Trainer

    torch.manual_seed(0)
    model = small_model("llama", vocab_size=64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 64, (4, 17))

    config = TrainConfig(max_steps=5, lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0,
                         batch_size=4, seq_len=16, log_every=1, progress=False, device="cpu",
                         frozen_until={"blocks.0": 3, "blocks.1.mlp": -1}, lr_scale={"blocks.1.attn": 0.5})
    trainer = Trainer(model, causal_lm_loss, SameBatch(tokens), config, tmp_path)
    moved = []
    for _ in range(5):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trainer.train_step()
        trainer.step += 1
        moved.append({k for k, v in model.state_dict().items() if not torch.equal(v, before[k])})
        if trainer.step == 1:
            first = {k: (v - before[k]).abs().max() for k, v in model.state_dict().items()}
    assert all(not any(k.startswith("blocks.0.") for k in m) for m in moved[:3])
    assert any(k.startswith("blocks.0.") for k in moved[3])
    assert not any(k.startswith("blocks.1.mlp.") for m in moved for k in m)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("blocks.1.mlp."))
    ratio = first["blocks.1.attn.q_proj.weight"] / first["blocks.1.norm1.weight"]
    torch.testing.assert_close(ratio, torch.tensor(0.5), atol=1e-3, rtol=0)
    assert torch.equal(start["blocks.1.mlp.up_proj.weight"], model.state_dict()["blocks.1.mlp.up_proj.weight"])


def test_fused_kernel_only_for_contiguous_parameters(tmp_path: Path) -> None:
    """The fused kernel pairs elements by memory position, so a transposed parameter keeps the default kernel;
    and a GPT-2 folder (Conv1D weights stored transposed) loads as contiguous parameters."""
    from omnilm.model.hf import load_pretrained, save_pretrained
    from omnilm.train.optim import can_fuse

    weight = torch.nn.Parameter(torch.zeros(4, 3))
    assert can_fuse([weight]) and not can_fuse([weight, torch.nn.Parameter(torch.zeros(3, 4).t())])
    assert not can_fuse([torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))])
    folder = save_pretrained(small_model("gpt2", vocab_size=64), tmp_path / "gpt2")
    assert all(p.is_contiguous() for p in load_pretrained(folder).parameters())


def test_a_longer_prefix_unfreezes_part_of_a_frozen_module() -> None:
    """``{blocks.1: -1, blocks.1.attn: 0}``: the longest prefix decides, so attention trains inside a frozen block."""
    model = small_model("llama", vocab_size=64)
    freeze_modules(model, TrainConfig(max_steps=1, frozen_until={"blocks.1": -1, "blocks.1.attn": 0}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    block = {n for n, _ in model.named_parameters() if n.startswith("blocks.1.")}
    assert block and {n for n in block if n.startswith("blocks.1.attn.")} == trainable & block
    assert any(n.startswith("blocks.0.") for n in trainable)


def test_a_batch_that_reaches_only_frozen_modules_is_a_clear_error(tmp_path: Path) -> None:
    """A model part frozen for good (the decoder) and a batch whose loss passes through it alone: the trainer names
    the cause instead of autograd's "element 0 of tensors does not require grad"."""
    import pytest

    from omnilm.objectives.lm import causal_lm_loss
    from omnilm.train.trainer import Trainer

    class WithAdapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = small_model("llama", vocab_size=64)
            self.adapter = torch.nn.Linear(4, 4)  # trains, but this objective never reaches it

        def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: ANN003
            return self.decoder(ids, **kwargs)

    model = WithAdapter()
    config = TrainConfig(max_steps=1, lr=1e-3, batch_size=2, seq_len=8, progress=False, device="cpu",
                         frozen_until={"decoder": -1})
    trainer = Trainer(model, causal_lm_loss, SameBatch(torch.randint(0, 64, (2, 9))), config, tmp_path)
    with pytest.raises(RuntimeError, match="reaches no trainable parameter.*frozen_until: {'decoder': -1}"):
        trainer.train_step()
