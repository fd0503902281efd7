"""The text-level generator: tokenizer + model + streaming, checked against transformers."""

import torch
from transformers import AutoModelForCausalLM

from omnilm.infer import SamplingParams, TextGenerator


def test_greedy_text_equals_transformers_decoded(model_dir, tokenizer):
    generator = TextGenerator.from_pretrained(model_dir)
    prompt = "Alice was born in"
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32)
    expected = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    params = SamplingParams(temperature=0, max_new_tokens=32)
    assert generator.generate(prompt, params) == [expected]
    pieces = list(generator.stream(prompt, params))
    assert "".join(pieces) == expected and len(pieces) > 1  # streamed piece by piece


def test_batched_text_equals_single_and_beam_runs(model_dir):
    generator = TextGenerator.from_pretrained(model_dir)
    prompts = ["Bob", "The quick brown fox jumps", "café 🙂"]
    params = SamplingParams(temperature=0, max_new_tokens=16)
    assert generator.generate(prompts, params) == [generator.generate(p, params)[0] for p in prompts]
    beams = generator.generate(prompts, SamplingParams(num_beams=3, max_new_tokens=8))
    assert len(beams) == 3 and all(isinstance(b, str) for b in beams)


def test_stop_strings_end_generation(model_dir):
    generator = TextGenerator.from_pretrained(model_dir)
    free = generator.generate("Alice", SamplingParams(temperature=0, max_new_tokens=24))[0]
    stop = free[5:8]
    assert stop.strip(), "the free continuation should have some text to stop at"
    cut = generator.generate("Alice", SamplingParams(temperature=0, max_new_tokens=24, stop=(stop,)))[0]
    assert cut == free[: free.index(stop)]
