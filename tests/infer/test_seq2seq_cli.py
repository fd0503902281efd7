"""``omnilm generate`` and ``omnilm info`` with encoder-decoder folders."""

import torch
import transformers

from omnilm.cli import main
from omnilm.model.hf_t5 import save_t5
from omnilm.model.t5 import T5, T5Config


def test_generate_prints_transformers_greedy_output(tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=32, head_dim=8, d_ff=48, n_layer=2, n_head=4,
                      pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                      decoder_start_token_id=tokenizer.pad_id)
    save_t5(T5(config).eval(), tmp_path, tokenizer)
    prompt = "Alice Moreau was born"
    assert main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tokenizer.encode(prompt, special=False) + [tokenizer.eos_id]])
    out = hf.generate(ids, do_sample=False, max_new_tokens=8)[0, 1:].tolist()
    out = out[:out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out
    assert printed == tokenizer.decode(out, skip_special_tokens=True) and printed
    assert main(["info", "--model", str(tmp_path)]) == 0
    assert "2+2 encoder+decoder layers" in capsys.readouterr().out
