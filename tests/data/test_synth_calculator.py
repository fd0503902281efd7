"""Calculator-tool conversations: the expression computes the problem's answer, records encode with tools, and
the held-out questions are not trained."""

import json
import random

from omnilm.data.chat_data import load_chat_examples
from omnilm.data.synth.arithmetic import ArithmeticConfig, make_problem
from omnilm.data.synth.calculator import CalculatorConfig, expression_of, write_calculator
from omnilm.tokenizer import format_chat
from omnilm.tools.calculator import evaluate


def test_the_expression_of_any_problem_gives_its_answer():
    rng = random.Random(1)
    config = ArithmeticConfig(max_operand=999, max_steps=4)
    for _ in range(500):
        problem = make_problem(rng, config)
        assert evaluate(expression_of(problem["messages"][-1]["content"])) == problem["answer"]


def test_files(tmp_path, tokenizer):
    stats = write_calculator(CalculatorConfig(problems=200, test_fraction=0.1, plain_fraction=0.5), tmp_path)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").open()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").open()]
    assert (len(train), len(test)) == (stats["train"], stats["test"]) == (180, 20)
    assert 50 < stats["plain"] < 130 and all("tools" in r for r in test)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    record = test[0]
    call = record["messages"][1]["tool_calls"][0]["function"]
    assert call["arguments"]["expression"] == record["expression"]
    assert record["messages"][2] == {"role": "tool", "content": str(record["answer"])}
    assert record["messages"][3]["content"] == f"The answer is {record['answer']}."
    assert record["text"] == format_chat(record["messages"], tools=record["tools"])
    examples = load_chat_examples([str(tmp_path / "test.jsonl")], tokenizer, max_len=4096, strict=True)
    trained = tokenizer.decode([i for i, m in zip(examples[0].ids, examples[0].mask, strict=True) if m])
    assert trained.startswith("<tool_call>\n") and trained.endswith(f"The answer is {record['answer']}.<|im_end|>")
    assert "<tools>" not in trained and "<tool_response>" not in trained
