import torch

from helpers import small_model
from omnilm.train.config import TrainConfig
from omnilm.train.optim import build_optimizer, decay_groups


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
    decay = [p for n, p in reference.named_parameters() if p.dim() >= 2 and "emb" not in n]
    other = [p for n, p in reference.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    theirs = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5}, {"params": other, "weight_decay": 0.0}],
                               lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, 64, (2, 9))
    for net, opt in ((model, ours), (reference, theirs)):
        for _ in range(3):
            net(ids).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
