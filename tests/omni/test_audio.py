"""The audio side of the Thinker against transformers (the oracle): Whisper features, Qwen2.5-Omni's padded batch
and audio encoder; plus the encoder's chunk independence, resampling and WAV files."""

from __future__ import annotations

import math
import wave
from dataclasses import asdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

from omnilm.omni.audio import (
    MAX_SAMPLES,
    AudioEncoder,
    audio_features,
    audio_token_lengths,
    load_audio,
    log_mel_spectrogram,
    mel_filter_bank,
    pack_features,
    read_wav,
    resample,
    write_wav,
)
from omnilm.omni.config import AudioEncoderConfig

TOL = dict(atol=1e-4, rtol=0)
SR = 16_000


def sine(n: int, freq: float, rate: int = SR, phase: float = 0.0) -> np.ndarray:
    t = np.arange(n) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def chirp(n: int, f0: float = 100.0, f1: float = 7000.0) -> np.ndarray:
    """A linear sweep from f0 to f1 Hz over the whole signal."""
    t = np.arange(n) / SR
    duration = n / SR
    return (0.3 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * duration)))).astype(np.float32)


def noise(n: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Front end
# ----------------------------------------------------------------------------------------------------------------


def test_mel_filter_bank_matches_whisper_filters():
    ours = mel_filter_bank(128, 400, 16000, 0.0, 8000.0)
    theirs = hf_mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
                                sampling_rate=16000, norm="slaney", mel_scale="slaney")
    assert ours.shape == (201, 128)
    torch.testing.assert_close(ours, torch.from_numpy(theirs), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [400, 1599, 16000, 16123, 3 * SR + 77])
@pytest.mark.parametrize("kind", ["noise", "sine", "chirp"])
def test_log_mel_spectrogram_matches_whisper_feature_extractor(n, kind):
    x = {"noise": lambda: noise(n, seed=n), "sine": lambda: sine(n, 440.0), "chirp": lambda: chirp(n)}[kind]()
    extractor = WhisperFeatureExtractor(feature_size=128)
    expected = extractor(x, sampling_rate=SR, padding="do_not_pad", return_tensors="pt")["input_features"][0]
    ours = log_mel_spectrogram(torch.from_numpy(x))
    assert ours.shape == (128, n // 160) == expected.shape
    torch.testing.assert_close(ours, expected, **TOL)
    # Leading dimensions are independent audios, each normalised by its own loudest bin.
    pair = log_mel_spectrogram(torch.stack([torch.from_numpy(x), 0.01 * torch.from_numpy(noise(n, seed=1))]))
    torch.testing.assert_close(pair[0], expected, **TOL)


def batch_of_audios() -> list[np.ndarray]:
    click = noise(SR // 2, seed=3) * 0.01
    click[-60:] = 0.9  # loudest at its very end: the normalisation must see the frames past the mask
    return [
        sine(800, 1000.0),  # 50 ms
        noise(SR, seed=0),  # exactly 100 frames
        chirp(2 * SR + 8017),  # more than one encoder chunk, not a whole number of frames
        click,
        np.zeros(1000, dtype=np.float32),  # silence
    ]


def test_audio_features_match_qwen2_5_omni_processor_batch():
    """The processor calls WhisperFeatureExtractor(chunk_length=300) with padding="max_length"."""
    audios = batch_of_audios()
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=300)
    expected = extractor(audios, sampling_rate=SR, padding="max_length", return_attention_mask=True,
                         return_tensors="pt")
    features, mask = audio_features(audios)
    assert features.shape == (5, 128, MAX_SAMPLES // 160) == expected["input_features"].shape
    torch.testing.assert_close(features, expected["input_features"], **TOL)
    assert mask.dtype == expected["attention_mask"].dtype
    assert torch.equal(mask, expected["attention_mask"])
    assert mask.sum(-1).tolist() == [math.ceil(len(a) / 160) for a in audios]


def test_audio_features_truncate_to_max_samples():
    audios = [chirp(20_000), noise(16_000, seed=5), sine(5_000, 300.0)]
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=1)
    expected = extractor(audios, sampling_rate=SR, padding="max_length", return_attention_mask=True,
                         return_tensors="pt")
    features, mask = audio_features(audios, max_samples=16_000)
    assert features.shape == (3, 128, 100)
    torch.testing.assert_close(features, expected["input_features"], **TOL)
    assert torch.equal(mask, expected["attention_mask"])


def test_pack_features_and_token_counts_match_the_thinker():
    audios = batch_of_audios()
    features, mask = audio_features(audios, max_samples=4 * SR)
    packed, lens = pack_features(features, mask)
    # What Qwen2_5OmniThinker.get_audio_features does with the padded batch.
    expected = features.permute(0, 2, 1)[mask.bool()].permute(1, 0)
    assert torch.equal(packed, expected)
    assert torch.equal(lens, mask.sum(-1))
    assert torch.equal(audio_token_lengths(lens), _get_feat_extract_output_lengths(lens))
    for n in range(0, 500):
        assert audio_token_lengths(n) == int(_get_feat_extract_output_lengths(torch.tensor(n)))


# ----------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------


def tiny_config(n_window: int = 8) -> AudioEncoderConfig:
    return AudioEncoderConfig(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                              encoder_ffn_dim=64, max_source_positions=64, n_window=n_window, output_dim=64)


def hf_encoder(config: AudioEncoderConfig, attn_implementation: str = "eager") -> Qwen2_5OmniAudioEncoder:
    """transformers' encoder with every parameter random (its init leaves biases at 0 and norms at 1)."""
    torch.manual_seed(0)
    hf = Qwen2_5OmniAudioEncoder(Qwen2_5OmniAudioEncoderConfig(**asdict(config),
                                                               attn_implementation=attn_implementation)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm_scale = ("layer_norm" in name or "ln_post" in name) and name.endswith("weight")
            p.normal_(mean=1.0 if is_norm_scale else 0.0, std=0.2)
    return hf


LENGTHS = [1, 2, 5, 16, 37, 50, 64]  # chunks of 16 (n_window 8) or 10 (n_window 5) frames


@pytest.mark.parametrize("n_window", [8, 5])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_encoder_matches_transformers(n_window, attn_implementation):
    config = tiny_config(n_window)
    hf = hf_encoder(config, attn_implementation)
    ours = AudioEncoder(config).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    lens = torch.tensor(LENGTHS)
    features = torch.randn(128, int(lens.sum()), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(features, feature_lens=lens).last_hidden_state
        got = ours(features, lens)
    assert got.shape == (int(audio_token_lengths(lens).sum()), 64) == expected.shape
    torch.testing.assert_close(got, expected, **TOL)
    assert expected.abs().max() > 1.0  # random weights make the comparison count
    # And back: our weights in transformers' module give our outputs.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(features, lens), hf(features, feature_lens=lens).last_hidden_state, **TOL)


def test_positional_embedding_is_transformers_table_and_not_saved():
    config = tiny_config()
    ours, hf = AudioEncoder(config), hf_encoder(config)
    assert torch.equal(ours.positional_embedding, hf.positional_embedding.positional_embedding)
    assert not any("positional_embedding" in key for key in ours.state_dict())


def test_encoder_on_processor_output_matches_transformers():
    """Front end → pack → encoder, end to end, on real features of audios shorter and longer than a 2 s chunk."""
    config = AudioEncoderConfig(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                encoder_ffn_dim=64, output_dim=64)  # n_window 100: the real 2 s chunks
    hf = hf_encoder(config)
    ours = AudioEncoder(config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    features, mask = audio_features([chirp(5 * SR + 333), sine(SR // 3, 500.0), noise(2 * SR, seed=9)],
                                    max_samples=6 * SR)
    packed, lens = pack_features(features, mask)
    with torch.no_grad():
        got = ours(packed, lens)
        torch.testing.assert_close(got, hf(packed, feature_lens=lens).last_hidden_state, **TOL)
    assert len(got) == sum(audio_token_lengths(int(n)) for n in lens) == 126 + 8 + 50  # 503, 34 and 200 frames


def test_audios_in_a_batch_are_independent():
    ours = AudioEncoder(tiny_config()).eval()
    lens = [37, 5, 16, 50]
    features = torch.randn(128, sum(lens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        together = ours(features, torch.tensor(lens))
        alone = [ours(part, torch.tensor([len(part.T)])) for part in features.split(lens, dim=1)]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)


def test_no_audio_frames_gives_no_tokens():
    ours = AudioEncoder(tiny_config()).eval()
    assert ours(torch.zeros(128, 0), torch.tensor([0, 0])).shape == (0, 64)


_STREAM_FEATURES = torch.randn(128, 200, generator=torch.Generator().manual_seed(3))
_STREAM_ENCODERS = {n: AudioEncoder(tiny_config(n)).eval() for n in (4, 5)}


@settings(max_examples=40, deadline=None)
@given(n_window=st.sampled_from([4, 5]), length=st.integers(1, 120), extra=st.integers(1, 80))
def test_complete_chunks_do_not_change_when_audio_is_appended(n_window, length, extra):
    """Attention, convolutions and positions stay inside a chunk, so audio can be encoded as it arrives."""
    encoder = _STREAM_ENCODERS[n_window]
    with torch.no_grad():
        short = encoder(_STREAM_FEATURES[:, :length], torch.tensor([length]))
        longer = encoder(_STREAM_FEATURES[:, : length + extra], torch.tensor([length + extra]))
    complete_chunks = length // (2 * n_window)
    settled = complete_chunks * n_window // 2  # tokens made of positions of complete chunks only
    assert len(short) == audio_token_lengths(length)
    torch.testing.assert_close(longer[:settled], short[:settled], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Resampling and WAV files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 22050, 32000, 44100, 48000])
def test_resampled_sines_keep_their_frequency(rate):
    t = np.arange(rate) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 3000 * t + 0.4)
    y = resample(torch.from_numpy(x).float(), rate, SR)
    assert y.shape == (SR,)
    t16 = np.arange(SR) / SR
    expected = 0.5 * np.sin(2 * np.pi * 440 * t16) + 0.3 * np.sin(2 * np.pi * 3000 * t16 + 0.4)
    inner = slice(300, -300)  # the ends see the zero padding
    np.testing.assert_allclose(y.numpy()[inner], expected[inner], atol=1e-3, rtol=0)


@pytest.mark.parametrize("rate", [32000, 44100, 48000])
def test_resampling_removes_what_16k_cannot_hold(rate):
    t = np.arange(rate) / rate
    above_nyquist = torch.from_numpy(np.sin(2 * np.pi * 12_000 * t)).float()
    assert resample(above_nyquist, rate, SR)[300:-300].abs().max() < 1e-3


@pytest.mark.parametrize("rate", [22050, 24000, 44100, 48000])
def test_resampling_round_trip(rate):
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    freqs, phases = rng.uniform(50, 6000, 8), rng.uniform(0, 6, 8)
    x = torch.from_numpy(np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None]).mean(0)).float()
    there = resample(x, SR, rate)
    assert there.shape == (math.ceil(SR * rate / SR),)
    back = resample(there, rate, SR)
    torch.testing.assert_close(back[300:-300], x[300:-300], atol=1e-3, rtol=0)


def test_resample_batches_and_lengths():
    x = torch.randn(2, 3, 1001, generator=torch.Generator().manual_seed(0))
    y = resample(x, 44100, SR)
    assert y.shape == (2, 3, math.ceil(1001 * 16000 / 44100))
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 44100, SR), atol=1e-6, rtol=0)
    assert resample(x, SR, SR) is x


def test_wav_round_trip_mono_and_stereo(tmp_path):
    x = torch.from_numpy(noise(4000, seed=4) * 5).clamp(-1, 0.999)
    write_wav(tmp_path / "mono.wav", x, 22050)
    y, rate = read_wav(tmp_path / "mono.wav")
    assert rate == 22050 and y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, x, atol=0.5 / 32768 + 1e-7, rtol=0)

    left, right = torch.from_numpy(sine(3000, 440.0)), torch.from_numpy(sine(3000, 1000.0, phase=1.0))
    write_wav(tmp_path / "stereo.wav", torch.stack([left, right]), SR)
    with wave.open(str(tmp_path / "stereo.wav")) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getnframes()) == (2, 2, 3000)
    mono, _ = read_wav(tmp_path / "stereo.wav")
    torch.testing.assert_close(mono, (left + right) / 2, atol=1 / 32768, rtol=0)

    write_wav(tmp_path / "loud.wav", torch.tensor([2.0, -2.0, 0.5]))
    torch.testing.assert_close(read_wav(tmp_path / "loud.wav")[0], torch.tensor([32767 / 32768, -1.0, 0.5]))


@pytest.mark.parametrize("width, dtype, scale, offset", [(1, np.uint8, 128, 128), (3, None, 2**23, 0),
                                                          (4, np.int32, 2**31, 0)])
def test_read_other_pcm_widths(tmp_path, width, dtype, scale, offset):
    values = np.array([0.0, 0.5, -0.5, -1.0, 0.25])
    ints = np.round(values * scale).astype(np.int64) + offset
    if width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        raw = ints.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    with wave.open(str(tmp_path / "a.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(width)
        f.setframerate(8000)
        f.writeframes(raw)
    got, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000
    np.testing.assert_allclose(got.numpy(), values, atol=1e-7, rtol=0)


def test_load_audio_mixes_down_and_resamples(tmp_path):
    rate = 44100
    tone = sine(rate, 440.0, rate=rate)
    write_wav(tmp_path / "a.wav", np.stack([tone, tone]), rate)
    audio = load_audio(tmp_path / "a.wav")
    assert audio.shape == (SR,)
    np.testing.assert_allclose(audio.numpy()[300:-300], sine(SR, 440.0)[300:-300], atol=1e-3, rtol=0)


def test_encoder_built_on_meta_device_recomputes_its_positions():
    with torch.device("meta"):
        encoder = AudioEncoder(tiny_config())
    encoder.reset_buffers()
    assert encoder.positional_embedding.device.type == "cpu"
    assert torch.equal(encoder.positional_embedding, AudioEncoder(tiny_config()).positional_embedding)
    assert "positional_embedding" in dict(encoder.named_buffers())
