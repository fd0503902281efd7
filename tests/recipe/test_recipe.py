"""Recipes end to end: the demo's smoke preset, stage skipping on a re-run, chained stages, retention, and
reruns of exactly the jobs and stages whose settings or inputs changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from omnilm.cli import main
from omnilm.config import ConfigError
from omnilm.recipe.recipe import Recipe, builtin_recipes, deep_merge, load_recipe
from omnilm.recipe.runner import run_recipe


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "demo-smoke"
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_demo_smoke_produces_a_model_report_and_evals(smoke_run: Path) -> None:
    from transformers import AutoModelForCausalLM

    from omnilm.model.hf import load_pretrained

    report = (smoke_run / "report.md").read_text()
    for expected in ("## Stage `pretrain` (pretrain)", "![pretrain loss curve](pretrain/loss.png)", "completion",
                     "## Retention"):
        assert expected in report
    assert (smoke_run / "pretrain" / "loss.png").stat().st_size > 1000
    evals = json.loads((smoke_run / "evals.json").read_text())["pretrain"]
    assert 0 <= evals["completion"]["accuracy"] <= 1 and evals["completion"]["examples"] == 24 * 6
    assert evals["pretrain_val"]["val_loss"] < 6.2  # below uniform over 512 tokens: it learned something
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    ours = load_pretrained(smoke_run / "final", dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(smoke_run / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_rerun_skips_finished_work(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (smoke_run / "final" / "model.safetensors").read_bytes()
    assert main(["run", "--preset", "smoke", "--out", str(smoke_run)]) == 0
    out = capsys.readouterr().out
    assert "[bios] synth_bios: already done, skipped" in out
    assert "[pretrain] already complete (40 steps), skipped" in out
    assert (smoke_run / "final" / "model.safetensors").read_bytes() == before


def test_rag_sft_turns_on_copying_between_pretraining_and_sft(smoke_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    plain = json.loads((smoke_run / "summary.json").read_text())["stages"]
    assert list(plain) == ["pretrain", "sft", "dpo"]  # the demo leaves the copying stage out
    run = tmp_path / "rag"
    shutil.copytree(smoke_run, run)
    assert main(["run", "--preset", "rag_sft,smoke", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "[pretrain] already complete (40 steps), skipped" in out  # the demo's pre-training is reused
    stages = json.loads((run / "summary.json").read_text())["stages"]
    assert list(stages) == ["pretrain", "copying", "sft", "dpo"] and stages["copying"]["steps"] == 10
    sft_config = json.loads((run / "sft" / "stage_config.json").read_text())
    assert Path(sft_config["init_from"]) == run / "copying" / "final"
    copying = stages["copying"]["evals"]["copying"]
    assert 0 <= copying["copy_accuracy"] <= 1 and copying["first_half_loss"] > 0
    assert {"qa_heldout_rag", "qa_reading_rag", "copying"} <= set(stages["dpo"]["evals"])  # measured later too
    assert sft_config["options"]["length_groups"] == 3
    # The readers' open-book questions: the training half only, some left without their gold passage.
    readers = [json.loads(line) for line in (run / "rag_qa" / "qa.jsonl").read_text().splitlines()]
    assert {r["split"] for r in readers} == {"train"}
    unanswerable = [r for r in readers if r.get("unanswerable")]
    assert unanswerable and all(r["messages"][-1]["content"] == "I don't know." for r in unanswerable)
    assert len(unanswerable) < len(readers) / 4


def test_chained_stages_continue_from_the_previous_model(smoke_run: Path, tmp_path: Path) -> None:
    recipe = {
        "name": "chain",
        "stages": {
            "first": {"type": "pretrain", "tokenizer": str(smoke_run / "tokenizer"),
                      "model": {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 64},
                      "data": {"bios": str(smoke_run / "tokens")},
                      "train": {"max_steps": 6, "batch_size": 4, "seq_len": 32, "progress": False},
                      "evals": {"val": {"type": "val_loss", "data": str(smoke_run / "tokens"), "seq_len": 32}}},
            "second": {"type": "midtrain", "data": {"bios": str(smoke_run / "tokens")},
                       "train": {"max_steps": 4, "batch_size": 4, "seq_len": 32, "lr": 1e-3, "progress": False}},
        },
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    first_state = json.loads((tmp_path / "run" / "second" / "final" / "config.json").read_text())
    assert first_state["hidden_size"] == 64  # the second stage started from the first stage's model
    retention = (tmp_path / "run" / "retention.md").read_text()
    assert "after first | after second" in retention and "val (val_loss)" in retention


def test_recipe_errors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "demo" in builtin_recipes()
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        load_recipe("demo", preset="huge")
    with pytest.raises(ConfigError, match="no built-in recipe"):
        load_recipe("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "stagez": {}}))
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "unknown top-level key(s) ['stagez']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ stale results are rerun

TINY_TRAIN = {"batch_size": 2, "seq_len": 16, "lr": 1e-3, "log_every": 1, "checkpoint_every": 2,
              "progress": False, "device": "cpu"}


def tiny_recipe(**changes: dict) -> Recipe:
    """Synthesise, train a tokenizer, tokenise, then three chained stages of a few steps each; ``changes``
    are deep-merged over the jobs and stages (as a preset would be)."""
    values = {
        "name": "tiny",
        "prepare": {
            "bios": {"job": "synth_bios", "people": 6, "bios_per_person": 3, "seed": 0},
            "tokenizer": {"job": "tokenizer", "data": ["bios/train.jsonl"], "vocab_size": 300},
            "tokens": {"job": "tokenize", "data": ["bios/train.jsonl"], "tokenizer": "tokenizer",
                       "val_fraction": 0.1, "workers": 1},
        },
        "stages": {
            "a": {"type": "pretrain", "tokenizer": "tokenizer", "data": {"bios": "tokens"},
                  "model": {"preset": "tiny", "d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1,
                            "max_seq_len": 32},
                  "train": TINY_TRAIN | {"max_steps": 3}},
            "b": {"type": "midtrain", "data": {"bios": "tokens"}, "train": TINY_TRAIN | {"max_steps": 2}},
            "c": {"type": "midtrain", "data": {"bios": "tokens"}, "train": TINY_TRAIN | {"max_steps": 2}},
        },
    }
    values = deep_merge(values, {"prepare": changes.get("prepare", {}), "stages": changes.get("stages", {})})
    return Recipe(name="tiny", prepare=values["prepare"], stages=values["stages"], source="tiny recipe")


def run_logged(recipe: Recipe, out: Path) -> list[str]:
    lines: list[str] = []
    run_recipe(recipe, out, log=lines.append)
    return lines


def trained(lines: list[str]) -> list[str]:
    """The jobs and stages that ran (rather than being skipped), in order."""
    return [line.split("]")[0][1:] for line in lines if " -> " in line or ": training into " in line]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert trained(run_logged(tiny_recipe(), out)) == ["bios", "tokenizer", "tokens", "a", "b", "c"]
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run elsewhere: it must still recognise its own results."""
    import shutil

    shutil.copytree(run, tmp_path / "copy")
    return tmp_path / "copy"


def test_unchanged_recipe_skips_everything_even_after_the_run_folder_moved(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    before = (run / "final" / "model.safetensors").read_bytes()
    # Operational settings (logging, checkpoint interval) do not change what a stage trains.
    lines = run_logged(tiny_recipe(stages={"b": {"train": {"log_every": 5, "checkpoint_every": 1}}}), run)
    assert trained(lines) == []
    assert "[bios] synth_bios: already done, skipped" in lines and "[c] already complete (2 steps), skipped" in lines
    assert (run / "final" / "model.safetensors").read_bytes() == before


def test_changed_stage_reruns_itself_and_later_stages_only(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    a_model = (run / "a" / "final" / "model.safetensors").read_bytes()
    lines = run_logged(tiny_recipe(stages={"b": {"train": {"max_steps": 3}}}), run)
    assert trained(lines) == ["b", "c"]
    assert "[b] rerunning: train.max_steps: 2 → 3 (previous results moved to b.stale/)" in lines
    assert "[c] rerunning: upstream stage b changed (previous results moved to c.stale/)" in lines
    assert json.loads((run / "b" / "stage.json").read_text())["steps"] == 3
    assert (run / "a" / "final" / "model.safetensors").read_bytes() == a_model
    # The rerun trained from scratch: its log holds one line per step of the new budget, nothing appended.
    rows = [json.loads(line) for line in (run / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert json.loads((run / "b.stale" / "stage.json").read_text())["steps"] == 2
    assert trained(run_logged(tiny_recipe(stages={"b": {"train": {"max_steps": 3}}}), run)) == []


def test_changed_job_reruns_the_jobs_and_stages_that_read_it(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    lines = run_logged(tiny_recipe(prepare={"tokens": {"val_fraction": 0.2}}), run)
    # The tokenizer does not read the tokens; every stage trains on them.
    assert trained(lines) == ["tokens", "a", "b", "c"]
    assert "[tokens] tokenize: rerunning: val_fraction: 0.1 → 0.2" in lines
    assert "[a] rerunning: upstream job tokens changed (previous results moved to a.stale/)" in lines
    assert any(line.startswith("[b] rerunning: upstream job tokens changed; upstream stage a changed")
               for line in lines)

    lines = run_logged(tiny_recipe(prepare={"tokens": {"val_fraction": 0.2}, "bios": {"seed": 1}}), run)
    assert trained(lines) == ["bios", "tokenizer", "tokens", "a", "b", "c"]
    assert "[bios] synth_bios: rerunning: seed: 0 → 1" in lines
    assert "[tokenizer] tokenizer: rerunning: upstream job bios changed" in lines
    assert "[tokens] tokenize: rerunning: upstream job bios changed; upstream job tokenizer changed" in lines


def test_skipped_stage_is_left_out_and_the_next_continues_from_the_one_before(tiny_run: Path,
                                                                            tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    lines = run_logged(tiny_recipe(stages={"b": {"skip": True}}), run)
    assert "[b] skip: true, not run" in lines
    assert trained(lines) == ["c"]  # c now starts from a's model: another fingerprint
    assert ('[c] rerunning: init_from: "b/final" → "a/final"; now reads stage a; no longer reads stage b '
            "(previous results moved to c.stale/)") in lines
    assert "b" not in json.loads((run / "evals.json").read_text())
    # turned back on (as a preset would), b's finished work is current again and c goes back to reading it
    lines = run_logged(tiny_recipe(stages={"b": {"skip": False}}), run)
    assert trained(lines) == ["c"] and "[b] already complete (2 steps), skipped" in lines


def test_a_preset_leaves_out_jobs_and_evaluations_with_skip(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    val = {"type": "val_loss", "data": "tokens", "seq_len": 16, "batch_size": 2, "batches": 2}
    spare = {"job": "tokenizer", "data": ["bios/train.jsonl"], "vocab_size": 280, "skip": True}
    lines = run_logged(tiny_recipe(prepare={"spare": spare},
                                   stages={"a": {"evals": {"val": val, "off": val | {"skip": True}}}}), run)
    assert "[spare] skip: true, not run" in lines and not (run / "spare").exists()
    assert trained(lines) == []  # the other jobs and every stage are still current
    assert set(evaluated(lines).values()) == {"evaluating 1 eval set(s)"}
    assert all(set(results) == {"val"} for results in json.loads((run / "evals.json").read_text()).values())
    # turned on, the job runs and is read by nothing, so no stage changes
    lines = run_logged(tiny_recipe(prepare={"spare": spare | {"skip": False}}), run)
    assert trained(lines) == ["spare"] and (run / "spare" / "tokenizer.json").is_file()


def test_unfinished_stage_with_a_changed_config_starts_afresh(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from omnilm.model.hf import read_hf_tensors

    run = copy_run(tiny_run, tmp_path)
    # Make stage a look interrupted after its step-2 checkpoint: no stage.json, no final model.
    for stage in ("a", "b", "c"):
        (run / stage / "stage.json").unlink()
    shutil.rmtree(run / "a" / "final")
    shutil.rmtree(run / "a" / "checkpoints" / "step-0000003")
    changed = tiny_recipe(stages={"a": {"train": {"max_steps": 4}}})
    lines = run_logged(changed, run)
    assert "[a] rerunning: train.max_steps: 3 → 4 (previous checkpoints moved to a.stale/)" in lines
    # Bit-identical to a run of the changed recipe from nothing: the stale step-2 checkpoint was not resumed
    # (it was trained under a 3-step schedule).
    fresh = tmp_path / "fresh"
    run_logged(changed, fresh)
    a, b = read_hf_tensors(run / "final"), read_hf_tensors(fresh / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unfinished_stage_with_the_same_config_resumes(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from omnilm.model.hf import read_hf_tensors

    run = copy_run(tiny_run, tmp_path)
    (run / "a" / "stage.json").unlink()
    shutil.rmtree(run / "a" / "final")
    shutil.rmtree(run / "a" / "checkpoints" / "step-0000003")
    lines = run_logged(tiny_recipe(), run)
    # a continues from its step-2 checkpoint and ends where it did; what reads it is still current.
    assert trained(lines) == ["a"] and not any("rerunning" in line for line in lines)
    assert not (run / "a.stale").exists()
    a, b = read_hf_tensors(tiny_run / "a" / "final"), read_hf_tensors(run / "a" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def evaluated(lines: list[str]) -> dict[str, str]:
    """Per stage, what its evaluation line said (how many were computed, how many read back)."""
    return {line.split("]")[0][1:]: line.split("] ")[1] for line in lines if "] evaluating " in line}


def test_rerun_reads_back_current_evaluations_and_recomputes_stale_ones(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    val = {"type": "val_loss", "data": "tokens", "seq_len": 16, "batch_size": 2, "batches": 2}
    with_evals = {"a": {"evals": {"val": val}}}
    lines = run_logged(tiny_recipe(stages=with_evals), run)
    assert trained(lines) == []  # declaring evaluations does not change what a stage trains
    assert set(evaluated(lines).values()) == {"evaluating 1 eval set(s)"}
    first = json.loads((run / "evals.json").read_text())

    lines = run_logged(tiny_recipe(stages=with_evals), run)
    assert set(evaluated(lines).values()) == {"evaluating 0 eval set(s), 1 unchanged ones read back"}
    assert json.loads((run / "evals.json").read_text()) == first

    # A changed spec is recomputed everywhere; a retrained stage recomputes its own and its successors' results.
    more = {"a": {"evals": {"val": val | {"batches": 3}, "more": val | {"seed": 7}}}}
    assert set(evaluated(run_logged(tiny_recipe(stages=more), run)).values()) == {"evaluating 2 eval set(s)"}
    lines = run_logged(tiny_recipe(stages=more | {"b": {"train": {"max_steps": 3}}}), run)
    assert evaluated(lines) == {"a": "evaluating 0 eval set(s), 2 unchanged ones read back",
                                "b": "evaluating 2 eval set(s)", "c": "evaluating 2 eval set(s)"}
    # What was read back equals what computing afresh gives.
    fresh = tmp_path / "fresh"
    run_logged(tiny_recipe(stages=more | {"b": {"train": {"max_steps": 3}}}), fresh)
    assert json.loads((fresh / "evals.json").read_text()) == json.loads((run / "evals.json").read_text())
