"""Passkey retrieval and needle-in-a-haystack documents, their scoring, and the lm-eval tasks of ``omnilm eval``."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import small_model
from omnilm.errors import UserError
from omnilm.eval.long_context import (
    KINDS,
    RetrievalConfig,
    cells_from_results,
    continuations,
    is_correct,
    perplexity_by_length,
    retrieval_docs,
    score_retrieval,
)
from omnilm.model.hf import save_pretrained


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_documents_fit_their_length_and_place_the_key_at_its_depth(tokenizer, kind):
    config = RetrievalConfig(kind=kind, lengths=(400, 800), depths=(0.0, 0.5, 1.0), samples=3, seed=1)
    docs = retrieval_docs(tokenizer, config)
    assert len(docs) == 2 * 3 * 3
    for doc in docs:
        n = len(tokenizer.encode(doc["context"], special=False))
        assert n == doc["tokens"] and 0.85 * doc["length"] <= n <= doc["length"]
        assert len(doc["answer"]) == 5 and doc["context"].count(doc["answer"]) == (2 if kind == "passkey" else 1)
        _, needle, question = KINDS[kind]
        needle = needle.format(key=doc["answer"]).strip()
        filler = len(doc["context"]) - len(needle) - len(question)
        assert abs(doc["context"].index(needle) / filler - doc["depth"]) < 0.15  # the key sits at its depth
        assert doc["context"].endswith("is")
    assert docs == retrieval_docs(tokenizer, config)  # fixed by the seed


def test_scoring_reads_the_key_first():
    assert is_correct(" 71432. Remember", "71432")
    assert not is_correct(" 7143", "71432") and not is_correct(" the 71432", "71432")
    with pytest.raises(UserError):
        RetrievalConfig(depths=(1.5,))


def test_batched_continuations_equal_a_token_by_token_brute_force(tokenizer):
    model = small_model("llama", vocab_size=tokenizer.vocab_size)
    docs = retrieval_docs(tokenizer, RetrievalConfig(lengths=(100, 140), depths=(0.3,), samples=2))
    texts = continuations(model, tokenizer, docs, batch_size=3, max_new_tokens=4)
    with torch.no_grad():
        for doc, text in zip(docs, texts, strict=True):
            ids = tokenizer.encode(doc["context"], special=False)
            for _ in range(4):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            assert text == tokenizer.decode(ids[-4:])
    metrics = score_retrieval(model, tokenizer, docs)
    assert set(metrics) == {"acc@100_d30", "acc@140_d30", "acc@100", "acc@140", "acc"}


def test_perplexity_by_length_is_the_mean_window_loss():
    model = small_model("qwen2")
    tokens = torch.randint(0, 320, (400,))
    got = perplexity_by_length(model, tokens, [16, 40], windows=3)
    with torch.no_grad():
        rows = tokens[:3 * 41].view(3, 41)
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    assert got["ppl@40"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert got["ppl@16"] > 1


def test_omnilm_eval_writes_cell_tasks_scores_them_like_the_direct_scorer_and_plots(tmp_path, tokenizer, capsys):
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from omnilm.cli import main

    model = small_model("llama", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id, init_std=0.02)
    folder = save_pretrained(model, tmp_path / "model", tokenizer=tokenizer)
    args = ["eval", "--model", str(folder), "--tasks", "omnilm_passkey", "--retrieval-lengths", "100,128",
            "--retrieval-depths", "0,1", "--retrieval-samples", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    from omnilm.eval.harness import flat_metrics

    cells = cells_from_results(flat_metrics(results))["passkey"]
    assert set(cells) == {(100, 0.0), (100, 1.0), (128, 0.0), (128, 1.0)}
    direct = score_retrieval(model, tokenizer, retrieval_docs(tokenizer, RetrievalConfig(
        lengths=(100, 128), depths=(0.0, 1.0), samples=2)))
    for (length, depth), value in cells.items():
        assert value == direct[f"acc@{length}_d{round(depth * 100)}"]
    assert (tmp_path / "out" / "passkey_heatmap.png").stat().st_size > 5_000
    assert main(args[:4] + ["omnilm_passkey_999_d0"] + args[5:]) == 2
    assert "not a cell" in capsys.readouterr().err
