"""Attribute probes: the value-token mask is exact, and the batched scores equal a one-example-at-a-time count."""

from __future__ import annotations

import torch

from helpers import small_model
from omnilm.eval.attributes import AttributeExample, build_examples, score_examples
from omnilm.tokenizer import Tokenizer

SENTENCES = [("Alice Moreau was born in Lyon.", "Lyon", "birth_city"),
             ("Bob Lindqvist studied economics at Stockholm University.", "Stockholm University", "university"),
             ("Alice Moreau was born on 3 March 1961 in Lyon.", "3 March 1961", "birth_date"),
             ("She works for Airbus", "Airbus", "employer")]  # no terminator after the value


def records() -> list[dict]:
    out = []
    for person, (text, value, attribute) in enumerate(SENTENCES):
        start = text.index(value)
        out.append({"text": text, "value_start": start, "value_end": start + len(value), "attribute": attribute,
                    "person_id": person, "value": value})
    return out


def test_value_tokens_are_exactly_the_value(tokenizer: Tokenizer) -> None:
    for record, example in zip(records(), build_examples(records(), tokenizer), strict=True):
        text, end = record["text"], record["value_end"]
        assert tokenizer.decode(list(example.prompt_ids)) == text[:record["value_start"]].rstrip()
        assert tokenizer.decode(list(example.target_ids[:example.value_len])).strip() == record["value"]
        # The target adds exactly the terminator that follows the value (when there is one).
        assert tokenizer.decode(list(example.prompt_ids + example.target_ids)) == text[:end + 1]


def brute_force(model: torch.nn.Module, example: AttributeExample) -> tuple[float, bool]:
    """Loss over the value tokens, token by token on the unpadded sequence; greedy decoding from the prompt."""
    sequence = list(example.prompt_ids + example.target_ids)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([sequence]))[0].double(), dim=-1)
        total = 0.0
        for j in range(example.value_len):
            position = len(example.prompt_ids) + j
            total -= float(log_probs[position - 1, sequence[position]])
        generated = list(example.prompt_ids)
        for _ in example.target_ids:
            generated.append(int(model(torch.tensor([generated]))[0, -1].argmax()))
    return total / example.value_len, generated[len(example.prompt_ids):] == list(example.target_ids)


def test_scores_match_brute_force(tokenizer: Tokenizer) -> None:
    model = small_model("llama", vocab_size=tokenizer.vocab_size)
    examples = build_examples(records(), tokenizer)
    # One probe whose target is the model's own greedy continuation, so that "correct" is true at least once.
    prompt = examples[0].prompt_ids
    with torch.no_grad():
        greedy = list(prompt)
        for _ in range(3):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    examples.append(AttributeExample(9, "birth_city", prompt, tuple(greedy[len(prompt):]), 2))
    scores = score_examples(model, examples, pad_id=0, batch_size=3)  # padded batches of mixed lengths
    for example, (loss, correct) in zip(examples, scores, strict=True):
        expected_loss, expected_correct = brute_force(model, example)
        assert abs(loss - expected_loss) < 1e-4
        assert correct == expected_correct
    assert scores[-1][1] and not all(c for _, c in scores)
