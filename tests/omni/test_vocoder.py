"""Vocoders: our STFT against torch.stft / torch.istft (the oracle), Griffin–Lim on espeak-ng speech against the
random-phase baseline, and BigVGAN against transformers' ``Qwen2_5OmniToken2WavBigVGANModel`` (tiny random
config built here, random weights, both directions)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniBigVGANConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniToken2WavBigVGANModel,
    kaiser_sinc_filter1d,
)

from omnilm.config import ConfigError
from omnilm.data.synth.media import Voice, espeak_available, speak
from omnilm.omni.audio import log_mel_spectrogram, mel_filter_bank
from omnilm.omni.vocoder import (
    BigVGAN,
    BigVGANConfig,
    GriffinLimVocoder,
    Vocoder,
    bigvgan_config_from_hf,
    bigvgan_config_to_hf,
    fold_weight_norm,
    griffin_lim,
    istft,
    kaiser_sinc_filter,
    mel_to_power,
    stft,
)

# (n_fft, hop): the Whisper front end's, a power of two with 75 % overlap, an odd size.
STFT_SHAPES = [(400, 160), (64, 16), (63, 20)]


def torch_stft(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    return torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft, dtype=x.dtype), center=True,
                      pad_mode="reflect", return_complex=True)


# ----------------------------------------------------------------------------------------------------------------
# STFT
# ----------------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from(STFT_SHAPES), extra=st.integers(1, 3000), seed=st.integers(0, 2**16))
def test_stft_matches_torch_and_inverse_is_identity(shape, extra, seed):
    n_fft, hop = shape
    length = n_fft // 2 + extra  # a centred STFT reflects n_fft // 2 samples and needs more than that
    x = torch.randn(2, length, generator=torch.Generator().manual_seed(seed))
    ours = stft(x, n_fft, hop)
    expected = torch_stft(x, n_fft, hop)
    frames = 1 + (length + 2 * (n_fft // 2) - n_fft) // hop  # length // hop + 1 when n_fft is even
    assert ours.shape == expected.shape == (2, n_fft // 2 + 1, frames)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    back = istft(ours, n_fft, hop, length=length)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    oracle = torch.istft(expected, n_fft, hop, window=torch.hann_window(n_fft), center=True, length=length)
    torch.testing.assert_close(back, oracle, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:The length of signal is shorter")  # torch.istft's note on zero-padding
@pytest.mark.parametrize("length", [None, 1000, 5000])
def test_istft_default_and_explicit_lengths_match_torch(length):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    spectrum = torch_stft(x, 400, 160)[..., :15]  # a cut spectrum: also not exactly consistent at its end
    expected = torch.istft(spectrum, 400, 160, window=torch.hann_window(400), center=True, length=length)
    torch.testing.assert_close(istft(spectrum, 400, 160, length=length), expected, atol=1e-5, rtol=0)


def test_stft_batches_any_leading_shape_and_refuses_short_signals():
    x = torch.randn(2, 3, 900)
    torch.testing.assert_close(stft(x)[1, 2], stft(x[1, 2]), atol=0, rtol=0)
    assert istft(stft(x), length=900).shape == (2, 3, 900)
    with pytest.raises(ValueError, match="reflects 200"):
        stft(torch.zeros(200))


# ----------------------------------------------------------------------------------------------------------------
# Griffin–Lim
# ----------------------------------------------------------------------------------------------------------------


def test_mel_inversion_is_non_negative_and_fits_better_than_the_clipped_pseudo_inverse():
    x = torch.randn(16000, generator=torch.Generator().manual_seed(1)) * 0.1
    log_mel = log_mel_spectrogram(x)  # (128, 100)
    target = torch.pow(10.0, 4.0 * log_mel.double() - 4.0)  # mel power
    filters = mel_filter_bank()  # (201, 128)
    errors = {}
    for iterations in (0, 200):
        power = mel_to_power(log_mel, nnls_iterations=iterations)
        assert power.shape == (201, 100) and power.dtype == torch.float32 and (power >= 0).all()
        errors[iterations] = ((filters.T @ power.double()) - target).norm() / target.norm()
    assert errors[200] < 0.5 * errors[0]
    assert torch.equal(mel_to_power(log_mel[None].expand(2, -1, -1))[1], mel_to_power(log_mel))


def spectral_convergence(y: torch.Tensor, reference: torch.Tensor) -> float:
    """‖ |STFT y| - |STFT reference| ‖_F / ‖ |STFT reference| ‖_F, over the reference's frames."""
    want = stft(reference).abs()
    got = stft(y[: len(reference)]).abs()[..., : want.shape[-1]]
    return float((got - want).norm() / want.norm())


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_griffin_lim_recovers_espeak_speech():
    """Measured (espeak-ng 1.51, en-us+m3, 3.1 s): log-mel mean absolute error 0.0185 (normalised units, so ×40 dB:
    0.74 dB) and spectral convergence 0.095 after 100 iterations with momentum 0.99; the random-phase baseline
    (0 iterations) has 0.130 and 0.565; plain Griffin–Lim (momentum 0) 0.0249 / 0.118."""
    wave = torch.from_numpy(speak("The quick brown fox jumps over the lazy dog.", Voice("en-us", "m3", 160, 50)))
    log_mel = log_mel_spectrogram(wave)  # (128, frames)

    def measure(iterations: int, momentum: float) -> tuple[float, float]:
        y = griffin_lim(log_mel, iterations=iterations, momentum=momentum)
        assert y.shape == (log_mel.shape[-1] * 160,)
        error = float((log_mel_spectrogram(y) - log_mel).abs().mean())
        return error, spectral_convergence(y, wave)

    fast, baseline, plain = measure(100, 0.99), measure(0, 0.99), measure(100, 0.0)
    print(f"fast GL {fast}, random phase {baseline}, plain GL {plain}")
    assert fast[0] < 0.03 and fast[1] < 0.15
    assert fast[0] < 0.3 * baseline[0] and fast[1] < 0.3 * baseline[1]
    assert fast[0] < plain[0] and fast[1] < plain[1]  # momentum helps at equal work


def test_griffin_lim_vocoder_is_a_vocoder_for_batches():
    vocoder = GriffinLimVocoder(iterations=8)
    assert isinstance(vocoder, Vocoder) and vocoder.sample_rate == 16_000
    x = torch.randn(2, 4000, generator=torch.Generator().manual_seed(2)) * 0.05
    log_mel = log_mel_spectrogram(x)  # (2, 128, 25)
    batch = vocoder.vocode(log_mel)
    assert batch.shape == (2, 4000) and batch.abs().max() <= 1.0
    # Every row draws the same starting phases shape-for-shape, so a row alone comes out the same.
    torch.testing.assert_close(batch[1], GriffinLimVocoder(iterations=8).vocode(log_mel[1]), atol=1e-5, rtol=0)
    assert vocoder.vocode(log_mel[0, :, :2]).shape == (320,)
    with pytest.raises(ValueError, match="at least 2 frames"):
        vocoder.vocode(log_mel[0, :, :1])


# ----------------------------------------------------------------------------------------------------------------
# BigVGAN
# ----------------------------------------------------------------------------------------------------------------


TINY_BIGVGAN = dict(mel_dim=16, upsample_initial_channel=32, resblock_kernel_sizes=[3, 5],
                    resblock_dilation_sizes=[[1, 3, 5], [1, 2, 3]], upsample_rates=[3, 2],
                    upsample_kernel_sizes=[7, 4])


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter drawn at random (the default init leaves SnakeBeta's α and β at exp(0) = 1); at this scale
    the tiny model's waveform spreads over about ±0.3 (at 0.3 it would sit clamped at ±1, hiding every error)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def mel_input(batch: int = 1, frames: int = 20, mel_dim: int = 16) -> torch.Tensor:
    # Natural-log amplitudes around those the DiT produces (about -11 … 2), some below the -115 dB floor.
    return torch.randn(batch, mel_dim, frames, generator=torch.Generator().manual_seed(3)) * 3.0 - 5.0


def test_bigvgan_matches_transformers_both_ways():
    hf_config = Qwen2_5OmniBigVGANConfig(**TINY_BIGVGAN)
    hf = Qwen2_5OmniToken2WavBigVGANModel(hf_config).eval()
    randomise(hf)
    config = bigvgan_config_from_hf(hf_config)
    ours = BigVGAN(config).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    mel = mel_input()
    with torch.no_grad():
        expected = hf(mel)  # (samples,): transformers squeezes the batch
        got = ours(mel)
    assert got.shape == (1, 20 * config.hop_length) and config.hop_length == 6
    # A waveform neither collapsed to nothing nor clamped at ±1 throughout, where differences would not show.
    assert expected.std() > 0.1 and (expected.abs() >= 1.0).float().mean() < 0.1
    torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=0)

    randomise(ours, seed=1)
    hf.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours.vocode(mel[0]), hf(mel), atol=1e-4, rtol=0)


def test_bigvgan_batch_rows_are_independent():
    ours = BigVGAN(bigvgan_config_from_hf(TINY_BIGVGAN)).eval()
    randomise(ours)
    mel = mel_input(batch=2)
    batch = ours.vocode(mel)
    torch.testing.assert_close(batch[1], ours.vocode(mel[1]), atol=1e-5, rtol=0)


def test_bigvgan_config_round_trips_through_transformers():
    config = BigVGANConfig(**TINY_BIGVGAN, sample_rate=16_000)
    hf = Qwen2_5OmniBigVGANConfig(**{k: v for k, v in bigvgan_config_to_hf(config).items() if k != "model_type"})
    assert bigvgan_config_from_hf(hf, sample_rate=16_000) == config
    assert bigvgan_config_from_hf(hf.to_dict(), sample_rate=16_000) == config
    whole = {"model_type": "qwen2_5_omni",
             "token2wav_config": {"model_type": "qwen2_5_omni_token2wav", "bigvgan_config": hf.to_dict()}}
    assert bigvgan_config_from_hf(whole, sample_rate=16_000) == config
    default = bigvgan_config_from_hf(Qwen2_5OmniBigVGANConfig())
    assert default == BigVGANConfig() and default.hop_length == 240 and default.sample_rate == 24_000
    with pytest.raises(ConfigError, match="model_type"):
        bigvgan_config_from_hf({"model_type": "qwen2_5_omni_dit"})
    with pytest.raises(ConfigError, match="three dilated"):
        BigVGANConfig(resblock_dilation_sizes=((1, 3), (1, 3, 5), (1, 3, 5)))


def test_bigvgan_is_a_vocoder_at_its_config_rate():
    ours = BigVGAN(BigVGANConfig(**TINY_BIGVGAN, sample_rate=12_000)).eval()
    assert isinstance(ours, Vocoder) and ours.sample_rate == 12_000
    assert ours.vocode(mel_input()[0]).shape == (20 * 6,)


@pytest.mark.parametrize(("cutoff", "half_width", "kernel_size"), [(0.25, 0.3, 12), (0.25, 0.3, 11), (0.1, 0.05, 32)])
def test_kaiser_sinc_filter_is_the_one_bigvgan_was_trained_with(cutoff, half_width, kernel_size):
    expected = kaiser_sinc_filter1d(cutoff, half_width, kernel_size)[0, 0]
    torch.testing.assert_close(kaiser_sinc_filter(cutoff, half_width, kernel_size), expected, atol=1e-7, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_loading_a_weight_normed_checkpoint_folds_it():
    """A BigVGAN saved with weight norm (g, v per conv) loads to the same function as its folded weights."""
    ours = BigVGAN(BigVGANConfig(**TINY_BIGVGAN)).eval()
    randomise(ours)
    normed = BigVGAN(BigVGANConfig(**TINY_BIGVGAN)).eval()
    normed.load_state_dict(ours.state_dict())
    convs = [m for m in normed.modules() if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d)]
    for i, conv in enumerate(convs):  # both spellings: the old hook and the parametrization
        if i % 2:
            torch.nn.utils.parametrizations.weight_norm(conv)
        else:
            torch.nn.utils.weight_norm(conv)
    state = {f"token2wav.code2wav_bigvgan_model.{k}": v for k, v in normed.state_dict().items()}
    state["thinker.lm_head.weight"] = torch.zeros(1)  # another part of a whole checkpoint: ignored
    assert any(k.endswith("weight_g") for k in state) and any(k.endswith("original0") for k in state)
    loaded = BigVGAN(BigVGANConfig(**TINY_BIGVGAN)).eval()
    loaded.load_hf_state_dict(state)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=1e-6, rtol=1e-6)
    plain = fold_weight_norm({"a.weight": torch.ones(2)})
    assert list(plain) == ["a.weight"] and torch.equal(plain["a.weight"], torch.ones(2))
