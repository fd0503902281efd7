"""Multi-token prediction heads: alignment of every head's targets, the loss, and the folder layout (a standard
model folder that transformers loads, plus the heads' side files)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from helpers import small_model
from omnilm.config import ConfigError
from omnilm.model.hf import load_pretrained
from omnilm.model.mtp import MTP_CONFIG_FILE, MTP_WEIGHTS_FILE, MTPConfig, MultiTokenModel, load_heads
from omnilm.objectives.mtp import multi_token_objective

TOKENS = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(0))


def mtp_model(variant: str, n_heads: int = 3, family: str = "llama") -> MultiTokenModel:
    torch.manual_seed(1)
    return MultiTokenModel(small_model(family), MTPConfig(n_heads=n_heads, variant=variant)).eval()


def head_logits_one_position(model: MultiTokenModel, hidden: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """Head k's logits at position t, computed alone: the chain of heads 1..k on h_t (and tokens t+1..t+k)."""
    z = hidden[:, t]
    for j, head in enumerate(model.heads.heads[:k], start=1):
        embedding = model.decoder.tok_emb(TOKENS[:, t + j]) if model.heads.sequential else None
        z = head(z, embedding)
    return model.decoder.lm_head(model.heads.heads[k - 1].norm_out(z))


@pytest.mark.parametrize("variant", ["independent", "sequential"])
def test_each_head_predicts_its_own_offset_and_the_loss_weighs_them(variant):
    model = mtp_model(variant)
    inputs = TOKENS[:, :-1]
    with torch.no_grad():
        logits, heads = model(inputs, with_heads=True, tokens=TOKENS)
        hidden = model.decoder.hidden_states(inputs)
        torch.testing.assert_close(logits, model.decoder(inputs))
        T = inputs.shape[1]
        for k, head in enumerate(heads, start=1):
            assert head.shape == (2, T - k, 320)
            for t in (0, T - k - 1):
                torch.testing.assert_close(head[:, t], head_logits_one_position(model, hidden, t, k))
    objective = multi_token_objective((1.0, 0.5, 0.25))
    loss, logs = objective(model, TOKENS)
    expected = F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())
    for k, weight in enumerate((1.0, 0.5, 0.25), start=1):
        head_loss = F.cross_entropy(heads[k - 1].flatten(0, 1), TOKENS[:, 1 + k:].flatten())
        assert logs[f"mtp_loss_{k}"] == pytest.approx(head_loss.item(), rel=1e-5)
        expected = expected + weight * head_loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())


def test_independent_heads_do_not_read_tokens_and_sequential_ones_do():
    model = mtp_model("independent")
    with torch.no_grad():
        _, heads = model(TOKENS[:, :-1], with_heads=True)  # no tokens needed
        other = TOKENS.clone()
        other[:, -2] = (other[:, -2] + 1) % 320  # the last input token
        sequential = mtp_model("sequential")
        _, a = sequential(TOKENS[:, :-1], with_heads=True, tokens=TOKENS)
        _, b = sequential(other[:, :-1], with_heads=True, tokens=other)
    # Only head 1's last position (t = T-2) reads that token (t+1 = T-1); the trunk before it cannot see it.
    assert not torch.allclose(a[0][:, -1], b[0][:, -1]) and torch.allclose(a[0][:, :-1], b[0][:, :-1])
    with pytest.raises(ValueError, match="need the tokens"):
        sequential(TOKENS[:, :-1], with_heads=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folder_is_a_standard_model_plus_side_files(tmp_path, family):
    model = mtp_model("sequential", n_heads=2, family=family)
    model.save_pretrained(tmp_path)
    assert (tmp_path / MTP_CONFIG_FILE).is_file() and (tmp_path / MTP_WEIGHTS_FILE).is_file()
    with torch.no_grad():
        expected, expected_heads = model(TOKENS[:, :-1], with_heads=True, tokens=TOKENS)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(hf(TOKENS[:, :-1]).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_pretrained(tmp_path)(TOKENS[:, :-1]), expected, atol=0, rtol=0)
        again = MultiTokenModel.from_pretrained(tmp_path)
        _, heads = again(TOKENS[:, :-1], with_heads=True, tokens=TOKENS)
    for ours, theirs in zip(heads, expected_heads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    state = MultiTokenModel.read_state(tmp_path)
    assert set(state) == set(model.state_dict()) - ({"decoder.lm_head.weight"} if family == "gpt2" else set())
    assert load_heads(tmp_path, load_pretrained(tmp_path)).mtp == MTPConfig(n_heads=2, variant="sequential")


def test_bad_mtp_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="2 entries for 3 heads"):
        MTPConfig(n_heads=3, loss_weights=(1.0, 0.5))
    with pytest.raises(ConfigError, match="variant"):
        MTPConfig(variant="parallel")
    with pytest.raises(ConfigError, match="no multi-token-prediction heads"):
        load_heads(tmp_path, small_model("llama"))
