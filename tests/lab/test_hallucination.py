"""Confidence measures of the hallucination study against a one-token-at-a-time computation."""

from __future__ import annotations

import math

import torch

from helpers import small_model
from omnilm.eval.attributes import AttributeExample
from omnilm.lab.knowledge.hallucination import first_token_confidence, greedy_completions
from omnilm.tokenizer import Tokenizer


def test_greedy_completion_and_confidence_match_brute_force(tokenizer: Tokenizer) -> None:
    model = small_model("llama", vocab_size=tokenizer.vocab_size)
    prompts = ["Alice Moreau was born in", "Bob Lindqvist studied economics at", "The quick"]
    examples = [AttributeExample(i, "birth_city", tuple(tokenizer.encode(p)), tuple(tokenizer.encode(" Lyon.")), 2)
                for i, p in enumerate(prompts)]
    period = set(tokenizer.encode("."))
    results = greedy_completions(model, tokenizer, examples, max_tokens=6)
    for example, (text, confidence) in zip(examples, results, strict=True):
        ids, log_ps = list(example.prompt_ids), []
        with torch.no_grad():
            for _ in range(6):
                log_probs = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), dim=-1)
                token = int(log_probs.argmax())
                ids.append(token)
                log_ps.append(float(log_probs[token]))
                if token in period or token == tokenizer.eos_id:
                    break
        assert text == tokenizer.decode(ids[len(example.prompt_ids):]).split(".")[0].strip()
        if ids[-1] in period and len(log_ps) > 1:
            log_ps = log_ps[:-1]  # the terminator does not count towards confidence in the value
        assert math.isclose(confidence, math.exp(sum(log_ps) / len(log_ps)), rel_tol=1e-4)
    for example, (max_prob, entropy) in zip(examples, first_token_confidence(model, examples, 0), strict=True):
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([list(example.prompt_ids)]))[0, -1].double(), dim=-1)
        assert math.isclose(max_prob, float(probs.max()), rel_tol=1e-4)
        assert math.isclose(entropy, float(-(probs * probs.log()).sum()), rel_tol=1e-4)
