"""``omnilm rag index|query``, ``omnilm chat --rag`` and the open-book ``qa`` evaluation on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import small_model
from omnilm.cli import main
from omnilm.model.hf import save_pretrained
from omnilm.rag.index import RagIndex
from omnilm.rag.prompt import with_context

PASSAGES = [{"text": "Ann Lee was born in Lyon.", "person_id": 0},
            {"text": "Bob Stone works in Oslo.", "person_id": 1},
            {"text": "Cat Moss studied physics.", "person_id": 2}]


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    data = tmp_path / "passages.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PASSAGES))
    assert main(["rag", "index", "--data", str(data), "--out", str(tmp_path / "idx"), "--k1", "1.2"]) == 0
    return tmp_path / "idx"


@pytest.fixture
def chat_model(tmp_path: Path, tokenizer) -> Path:  # noqa: ANN001
    model = small_model("qwen2", vocab_size=tokenizer.vocab_size, max_seq_len=256)
    return save_pretrained(model, tmp_path / "tiny-chat", tokenizer=tokenizer)


def test_index_and_query(index_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert RagIndex.load(index_dir).config.k1 == 1.2
    capsys.readouterr()
    assert main(["rag", "query", "--index", str(index_dir), "--top-k", "2", "Where was Ann Lee born?",
                 "zebra"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["person_id"] for h in lines[0]["hits"]] == [0] and lines[1]["hits"] == []
    assert lines[0]["hits"][0]["text"] == PASSAGES[0]["text"] and lines[0]["hits"][0]["score"] > 0
    assert main(["rag", "query", "--index", str(index_dir), "--prompt", "Where does Bob Stone work?"]) == 0
    assert capsys.readouterr().out == ("Question: Where does Bob Stone work?\nPassages:\n"
                                         "[1] Bob Stone works in Oslo.\nQuestion: Where does Bob Stone work?\n")
    assert main(["rag", "query", "--index", str(index_dir.parent), "x"]) == 2  # not an index: a clear error


def test_chat_sends_each_question_with_its_passages(index_dir: Path, chat_model: Path, tokenizer) -> None:  # noqa: ANN001
    from omnilm.infer import SamplingParams, TextGenerator
    from omnilm.tokenizer.chat import IM_END, encode_chat

    turns = "Where was Ann Lee born?\nWhere does Bob Stone work?\n"
    out = subprocess.run([sys.executable, "-m", "omnilm.cli", "chat", "--model", str(chat_model), "--rag",
                          str(index_dir), "--top-k", "2", "--max-new-tokens", "8"], input=turns,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    generator = TextGenerator.from_pretrained(chat_model)
    generator.eos_ids = sorted(set(generator.eos_ids) | {tokenizer.token_to_id(IM_END)})
    params = SamplingParams(max_new_tokens=8, temperature=0.0)

    def reply(messages: list[dict[str, str]]) -> str:
        ids = encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
        return "".join(generator.stream(ids, params))

    first_q = {"role": "user", "content": "Where was Ann Lee born?"}
    first = reply(with_context([first_q], [PASSAGES[0]["text"]]))
    # The history keeps the first question as typed; only the new one carries passages.
    second = reply(with_context([first_q, {"role": "assistant", "content": first.strip() or "..."},
                                 {"role": "user", "content": "Where does Bob Stone work?"}], [PASSAGES[1]["text"]]))
    assert out.stdout == f"{first}\n{second}\n"


def test_open_book_qa_eval(index_dir: Path, chat_model: Path, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from omnilm.eval.qa import evaluate_qa
    from omnilm.eval.suite import run_evals
    from omnilm.model.hf import load_pretrained

    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "person_id": p,
                "split": "test"} for q, a, p in [("Where was Ann Lee born?", "Lyon", 0),
                                                 ("What did Cat Moss study?", "physics", 2),
                                                 ("Who is Zed Roe?", "I don't know.", 7)]]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"type": "qa", "data": str(data), "where": {"split": "test"}, "rag": {"index": str(index_dir), "top_k": 1}}
    result = run_evals(chat_model, {"open": spec, "closed": spec | {"rag": None}})
    assert result["open"]["recall_at_k"] == 1.0 and result["open"]["with_gold"] == 2
    assert "recall_at_k" not in result["closed"]
    model = load_pretrained(chat_model).eval()
    expected = [r | {"messages": with_context(r["messages"][:-1], texts) + r["messages"][-1:]}
                for r, texts in zip(records, [[PASSAGES[0]["text"]], [PASSAGES[2]["text"]], []], strict=True)]
    assert result["open"]["loss"] == pytest.approx(evaluate_qa(model, tokenizer, expected)["loss"], rel=1e-5)
    assert result["open"]["loss"] != pytest.approx(result["closed"]["loss"], rel=1e-3)
    with pytest.raises(Exception, match="rag must be"):
        run_evals(chat_model, {"bad": spec | {"rag": {"top_k": 1}}})
