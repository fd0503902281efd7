"""Generation against transformers' generate (greedy and beam search) and against itself (batching)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import small_model
from omnilm.infer import SamplingParams, beam_search, generate_ids
from omnilm.infer.generate import FINISHED
from omnilm.model.hf import save_pretrained

GREEDY = SamplingParams(temperature=0, max_new_tokens=40)


def run(model, prompts, params, **kwargs) -> list[list[int]]:
    """All tokens generated per prompt, without the FINISHED markers."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_ids(model, prompts, params, **kwargs):
        for row, token in enumerate(step.tolist()):
            if token != FINISHED:
                out[row].append(token)
    return out


@pytest.fixture
def pair(tmp_path, family):
    """The same weights as an omnilm model and as a transformers model."""
    model = small_model(family)
    save_pretrained(model, tmp_path)
    return model, AutoModelForCausalLM.from_pretrained(tmp_path).eval()


def hf_generate(hf, prompt, **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=1, **kwargs)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers(pair):
    model, hf = pair
    for seed in range(3):
        prompt = torch.randint(2, 320, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        expected = hf_generate(hf, prompt, max_new_tokens=40, min_new_tokens=40, eos_token_id=None)
        assert run(model, [prompt], GREEDY)[0] == expected


def test_beam_search_equals_transformers(pair):
    model, hf = pair
    ended_with_eos = 0
    for seed in range(4):
        prompt = torch.randint(2, 320, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        # An EOS the model is likely to produce (a token of its greedy path) exercises finished hypotheses.
        eos = run(model, [prompt], SamplingParams(temperature=0, max_new_tokens=12))[0][(0, 1, 3, 6)[seed]]
        expected = hf_generate(hf, prompt, num_beams=4, length_penalty=1.0, max_new_tokens=24, eos_token_id=eos)
        ours = beam_search(model, prompt, num_beams=4, max_new_tokens=24, eos_ids=[eos], length_penalty=1.0)
        if ours[-1] == eos:
            ended_with_eos += 1
            expected = expected[:expected.index(eos) + 1]
        assert ours == expected
    assert ended_with_eos >= 1


def test_left_padded_batch_generates_what_each_prompt_does_alone(family):
    model = small_model(family)
    prompts = [torch.randint(2, 320, (n,)).tolist() for n in (3, 11, 7)]
    batched = run(model, prompts, GREEDY, pad_id=0)
    assert batched == [run(model, [p], GREEDY)[0] for p in prompts]
    penalised = SamplingParams(temperature=0, max_new_tokens=20, repetition_penalty=1.3)
    assert run(model, prompts, penalised, pad_id=0) == [run(model, [p], penalised)[0] for p in prompts]


def test_eos_ends_a_sequence_and_is_yielded_once():
    model = small_model("llama")
    prompt = [5, 6, 7]
    free = run(model, [prompt], GREEDY)[0]
    eos = free[3]
    steps = [t.tolist() for t in generate_ids(model, [prompt, [9, 9]], GREEDY, eos_ids=[eos])]
    first = [row[0] for row in steps]
    end = free.index(eos) + 1
    assert first[:end] == free[:end]
    assert set(first[end:]) <= {FINISHED}


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = small_model("qwen2")
    prompt = [[3, 4, 5, 6]]
    sampled = SamplingParams(temperature=1.0, max_new_tokens=30, seed=123)
    assert run(model, prompt, sampled) == run(model, prompt, sampled)
    assert run(model, prompt, sampled) != run(model, prompt, SamplingParams(temperature=1.0, max_new_tokens=30,
                                                                                 seed=124))
    top1 = SamplingParams(temperature=0.7, top_k=1, max_new_tokens=30, seed=1)
    assert run(model, prompt, top1) == run(model, prompt, SamplingParams(temperature=0, max_new_tokens=30))


def test_context_limit_of_learned_positions_is_enforced():
    model = small_model("gpt2", max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        run(model, [[1] * 10], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        run(model, [[]], GREEDY)
