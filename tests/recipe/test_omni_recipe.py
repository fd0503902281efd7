"""The omni recipe's smoke preset end to end: synthesised speech, renders and videos, the text stages, and a
Thinker trained on them whose folder loads in transformers with equal logits; the report has its evaluations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from omnilm.cli import main


@pytest.fixture(scope="module")
def omni_smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng (Debian package) is not installed; .ci/run installs it")
    out = tmp_path_factory.mktemp("runs") / "omni-smoke"
    assert main(["run", "omni", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_omni_smoke_trains_a_thinker_with_evaluations(omni_smoke: Path) -> None:
    evals = json.loads((omni_smoke / "evals.json").read_text())["omni"]
    for name in ("spoken_qa", "text_qa", "spoken_qa_all", "image_qa", "video_qa"):
        assert 0.0 <= evals[name]["accuracy"] <= 1.0 and evals[name]["examples"] > 0, name
    assert evals["qa_trained"]["examples"] > 0  # the text evaluation of the earlier stage runs on the Thinker too
    # The video stages: fresh videos asking their timelines, on the Thinker re-split to 8/4/4 (the published
    # folder is theirs, and the speech stages after them read it).
    timeline = json.loads((omni_smoke / "evals.json").read_text())["videos"]["video_timeline"]
    assert timeline["examples"] > 0 and 0.0 <= timeline["accuracy"] <= 1.0
    # The video question asked as it is: scored by the answer its greedy reply ends with, after `videos` (digits
    # alone) and after `video_answers` (by way of the timeline), whose Thinker is the published one.
    for stage in ("videos", "video_answers"):
        asked = json.loads((omni_smoke / "evals.json").read_text())[stage]["video_qa"]
        assert asked["examples"] > 0 and 0.0 <= asked["reasoned"] <= 1.0
    assert json.loads((omni_smoke / "talker" / "stage.json").read_text())["upstream"]["stage video_answers"]
    from omnilm.omni.thinker import read_thinker_config

    assert read_thinker_config(omni_smoke / "final").text.mrope_section == (8, 4, 4)
    assert read_thinker_config(omni_smoke / "omni" / "final").text.mrope_section != (8, 4, 4)
    report = (omni_smoke / "report.md").read_text()
    assert "Thinker: decoder" in report and "video_qa" in report
    # The Talker reads its replies paced (its duration model is in the final folder) and the stage's speech
    # evaluation ran with it.
    assert (omni_smoke / "final" / "talker" / "pacing.json").is_file()
    speech = json.loads((omni_smoke / "evals.json").read_text())["token2wav"]["speech"]
    assert speech["examples"] > 0 and speech["wer"] >= 0
    assert {"wer_espeak", "wer_codec", "wer_token2wav", "wer_talker", "wer_espeak_reply"} <= set(speech)


def test_the_trained_thinker_loads_in_transformers(omni_smoke: Path) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omnilm.omni.thinker import load_thinker

    final = omni_smoke / "final"
    ours = load_thinker(final)
    theirs = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(final).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-4,
                                   rtol=1e-4)


def test_the_no_videos_preset_leaves_out_the_video_stages_and_nothing_else() -> None:
    from omnilm.recipe.recipe import load_recipe

    whole, fast = load_recipe("omni", "smoke"), load_recipe("omni", "smoke,no_videos")
    assert list(fast.stages) == list(whole.stages)
    assert [name for name in whole.stages if name.startswith("video")] == ["video_frames", "videos", "video_answers"]
    assert "skip" not in whole.stages["video_answers"]
    for name, stage in fast.stages.items():
        expected = whole.stages[name] | ({"skip": True} if name.startswith("video") else {})
        assert stage == expected, name


def test_the_quick_preset_trains_a_thinker_that_hears_and_sees_without_the_speech_out_part(
        tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng (Debian package) is not installed; .ci/run installs it")
    out = tmp_path / "quick"
    assert main(["run", "omni", "--preset", "quick,smoke", "--out", str(out)]) == 0
    # No assistant voice, no codec, none of the stages after `omni`; the published folder is the omni stage's.
    assert (out / "media" / "speech.jsonl").read_text() == ""
    assert not (out / "codec").exists()
    evals = json.loads((out / "evals.json").read_text())
    assert list(evals) == ["pretrain", "sft", "encoders", "omni"]
    assert set(evals["omni"]) == {"qa_trained", "spoken_qa", "text_qa", "image_qa"}
    assert all(evals["omni"][name]["examples"] > 0 for name in evals["omni"])
    from omnilm.model.hf import read_hf_tensors

    published, omni = read_hf_tensors(out / "final"), read_hf_tensors(out / "omni" / "final")
    assert published.keys() == omni.keys() and all(torch.equal(published[k], omni[k]) for k in omni)
