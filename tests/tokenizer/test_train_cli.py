"""``omnilm tokenizer train`` and ``omnilm tokenizer eval`` on tiny corpora, checked against transformers."""

import json

import pytest
from tokenizers import normalizers
from transformers import AutoTokenizer

from helpers import CORPUS
from omnilm.cli import main
from omnilm.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer
from omnilm.tokenizer.evaluate import evaluate_tokenizer

TXT = "Plain text file.\nÜnïcödé ✓ 🙂 and tabs\tand numbers 2024.\n"
TEXTS = CORPUS * 5 + [TXT]  # the corpus folder's documents in reading order: docs.jsonl, then note.txt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(CORPUS * 5)]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "note.txt").write_text(TXT, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "tok"
    code = main(["tokenizer", "train", "--data", str(corpus / "docs.jsonl"), str(corpus / "note.txt"),
                 "--vocab-size", "300", "--out", str(out), "--min-frequency", "2"])
    assert code == 0
    return out


def test_train_writes_a_folder_transformers_loads(trained):
    ours = Tokenizer.from_dir(trained)
    assert ours.vocab_size == 300
    hf = AutoTokenizer.from_pretrained(trained)
    assert hf.chat_template == CHAT_TEMPLATE
    vocab = hf.get_vocab()
    for token in SPECIAL_TOKENS:
        assert token in vocab and ours.token_to_id(token) == vocab[token]
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)


def test_train_prints_a_summary(corpus, tmp_path, capsys):
    code = main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "280", "--out", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert code == 0
    assert "vocab size 280" in out and "21 documents" in out and "2 files" in out


def test_eval_prints_metrics_that_transformers_confirms(trained, corpus, capsys):
    code = main(["tokenizer", "eval", "--tokenizer", str(trained), "--data", str(corpus)])
    out = capsys.readouterr().out
    assert code == 0
    hf = AutoTokenizer.from_pretrained(trained)
    ids = [hf.encode(t, add_special_tokens=False) for t in TEXTS]
    n_tokens = sum(map(len, ids))
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    distinct = len({i for seq in ids for i in seq})
    rows = dict(line.split("  ", 1) for line in out.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["documents"] == f"{len(TEXTS)}"
    assert rows["tokens"] == f"{n_tokens:,}" and rows["bytes"] == f"{n_bytes:,}"
    assert rows["bytes per token"] == f"{n_bytes / n_tokens:.3f}"
    assert rows["vocab use"] == f"{distinct / len(hf):.1%} ({distinct} distinct tokens)"
    assert rows["round-trip failures"] == "0"


def test_eval_fails_on_a_lossy_tokenizer(trained, corpus, tmp_path, capsys):
    lossy = Tokenizer.from_dir(trained)
    lossy.backend.normalizer = normalizers.Lowercase()
    lossy.save(tmp_path / "lossy")
    metrics = evaluate_tokenizer(lossy, TEXTS)
    assert metrics["round_trip_failures"] == len(TEXTS)  # every document has a capital letter
    first = metrics["failure_examples"][0]
    assert first["document"] == 0 and first["decoded"] == CORPUS[0].lower()[:80] + "..."
    assert len(metrics["failure_examples"]) == 5
    code = main(["tokenizer", "eval", "--tokenizer", str(tmp_path / "lossy"), "--data", str(corpus / "note.txt")])
    out = capsys.readouterr().out
    assert code == 1 and "round-trip failures  1" in out and "plain text file." in out


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--data", "{corpus}/docs.jsonl", "--vocab-size", "100", "--out", "{tmp}/t"], "too small"),
    (["train", "--data", "{tmp}/missing.jsonl", "--vocab-size", "300", "--out", "{tmp}/t"], "no such file"),
    (["train", "--data", "{corpus}/docs.jsonl", "--vocab-size", "300", "--out", "{tmp}/t", "--text-field", "body"],
     "no documents"),
    (["eval", "--tokenizer", "{tmp}/none", "--data", "{corpus}/note.txt"], "tokenizer.json"),
])
def test_errors_exit_2_with_a_clear_message(args, message, corpus, tmp_path, capsys):
    args = [a.format(corpus=corpus, tmp=tmp_path) for a in args]
    assert main(["tokenizer", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
