"""The omni_encoders stage: a tiny text model becomes a Thinker whose encoders alone learn, the vision encoder dense
scene labels from fresh renders and the audio encoder CTC transcripts over the decoder's token embeddings; the run
resumes exactly, its batches are reproducible per step, evaluation layouts are never drawn, and the final folder is
a thinker folder an omni_sft stage starts from."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import small_model
from omnilm.model.hf import save_pretrained

VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "fullatt_block_indexes": [0]}
AUDIO = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}


@pytest.fixture
def text_model(tmp_path: Path, tokenizer) -> Path:  # noqa: ANN001
    model = small_model("llama", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id)
    return save_pretrained(model, tmp_path / "text", tokenizer=tokenizer)


def write_speech_records(folder: Path) -> Path:
    """Tones whose "words" follow from their pitch: a rising pair says "up", a falling pair "down"; one is a video's
    sound track (a narrated video's words are learnt alike)."""
    from omnilm.omni.audio import write_wav

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(8):
        pitches = (330, 880) if i % 2 == 0 else (880, 330)
        half = 6000 + 800 * i
        t = np.arange(half) / 16000
        tone = np.concatenate([np.sin(2 * np.pi * f * t) for f in pitches]) * 0.3
        write_wav(folder / f"tone{i}.wav", tone.astype(np.float32))
        part = {"type": "video", "video": "frames", "audio": f"tone{i}.wav"} if i == 5 else \
            {"type": "audio", "audio": f"tone{i}.wav"}
        records.append({"task": "transcribe", "text": "up up" if i % 2 == 0 else "down", "messages": [
            {"role": "user", "content": [part]},
            {"role": "assistant", "content": "ok"}]})
    records.append({"task": "transcribe", "messages": [{"role": "user", "content": "no audio"}]})  # skipped
    path = folder / "speech.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def stage(init_from: Path, steps: int, speech: Path | None = None, **options: object) -> object:
    from omnilm.train.stage import StageConfig

    return StageConfig.from_mapping({
        "name": "encoders", "type": "omni_encoders", "init_from": str(init_from),
        "data": {"speech": str(speech)} if speech else {},
        "options": {"audio": AUDIO, "vision": VISION} | options,
        "train": {"max_steps": steps, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "log_every": 1,
                  "checkpoint_every": 2, "progress": False, "device": "cpu", "warmup_steps": 0,
                  "schedule": "constant"}})


def test_only_the_encoders_learn_and_the_run_resumes_exactly(text_model: Path, tmp_path: Path) -> None:
    from omnilm.omni.build import thinker_from_decoder
    from omnilm.omni.thinker import load_thinker
    from omnilm.train.stage import run_stage

    speech = write_speech_records(tmp_path / "media")
    result = run_stage(stage(text_model, 6, speech), tmp_path / "whole")
    assert result.status == "complete"
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 6 and np.isfinite(losses).all()
    trained = load_thinker(result.final_dir)
    start, _ = thinker_from_decoder(text_model, AUDIO, VISION, seed=0)
    for name, before in start.state_dict().items():
        if name.startswith("decoder."):
            torch.testing.assert_close(trained.state_dict()[name], before, atol=0, rtol=0, msg=name)
    for tower in ("visual.", "audio_tower."):
        assert any(not torch.equal(trained.state_dict()[n], p) for n, p in start.state_dict().items()
                   if n.startswith(tower)), tower
    # Cut after 4 steps and resumed: the same weights and read-outs as the uninterrupted run.
    run_stage(stage(text_model, 4, speech), tmp_path / "cut")
    resumed = run_stage(stage(text_model, 6, speech), tmp_path / "cut", resume=True, force=True)
    for (name, a), b in zip(trained.state_dict().items(), load_thinker(resumed.final_dir).state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    from safetensors.torch import load_file

    from omnilm.train.omni_encoders import READOUT_FILE

    whole_head = load_file(str(result.final_dir / READOUT_FILE))
    for name, tensor in load_file(str(resumed.final_dir / READOUT_FILE)).items():
        torch.testing.assert_close(tensor, whole_head[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("task", ["scenes", "speech"])
def test_each_objective_learns(task: str, text_model: Path, tmp_path: Path) -> None:
    """A few dozen steps bring each objective's loss well under its start: the targets are learnable, not noise."""
    from omnilm.train.stage import run_stage

    speech = write_speech_records(tmp_path / "media")
    weights = {"scenes": float(task == "scenes"), "speech": float(task == "speech")}
    run_stage(stage(text_model, 40, speech, kinds=["colour"], task_weights=weights), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(("ctc_loss" in r) == (task == "speech") for r in records if "loss" in r)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])


def test_each_speech_source_is_a_task_of_its_own_weight(text_model: Path, tmp_path: Path) -> None:
    """A second speech source drawn alone (the others at weight 0) trains CTC on its records; a weight naming no
    task, or a source named like the scenes, is refused."""
    from omnilm.config import ConfigError
    from omnilm.train.stage import StageConfig, run_stage

    speech = write_speech_records(tmp_path / "media")
    words = tmp_path / "media" / "words.jsonl"
    words.write_text("".join(line + "\n" for line in speech.read_text().splitlines()[:3]))

    def two_sources(weights: dict, names: tuple[str, str] = ("speech", "words")) -> StageConfig:
        mapping = stage(text_model, 4, speech, kinds=["colour"], task_weights=weights).to_mapping()
        return StageConfig.from_mapping(mapping | {"data": {names[0]: str(speech), names[1]: str(words)}})

    run_stage(two_sources({"scenes": 0, "speech": 0, "words": 1}), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("ctc_loss" in r for r in records) == 4
    with pytest.raises(ConfigError, match="unknown task_weights"):
        run_stage(two_sources({"narration": 1}), tmp_path / "bad")
    with pytest.raises(ConfigError, match="may not be named 'scenes'"):
        run_stage(two_sources({}, ("scenes", "words")), tmp_path / "bad2")
    # Pauses around the words: the same run trains with them; a range that is not [lo, hi] is refused.
    paused = StageConfig.from_mapping(two_sources({"scenes": 0, "speech": 1, "words": 0}).to_mapping()
                                      | {"options": two_sources({}).options | {"silence": [0.1, 0.4]}})
    run_stage(paused, tmp_path / "paused")
    for bad in ([0.5, 0.1], [-1, 1], [1], "0.5"):
        broken = StageConfig.from_mapping(paused.to_mapping() | {"options": paused.options | {"silence": bad}})
        with pytest.raises(ConfigError, match="silence is"):
            run_stage(broken, tmp_path / "bad3")


def test_a_rotary_split_asked_for_builds_a_thinker_that_reads_text_as_the_decoder_did(text_model: Path,
                                                                                       tmp_path: Path) -> None:
    """``mrope_section`` changes only how media positions turn the rotary frequencies: text (three equal position
    components) gets the decoder's own logits whatever the split, while positions of three different components (a
    picture's, a video's) turn differently; the split is saved with the model; one that does not sum to head_dim / 2
    is refused."""
    from omnilm.config import ConfigError
    from omnilm.model.hf import load_pretrained
    from omnilm.omni.build import thinker_from_decoder
    from omnilm.omni.thinker import load_thinker
    from omnilm.train.stage import run_stage

    decoder = load_pretrained(text_model, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24))
    default, _ = thinker_from_decoder(text_model, AUDIO, VISION, seed=0)
    temporal, _ = thinker_from_decoder(text_model, AUDIO, VISION, seed=0, mrope_section=[4, 2, 2])
    assert default.config.text.mrope_section == (2, 3, 3) and temporal.config.text.mrope_section == (4, 2, 2)
    with torch.no_grad():
        expected = decoder(ids)
        for thinker in (default, temporal):
            logits = thinker.eval()(ids, torch.ones_like(ids))[..., : expected.shape[-1]]  # past it: the markers
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        # Positions whose three components differ (as a picture's or a video's do) turn the frequencies apart.
        grid = torch.stack([torch.arange(24) // 8 * 25, torch.arange(24) % 8 // 4, torch.arange(24) % 4])
        positions = grid[:, None].expand(3, 2, 24)
        assert not torch.allclose(default(ids, torch.ones_like(ids), position_ids=positions),
                                  temporal(ids, torch.ones_like(ids), position_ids=positions), atol=1e-3)
    with pytest.raises(ConfigError, match="mrope_section"):
        thinker_from_decoder(text_model, AUDIO, VISION, seed=0, mrope_section=[5, 2, 2])
    result = run_stage(stage(text_model, 1, mrope_section=[4, 2, 2]), tmp_path / "run")
    assert load_thinker(result.final_dir).config.text.mrope_section == (4, 2, 2)


def test_ctc_log_probabilities_are_each_audio_alone_over_the_token_embeddings(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    """The batched read-out equals, audio by audio, the encoder run on that audio alone scored against the decoder's
    embedding rows and the blank; padding frames past an audio's tokens are not read by the loss."""
    from omnilm.omni.audio import audio_features, load_audio, pack_features
    from omnilm.omni.build import thinker_from_decoder
    from omnilm.train.omni_encoders import EncoderReadouts, speech_collate, speech_examples

    model = small_model("llama", vocab_size=tokenizer.vocab_size)
    text = save_pretrained(model, tmp_path / "text", tokenizer=tokenizer)
    thinker, _ = thinker_from_decoder(text, AUDIO, VISION, seed=0)
    readouts = EncoderReadouts(thinker, 80).eval()
    with torch.no_grad():
        readouts.ctc_blank.normal_()
    config = stage(text, 1, write_speech_records(tmp_path / "media"))
    by_source, report = speech_examples(config, tokenizer, strict=False)
    examples = by_source["speech"]
    assert len(examples) == 8 and report.malformed == 1 and "speech.jsonl:9: a speech record" in report.problems[0]
    assert examples[1][1] == tokenizer.encode("down", special=False)
    assert examples[5][0] == tmp_path / "media" / "tone5.wav"  # the video's sound track
    batch = speech_collate(examples, {})([3, 0, 5])
    with torch.no_grad():
        out = readouts(batch)
        classes = torch.cat([thinker.decoder.tok_emb.weight, readouts.ctc_blank[None]])
        for column, index in enumerate([3, 0, 5]):
            alone = pack_features(*audio_features([load_audio(examples[index][0])], trim=True))
            expected = (thinker.audio_tower(*alone) @ classes.T).log_softmax(-1)
            torch.testing.assert_close(out[: len(expected), column], expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(lo=st.floats(0.0, 0.5), width=st.floats(0.0, 0.7), seed=st.integers(0, 100),
       indices=st.lists(st.integers(0, 7), min_size=1, max_size=4))
def test_silence_around_each_audio_is_drawn_per_batch_and_computed_from_the_padded_waveform(
        tokenizer, tmp_path_factory, lo: float, width: float, seed: int, indices: list[int]) -> None:  # noqa: ANN001
    """With ``silence`` each audio's features are those of the waveform with lo..hi seconds of zeros before and after
    it (not a copy of the unpadded frames); the same indices draw the same pauses (a resumed run), other seeds
    others, and no pause is outside the range."""
    from omnilm.omni.audio import HOP_LENGTH, SAMPLE_RATE, audio_features, load_audio
    from omnilm.train.omni_encoders import speech_collate, speech_examples

    folder = tmp_path_factory.mktemp("media")
    config = stage(folder, 1, write_speech_records(folder))
    examples = speech_examples(config, tokenizer, strict=False)[0]["speech"]
    hi = lo + width
    collate = speech_collate(examples, {}, (lo, hi), seed)
    batch, again = collate(indices), collate(indices)
    rng = random.Random(hash((seed, *indices)))
    draws = [round(rng.uniform(lo, hi) * SAMPLE_RATE) for _ in range(2 * len(indices))]
    torch.testing.assert_close(batch["input_features"], again["input_features"], atol=0, rtol=0)
    for row, index in enumerate(indices):
        wave = load_audio(examples[index][0])
        frames = int(batch["feature_attention_mask"][row].sum())
        extra = frames * HOP_LENGTH - len(wave)  # pause samples before + after, to within one hop
        assert 2 * lo * SAMPLE_RATE - 2 * HOP_LENGTH <= extra <= 2 * hi * SAMPLE_RATE + 2 * HOP_LENGTH
        # The pauses drawn as the stage draws them (seeded by the batch's indices, before then after, audio by audio).
        pauses = draws[2 * row: 2 * row + 2]
        padded = torch.cat([torch.zeros(pauses[0]), wave, torch.zeros(pauses[1])])
        expected = audio_features([padded], trim=True)[0][0]
        assert expected.shape[-1] == frames
        torch.testing.assert_close(batch["input_features"][row, :, :frames], expected, atol=1e-6, rtol=1e-6)
    if hi - lo > 0.2 and len(indices) > 1:
        other = speech_collate(examples, {}, (lo, hi), seed + 1)(indices)
        assert not torch.equal(other["feature_attention_mask"].sum(-1), batch["feature_attention_mask"].sum(-1)) or \
            not torch.equal(other["input_features"], batch["input_features"])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), cut=st.integers(0, 4), rank=st.integers(0, 1))
def test_scene_batches_are_reproducible_per_step_and_skip_excluded_layouts(seed: int, cut: int, rank: int) -> None:
    from omnilm.data.synth.omni import layout_key, scene_target_count
    from omnilm.omni.config import MediaBudget
    from omnilm.train.omni_encoders import SceneBatches

    budget = MediaBudget(image_max_pixels=112 * 112)
    whole = SceneBatches(2, 112, ["count", "digit"], budget, seed, rank)
    batches = [whole.next_batch() for _ in range(5)]
    resumed = SceneBatches(2, 112, ["count", "digit"], budget, seed, rank)
    resumed.load_state_dict({"step": cut})
    for expected in batches[cut:]:
        got = resumed.next_batch()
        assert got["task"] == "scenes"
        for key in ("pixel_values", "image_grid_thw", "targets"):
            assert torch.equal(got[key], expected[key])
    assert batches[0]["targets"].shape == (2 * 16, scene_target_count())
    # Layouts drawn by the first batch, excluded, never come back.
    import random

    first = SceneBatches(2, 112, ["count", "digit"], budget, seed, rank)
    drawn = {layout_key(s) for s in first.draw_scenes(random.Random(f"{seed}/{rank}/0"))}
    excluding = SceneBatches(2, 112, ["count", "digit"], budget, seed, rank, excluded=drawn)
    assert not drawn & {layout_key(s) for s in excluding.draw_scenes(random.Random(f"{seed}/{rank}/0"))}
