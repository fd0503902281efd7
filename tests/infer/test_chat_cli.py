"""``omnilm chat`` reading user turns from stdin: replies equal transformers' greedy generation on the same chat."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from omnilm.tokenizer.chat import IM_END, format_chat


def reference_reply(model_dir, tokenizer, messages: list[dict[str, str]], max_new_tokens: int) -> str:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tokenizer.encode(format_chat(messages, add_generation_prompt=True))])
    stops = [tokenizer.token_to_id(IM_END), tokenizer.eos_id]
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_id)[0, ids.shape[1]:].tolist()
    return tokenizer.decode([t for t in out if t not in stops])


@pytest.mark.parametrize("family", ["qwen2"])
def test_chat_replies_follow_the_conversation(model_dir, tokenizer) -> None:  # noqa: ANN001
    turns = "Hello there\n/system Be brief.\nHow are you?\n/reset\nHello there\n"
    out = subprocess.run([sys.executable, "-m", "omnilm.cli", "chat", "--model", str(model_dir),
                          "--max-new-tokens", "12"], input=turns, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first = reference_reply(model_dir, tokenizer, [{"role": "user", "content": "Hello there"}], 12)
    second = reference_reply(model_dir, tokenizer, [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "How are you?"}], 12)
    # /reset keeps the system message set by /system and forgets the turns.
    third = reference_reply(model_dir, tokenizer, [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hello there"}], 12)
    assert out.stdout == f"{first}\n{second}\n{third}\n"


@pytest.mark.parametrize("family", ["qwen2"])
def test_chat_starts_with_a_banner_on_stderr(model_dir) -> None:  # noqa: ANN001
    out = subprocess.run([sys.executable, "-m", "omnilm.cli", "chat", "--model", str(model_dir)], input="/quit\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # The model's name is its folder's; stdout stays for replies only (none were asked for here).
    assert "omnilm chat · qwen2-model (context 128) · /reset /system TEXT /quit\n" in out.stderr
    assert out.stdout == ""
