"""``omnilm scaling sweep`` trains a real (tiny) IsoFLOP grid through the pre-training stage and resumes."""

import json
import random

import pytest
import yaml

from omnilm.cli import main
from omnilm.errors import UserError
from omnilm.scaling.runs import read_runs
from omnilm.scaling.sweep import parse_size, plan_sweep

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "big", "small", "red", "blue"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from omnilm.data.tokenize import tokenize_corpus
    from omnilm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("sweep-data")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "." for _ in range(300)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    train_bpe(docs, vocab_size=280).save(root / "tokenizer")
    tokenize_corpus([str(root / "corpus.jsonl")], str(root / "tokenizer"), root / "tokens", val_fraction=0.05,
                    workers=1, seed=0)
    config = {"name": "sweep", "type": "pretrain", "tokenizer": str(root / "tokenizer"),
              "model": {"preset": "tiny", "max_seq_len": 64}, "data": {"toy": str(root / "tokens")},
              "train": {"batch_size": 8, "seq_len": 32, "lr": 3e-3, "log_every": 5, "eval_batches": 2,
                        "progress": False, "device": "cpu"}}
    path = root / "stage.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_plan_sweep_sizes_steps_and_left_out_cells(template):
    values = yaml.safe_load(template.read_text())
    runs, notes = plan_sweep(values, ["32x1", "32x2"], [4e8, 1e7], vocab_size=280, min_steps=5)
    assert [r.name for r in runs] == ["32x1_c4.00e+08", "32x2_c4.00e+08"]
    assert len(notes) == 2 and all("left out" in note for note in notes)
    for run in runs:
        assert run.stage["model"]["d_model"] == int(run.size.split("x")[0])
        assert run.tokens == run.steps * 8 * 32
        assert 6 * run.n_params * run.tokens == pytest.approx(run.budget, rel=0.2)
    assert runs[0].n_params < runs[1].n_params < runs[1].n_params_total
    with pytest.raises(UserError, match="WIDTHxLAYERS"):
        parse_size("64-2")


def test_sweep_trains_appends_and_resumes(template, tmp_path, capsys):
    args = ["scaling", "sweep", "--recipe", str(template), "--sizes", "32x1", "32x2", "--budgets", "3e8", "6e8",
            "--min-steps", "5", "--out", str(tmp_path)]
    assert main(args) == 0
    records = read_runs(tmp_path)
    assert len(records) == 4
    assert all(r["val_loss"] < 6.0 and r["steps"] >= 5 for r in records)
    assert (tmp_path / "runs" / records[0]["name"] / "final" / "config.json").is_file()
    capsys.readouterr()
    assert main(args) == 0  # everything is in the table already: nothing retrains
    assert "0 run(s) trained, 4 already in the table" in capsys.readouterr().out
    assert len(read_runs(tmp_path)) == 4
