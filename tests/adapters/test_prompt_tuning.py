"""Soft prompt tuning, checked against PEFT's PROMPT_TUNING on the Hugging Face export of the same model."""

import json

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, small_model
from omnilm.adapters import PromptTunedModel, SoftPrompt, trainable_parameters
from omnilm.config import ConfigError
from omnilm.model.hf import save_pretrained

TOL = dict(atol=1e-4, rtol=0)


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(5))


def test_prompt_equals_prepended_token_embeddings():
    # A prompt initialised from token ids must act exactly like those tokens written before the input.
    model = small_model("llama")
    tuned = PromptTunedModel(model, n_virtual_tokens=5, init_token_ids=[11, 12])
    x = ids()
    prefix = torch.tensor([11, 12, 11, 12, 11]).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), model(torch.cat((prefix, x), 1))[:, 5:], atol=1e-5, rtol=0)
        mask = torch.ones_like(x)
        torch.testing.assert_close(tuned(x, mask), tuned(x), atol=1e-5, rtol=0)


def test_random_init_is_scaled_like_the_embedding():
    model = small_model("qwen2")
    prompt = SoftPrompt(model.tok_emb, 400)
    assert prompt(3).shape == (3, 400, 64)
    ratio = prompt.embeddings.std() / model.tok_emb.weight.std()
    assert 0.9 < ratio < 1.1


def test_only_the_prompt_trains_and_loss_falls():
    model = small_model("gpt2")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = PromptTunedModel(model, n_virtual_tokens=4)
    trainable, total = trainable_parameters(tuned)
    assert trainable == 4 * 64 and total == model.num_params() + trainable
    x = ids(2, 16)
    opt = torch.optim.Adam([tuned.prompt.embeddings], lr=0.1)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(tuned(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_prompt_loads_in_peft_with_same_logits(tmp_path, family):
    model = small_model(family)
    save_pretrained(model, tmp_path / "base")
    tuned = PromptTunedModel(model, n_virtual_tokens=6)
    tuned.save_pretrained(tmp_path / "prompt", base_model_name_or_path="base")
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["token_dim"]) == ("PROMPT_TUNING", 6, 64)
    stored = load_file(tmp_path / "prompt" / "adapter_model.safetensors")
    assert list(stored) == ["prompt_embeddings"]

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "prompt").eval()
    torch.testing.assert_close(peft_model.get_prompt_embedding_to_save("default"), tuned.prompt.embeddings,
                               atol=0, rtol=0)
    x = ids()
    with torch.no_grad():
        theirs = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        ours = tuned(x)
    # PEFT returns logits for the virtual tokens too; compare the real positions.
    assert theirs.shape[1] == 6 + x.shape[1]
    torch.testing.assert_close(theirs[:, 6:], ours, **TOL)


def test_peft_prompt_loads_in_omnilm(tmp_path):
    model = small_model("qwen2")
    save_pretrained(model, tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft_model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(std=0.3)
    peft_model.save_pretrained(tmp_path / "prompt")

    tuned = PromptTunedModel.from_pretrained(model, tmp_path / "prompt")
    x = ids()
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=x).logits[:, 3:]
        torch.testing.assert_close(tuned(x), theirs, **TOL)

    tuned.save_pretrained(tmp_path / "again")
    again = PromptTunedModel.from_pretrained(small_model("qwen2"), tmp_path / "again")
    assert torch.equal(again.prompt.embeddings, tuned.prompt.embeddings)


def test_bad_prompt_folders_and_arguments_are_refused(tmp_path):
    model = small_model("llama")
    PromptTunedModel(model, 2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="expected"):
        PromptTunedModel.from_pretrained(small_model("llama", d_model=32), tmp_path)
    with pytest.raises(ConfigError, match="positive"):
        PromptTunedModel(model, 0)
    with pytest.raises(ConfigError, match="init_token_ids"):
        PromptTunedModel(model, 2, init_token_ids=[999])
    with pytest.raises(ConfigError, match="missing file"):
        PromptTunedModel.from_pretrained(model, tmp_path / "nowhere")
