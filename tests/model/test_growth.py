"""Upcycling and growth keep the function where they claim to: the grown model's logits equal the old ones."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import small_model
from omnilm.errors import UserError
from omnilm.model.growth import depth_order, grow_depth, grow_width
from omnilm.model.hf import save_pretrained
from omnilm.model.moe import MoE
from omnilm.model.upcycle import upcycle

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("experts, top_k, granularity", [(4, 2, 1), (4, 1, 1), (8, 4, 2), (6, 3, 3)])
def test_upcycled_model_computes_the_dense_function(tmp_path, family, experts, top_k, granularity):
    dense = small_model(family, d_ff=96)
    sparse = upcycle(dense, experts, top_k, granularity, seed=3)
    config = sparse.config
    assert (config.n_experts, config.n_experts_per_tok, config.expert_dim) == (experts, top_k, 96 // granularity)
    assert sum(isinstance(m, MoE) for m in sparse.modules()) == 2
    torch.testing.assert_close(logits(sparse), logits(dense), atol=1e-5, rtol=1e-5)
    # Tokens really spread over the experts (the router is not degenerate)...
    used = (sparse.blocks[0].mlp.stats.counts > 0).sum()
    assert used == experts if top_k < experts else True
    # ...and the folder is a Mixtral / Qwen2-MoE that transformers runs to the same logits.
    save_pretrained(sparse, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, logits(dense), atol=1e-4, rtol=0)


def test_upcycling_checks_its_arguments():
    with pytest.raises(UserError, match="multiple of the granularity"):
        upcycle(small_model("llama", d_ff=96), 6, 3, granularity=4)
    with pytest.raises(UserError, match="SwiGLU"):
        upcycle(small_model("gpt2"), 4, 2)
    with pytest.raises(UserError, match="--top-k 3 must be a multiple"):
        upcycle(small_model("llama", d_ff=96), 8, 3, granularity=2)


def test_depth_orders():
    assert depth_order(3, "interleave") == [0, 0, 1, 1, 2, 2]
    assert depth_order(4, "stack") == [0, 1, 2, 3, 0, 1, 2, 3]
    assert depth_order(4, "stack", overlap=1) == [0, 1, 2, 1, 2, 3]
    with pytest.raises(UserError, match="overlap 4"):
        depth_order(4, "stack", overlap=4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("mode, overlap", [("interleave", 0), ("stack", 0), ("stack", 1)])
def test_function_preserving_depth_growth(family, mode, overlap):
    model = small_model(family, n_layer=3)
    grown = grow_depth(model, mode, overlap, preserve=True)
    assert grown.config.n_layer == 6 - 2 * overlap
    torch.testing.assert_close(logits(grown), logits(model), atol=1e-5, rtol=1e-5)
    # The zeroed copies still learn: their output projections get gradients.
    grown.train()
    grown(IDS).logsumexp(-1).mean().backward()
    order = depth_order(3, mode, overlap)
    copy = grown.blocks[next(j for j, i in enumerate(order) if i in order[:j])]
    assert copy.attn.o_proj.weight.abs().sum() == 0 and copy.attn.o_proj.weight.grad.abs().sum() > 0


def test_depth_growth_of_an_moe_and_without_preservation():
    moe = small_model("llama", n_experts=4, d_ff=64)
    torch.testing.assert_close(logits(grow_depth(moe, "interleave")), logits(moe), atol=1e-5, rtol=1e-5)
    plain = grow_depth(small_model("llama"), "stack", preserve=False)
    assert not torch.allclose(logits(plain), logits(small_model("llama")), atol=1e-2)


@pytest.mark.parametrize("family, d_model, d_ff", [("llama", 96, 256), ("qwen2", 80, None), ("llama", None, 200),
                                                   ("gpt2", None, 320)])
def test_function_preserving_width_growth(tmp_path, family, d_model, d_ff):
    model = small_model(family)
    grown = grow_width(model, d_model, d_ff, seed=5)
    assert grown.config.d_model == (d_model or 64) and grown.config.dim_per_head == 16
    torch.testing.assert_close(logits(grown), logits(model), atol=1e-5, rtol=1e-4)
    if family != "gpt2":  # the grown folder is still a model transformers runs identically
        save_pretrained(grown, tmp_path)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(IDS).logits, logits(model), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="cannot shrink"):
        grow_width(model, d_model=32)


def test_gpt2_width_growth_of_d_model_is_refused():
    with pytest.raises(UserError, match="LayerNorm"):
        grow_width(small_model("gpt2"), d_model=96)


def test_upcycle_and_grow_commands_and_the_recipe_job(tmp_path, capsys):
    from omnilm.cli import main
    from omnilm.model.hf import load_pretrained
    from omnilm.recipe.jobs import run_job

    dense = small_model("llama", d_ff=96)
    save_pretrained(dense, tmp_path / "dense")
    assert main(["upcycle", "--model", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2",
                 "--granularity", "2", "--out", str(tmp_path / "moe")]) == 0
    assert "experts 4" in capsys.readouterr().out
    assert main(["info", "--model", str(tmp_path / "moe")]) == 0
    assert "4 experts (top-2)" in capsys.readouterr().out
    moe = load_pretrained(tmp_path / "moe")
    assert moe.config.n_experts == 4 and moe.config.expert_dim == 48
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=1e-5)
    assert main(["grow", "--model", str(tmp_path / "moe"), "--depth", "interleave",
                 "--out", str(tmp_path / "deep")]) == 0
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "deep")), logits(dense), atol=1e-5, rtol=1e-5)
    assert main(["grow", "--model", str(tmp_path / "dense"), "--out", str(tmp_path / "x")]) == 2
    assert main(["upcycle", "--model", str(tmp_path / "dense"), "--experts", "3", "--top-k", "2",
                 "--granularity", "2", "--out", str(tmp_path / "y")]) == 2
    assert "multiple of the granularity" in capsys.readouterr().err
    result, _ = run_job("wide", {"job": "grow", "model": "dense", "method": "width", "d_ff": 128}, tmp_path,
                        log=lambda _: None)
    assert result["max_logit_change"] < 1e-4 and result["params_after"] > result["params_before"]
    assert load_pretrained(tmp_path / "wide").config.ff_dim == 128
    with pytest.raises(UserError, match=r"unknown option\(s\) \['width'\]"):
        run_job("bad", {"job": "grow", "model": "dense", "method": "width", "width": 3}, tmp_path,
                log=lambda _: None)
