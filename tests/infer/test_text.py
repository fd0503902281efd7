"""The text-level generator: tokenizer + model + streaming, checked against transformers."""

import torch
from transformers import AutoModelForCausalLM

from helpers import small_model
from omnilm.infer import SamplingParams, TextGenerator
from omnilm.model.hf import save_pretrained


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


def save_draft(folder, family, tokenizer):
    """A smaller, differently seeded model with the test tokenizer: a draft that often disagrees."""
    draft = small_model(family, seed=3, n_layer=1, d_model=32, n_head=2, vocab_size=tokenizer.vocab_size,
                        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return save_pretrained(draft, folder / "draft", tokenizer=tokenizer)


def test_speculative_text_equals_plain_greedy(tmp_path, model_dir, family, tokenizer):
    plain = TextGenerator.from_pretrained(model_dir)
    spec = TextGenerator.from_pretrained(model_dir, draft=save_draft(tmp_path, family, tokenizer), speculative_k=3)
    params = SamplingParams(temperature=0, max_new_tokens=32)
    expected = plain.generate("Alice was born in", params)[0]
    assert spec.generate("Alice was born in", params) == [expected]
    assert "".join(spec.stream("Alice was born in", params)) == expected
    stop = expected[5:8]
    stopped = spec.generate("Alice was born in", SamplingParams(temperature=0, max_new_tokens=32, stop=(stop,)))
    assert stopped == [expected[: expected.index(stop)]]
    # Batches and repetition penalty take the plain path.
    prompts = ["Bob", "The quick brown fox"]
    assert spec.generate(prompts, params) == plain.generate(prompts, params)
    penalised = SamplingParams(temperature=0, max_new_tokens=12, repetition_penalty=1.3)
    assert spec.generate("Bob", penalised) == plain.generate("Bob", penalised)
