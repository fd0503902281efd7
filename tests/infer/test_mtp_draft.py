"""Self-speculative decoding with multi-token heads: greedy output is the model's own greedy output, sampled
tokens follow the model's distribution (the acceptance rule of two-model speculative decoding), and heads that
learned their offsets get their proposals accepted."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from helpers import small_model
from infer.test_speculative import TINY_PROMPT, check_goodness_of_fit, greedy_reference
from omnilm.infer.mtp_draft import MTPDrafter
from omnilm.infer.sampling import SamplingParams, probabilities
from omnilm.infer.speculative import speculative_generate
from omnilm.model.mtp import MTPConfig, MultiTokenModel
from omnilm.objectives.mtp import multi_token_objective

VOCAB = 16


def counting_model(variant: str, steps: int = 150) -> MultiTokenModel:
    """A tiny model and heads trained on counting sequences (x, x+1, x+2, … mod VOCAB): every head can learn
    its offset exactly."""
    torch.manual_seed(0)
    decoder = small_model("llama", vocab_size=VOCAB, n_layer=1, d_model=32, n_head=2, init_std=0.02)
    model = MultiTokenModel(decoder, MTPConfig(n_heads=3, variant=variant)).train()
    objective = multi_token_objective((1.0, 1.0, 1.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, VOCAB, (16, 1))
        tokens = (starts + torch.arange(20)) % VOCAB
        loss, _ = objective(model, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("variant", ["independent", "sequential"])
def test_trained_heads_draft_accepted_tokens_and_greedy_is_unchanged(variant):
    model = counting_model(variant)
    prompt = [3, 4, 5]
    plain = greedy_reference(model.decoder, prompt, 24)
    assert plain == [(6 + i) % VOCAB for i in range(24)]  # the model learned to count
    params = SamplingParams(max_new_tokens=24, temperature=0)
    tokens, stats = speculative_generate(model.decoder, MTPDrafter(model.decoder, model.heads), prompt, params, k=3)
    assert tokens == plain
    assert stats["acceptance_rate"] > 0.9 and stats["target_forward_passes"] <= 1 + 24 // 4 + 1


@pytest.mark.parametrize("variant", ["independent", "sequential"])
@pytest.mark.parametrize("prompt", [[7], [5, 17, 3, 42]])
def test_greedy_equals_plain_greedy_with_untrained_heads(variant, prompt):
    torch.manual_seed(2)
    model = MultiTokenModel(small_model("llama"), MTPConfig(n_heads=2, variant=variant)).eval()
    plain = greedy_reference(model.decoder, prompt, 30)
    for k in (1, 2, 4):  # k beyond the number of heads: the heads offer what they have
        tokens, stats = speculative_generate(model.decoder, MTPDrafter(model.decoder, model.heads), prompt,
                                             SamplingParams(max_new_tokens=30, temperature=0), k=k)
        assert tokens == plain
        assert stats["proposed"] > 0


def test_stops_at_eos():
    model = counting_model("independent", steps=150)
    tokens, _ = speculative_generate(model.decoder, MTPDrafter(model.decoder, model.heads), [3, 4, 5],
                                     SamplingParams(max_new_tokens=30, temperature=0), k=3, eos_ids=[10])
    assert tokens == [6, 7, 8, 9, 10]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["independent", "sequential"])
def test_sampled_tokens_follow_the_model_distribution(variant):
    torch.manual_seed(3)
    decoder = small_model("llama", seed=0, vocab_size=12, init_std=0.05)
    model = MultiTokenModel(decoder, MTPConfig(n_heads=2, variant=variant)).eval()
    with torch.no_grad():  # heads whose guesses differ clearly from the model's next-token distribution
        for p in model.heads.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    params = SamplingParams(max_new_tokens=3, temperature=1.0)
    drafter = MTPDrafter(decoder, model.heads)
    outputs = []
    for seed in range(3000):
        tokens, _ = speculative_generate(decoder, drafter, TINY_PROMPT, params, k=2,
                                         generator=torch.Generator().manual_seed(seed))
        outputs.append(tokens)
    with torch.no_grad():
        first = probabilities(decoder(torch.tensor([TINY_PROMPT]))[0, -1], params)
        top = Counter(t[0] for t in outputs).most_common(1)[0][0]
        second = probabilities(decoder(torch.tensor([TINY_PROMPT + [top]]))[0, -1], params)
        top2 = Counter(t[1] for t in outputs if t[0] == top).most_common(1)[0][0]
        third = probabilities(decoder(torch.tensor([TINY_PROMPT + [top, top2]]))[0, -1], params)
    check_goodness_of_fit([t[0] for t in outputs], first)
    check_goodness_of_fit([t[1] for t in outputs if t[0] == top], second)
    # The third token comes from a head's proposal after an accepted one, or from a residual: still the model's.
    check_goodness_of_fit([t[2] for t in outputs if t[:2] == [top, top2]], third)


def test_generate_command_with_mtp_prints_the_plain_greedy_text(tmp_path, tokenizer, capsys):
    from omnilm.cli import main

    torch.manual_seed(4)
    decoder = small_model("llama", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    MultiTokenModel(decoder, MTPConfig(n_heads=2)).save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Alice was born", "--temperature", "0",
            "--max-new-tokens", "24"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--mtp", "--speculative-k", "2"]) == 0
    assert capsys.readouterr().out == plain and plain
    (tmp_path / "m" / "mtp.json").unlink()
    assert main(args + ["--mtp"]) == 2
    assert "no multi-token-prediction heads" in capsys.readouterr().err
