"""The speech codec: k-means (seeding, assignment, Lloyd), encode/decode, codec folders, the CLI, and the
log-mel reconstruction error on espeak-ng speech for a small and a large codebook."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnilm.data.synth import media
from omnilm.omni.audio import N_MELS, log_mel_spectrogram
from omnilm.omni.codec import (
    Codec,
    CodecConfig,
    assign,
    fit_codec,
    group_frames,
    kmeans,
    kmeans_plus_plus,
    wav_sources,
)
from omnilm.utils import kmeans as kmeans_module

needs_espeak = pytest.mark.skipif(not media.espeak_available(), reason="espeak-ng is not installed")


def _points(seed: int, n: int, d: int, grid: bool) -> torch.Tensor:
    """n points in d dimensions: Gaussian, or small integers (many exact duplicates and ties)."""
    generator = torch.Generator().manual_seed(seed)
    if grid:
        return torch.randint(-2, 3, (n, d), generator=generator).double()
    return torch.randn(n, d, generator=generator, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 80), d=st.integers(1, 6), k=st.integers(1, 12),
       grid=st.booleans())
def test_assign_equals_brute_force(seed: int, n: int, d: int, k: int, grid: bool) -> None:
    x = _points(seed, n, d, grid)
    centroids = _points(seed + 1, k, d, grid)
    codes, distances = assign(x, centroids)
    for i in range(n):  # the reference: every point against every centroid, one at a time
        each = torch.stack([((x[i] - c) ** 2).sum() for c in centroids])
        best = float(each.min())
        assert math.isclose(float(distances[i]), best, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(float(each[codes[i]]), best, rel_tol=1e-9, abs_tol=1e-9)
        if grid:  # exact arithmetic on small integers: ties go to the lowest index, as argmin does
            assert int(codes[i]) == int(torch.argmin(each))


def test_assign_blocks_agree_with_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    x, centroids = _points(0, 1000, 8, False), _points(1, 37, 8, False)
    whole = assign(x, centroids)
    monkeypatch.setattr(kmeans_module, "_DISTANCE_BLOCK", 37 * 3)  # three rows per block
    blocked = assign(x, centroids)
    assert torch.equal(whole[0], blocked[0]) and torch.allclose(whole[1], blocked[1])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 120), d=st.integers(1, 5), k=st.integers(1, 16),
       grid=st.booleans(), iterations=st.integers(0, 25))
def test_kmeans_objective_never_increases(seed: int, n: int, d: int, k: int, grid: bool, iterations: int) -> None:
    x = _points(seed, n, d, grid)
    result = kmeans(x, k, iterations=iterations, tolerance=0.0, seed=seed)
    history = result.history
    assert 1 <= len(history) <= iterations + 1
    for before, after in zip(history, history[1:], strict=False):
        assert after <= before * (1 + 1e-12) + 1e-12, history
    # The last entry is the objective of the returned centroids.
    assert math.isclose(result.objective, float(assign(x, result.centroids)[1].mean()), rel_tol=1e-9, abs_tol=1e-12)
    assert result.centroids.shape == (min(k, n), d)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 60), k=st.integers(1, 60))
def test_kmeans_plus_plus_picks_distinct_points(seed: int, n: int, k: int) -> None:
    x = _points(seed, n, 3, grid=True)
    k = min(k, n)
    seeds = kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed))
    rows = {tuple(row.tolist()) for row in x}
    picked = [tuple(row.tolist()) for row in seeds]
    assert all(p in rows for p in picked)
    # A point already chosen has weight 0, so seeds repeat only once every distinct point is a seed.
    assert len(set(picked)) == min(k, len(rows))


def test_kmeans_recovers_separated_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2, generator=generator)).double()
    result = kmeans(x, 4, seed=3)
    found = sorted(tuple(round(v) for v in row.tolist()) for row in result.centroids)
    assert found == [(0, 0), (0, 10), (10, 0), (10, 10)]
    assert result.objective < 0.05  # the blobs' own variance, 2 × 0.1²
    assert torch.equal(kmeans(x, 4, seed=3).centroids, result.centroids)  # deterministic for a seed


def test_group_frames_layout_and_odd_lengths() -> None:
    log_mel = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5)  # (n_mels 3, T 5)
    groups = group_frames(log_mel)
    assert groups.shape == (3, 6)
    assert torch.equal(groups[0], torch.cat([log_mel[:, 0], log_mel[:, 1]]))  # frame 2i first
    assert torch.equal(groups[2], torch.cat([log_mel[:, 4], log_mel[:, 4]]))  # the odd frame paired with itself
    assert group_frames(log_mel[:, :0]).shape == (0, 6)


def test_encode_decode_exact_on_codebook_points() -> None:
    generator = torch.Generator().manual_seed(0)
    codec = Codec(torch.randn(8, 2 * N_MELS, generator=generator))
    codes = torch.tensor([3, 0, 7, 7, 1])
    log_mel = codec.decode(codes)
    assert log_mel.shape == (N_MELS, 10)
    assert torch.equal(codec.encode(log_mel), codes)
    assert torch.equal(codec.decode(codec.encode(log_mel)), log_mel)
    assert codec.encode(log_mel[:, :9]).tolist() == [3, 0, 7, 7, 1]  # 9 frames: ceil(9 / 2) codes
    assert codec.encode(log_mel[:, :0]).shape == (0,) and codec.decode([]).shape == (N_MELS, 0)
    with pytest.raises(ValueError, match="codes must lie"):
        codec.decode([8])
    with pytest.raises(ValueError, match="log-mel"):
        codec.encode(torch.zeros(3, 4))


def test_encode_waveform_equals_encode_of_its_log_mel() -> None:
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    codec = fit_codec([wave], codes=8)
    codes = codec.encode(wave)
    assert codes.shape == (50,) and codes.dtype == torch.long  # 100 frames per second, 2 frames per code
    assert torch.equal(codes, codec.encode(log_mel_spectrogram(torch.from_numpy(wave))))
    assert codec.config.code_rate == 50.0


def test_save_load_round_trip(tmp_path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(1)
    waves = [(0.2 * rng.standard_normal(8000 + 800 * i)).astype(np.float32) for i in range(3)]
    codec = fit_codec(waves, codes=5, seed=2)
    codec.save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["codec.json", "codec.safetensors"]  # no temp files
    loaded = Codec.load(tmp_path / "c")
    assert loaded.config == codec.config and torch.equal(loaded.centroids, codec.centroids)
    assert loaded.stats["objective_history"] == codec.stats["objective_history"]
    assert torch.equal(loaded.encode(waves[0]), codec.encode(waves[0]))
    with pytest.raises(FileNotFoundError):
        Codec.load(tmp_path)
    with pytest.raises(ValueError, match="do not match"):
        Codec(torch.zeros(4, 2 * N_MELS), CodecConfig(codes=5))


def _tone(freq: float, seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * freq * t)


def test_cli_trains_from_a_folder_and_a_jsonl(tmp_path, capsys) -> None:  # noqa: ANN001
    from omnilm.cli import main

    folder = tmp_path / "audio"
    for i, freq in enumerate((220.0, 440.0, 880.0)):
        media.write_wav(folder / "sub" / f"t{i}.wav", _tone(freq, 0.5))
    assert main(["omni", "codec", "train", "--data", str(folder), "--codes", "6", "--out", str(tmp_path / "a"),
                 "--iterations", "10"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["codes"] == 6 and summary["files"] == 3 and summary["pairs"] == 3 * 25
    meta = json.loads((tmp_path / "a" / "codec.json").read_text())
    assert meta["stats"]["files"] == 3 and meta["config"]["codes"] == 6

    records = tmp_path / "records.jsonl"
    rows = [{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "audio/sub/t0.wav"}]}]},
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "audio/sub/t2.wav"},
                                                       {"type": "text", "text": "hi"}]}]},
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "audio/sub/t0.wav"}]}]}]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.name for p in wav_sources(records)] == ["t0.wav", "t2.wav"]
    assert main(["omni", "codec", "train", "--data", str(records), "--codes", "4", "--out", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"] == 2
    assert Codec.load(tmp_path / "b").codes == 4
    assert main(["omni", "codec", "train", "--data", str(tmp_path / "none"), "--codes", "4",
                 "--out", str(tmp_path / "c")]) == 2


TRAIN_SENTENCES = [
    "Megan Chang was born in Denver.", "Robert Green studied physics at Hodge University.",
    "William Sullivan works for Jackson, Hopkins and Moore.", "Kristen Turner majored in marine biology.",
    "Thomas Silva was born on the twenty third of January.", "The company of Erica Brown is based in Richfort.",
    "Which university did Daniel Lee attend?", "Where does Laura Evans work?",
]
HELD_OUT_SENTENCES = ["Anna Smith was born in Port Daniel.", "What did Megan Chang study?"]


@needs_espeak
def test_round_trip_error_on_espeak_speech_falls_with_more_codes() -> None:
    voices = [media.Voice("en-us", "m1", 170, 50), media.Voice("en-gb", "f2", 160, 60),
              media.Voice("en-us", "klatt", 180, 40)]
    train = [media.speak(text, voice) for text in TRAIN_SENTENCES for voice in voices]
    held_out = [media.speak(text, media.Voice("en-us", "m3", 165, 45)) for text in HELD_OUT_SENTENCES]
    errors = {}
    for k in (16, 256):
        codec = fit_codec(train, codes=k, iterations=30, seed=0)
        errors[k] = (codec.stats["train_mse"], float(np.mean([codec.reconstruction_error(w) for w in held_out])))
    print(f"\nlog-mel MSE per value (train, held-out voice and sentences): K=16 {errors[16][0]:.4f} / "
          f"{errors[16][1]:.4f}, K=256 {errors[256][0]:.4f} / {errors[256][1]:.4f}")
    assert errors[256][0] < errors[16][0] and errors[256][1] < errors[16][1]
    # The held-out error must stay well below the spread of the log-mel itself (a codebook that learned nothing
    # would be about as far off as the data's variance).
    spread = float(np.mean([log_mel_spectrogram(torch.from_numpy(w.astype(np.float32))).var() for w in held_out]))
    assert errors[256][1] < 0.25 * spread
