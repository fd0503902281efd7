"""Speech out on tiny random models (no downloads): Token2Wav's streamed chunks against whole-utterance synthesis,
its folders, a Voice saved beside a tiny Thinker and loaded back, audio that starts before the Talker has
finished, and ``omnilm omni speak`` / ``omni ask --speak``."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnilm.cli import main
from omnilm.config import ConfigError
from omnilm.infer.generate import FINISHED
from omnilm.infer.sampling import SamplingParams
from omnilm.model.config import ModelConfig
from omnilm.model.hf import CheckpointError
from omnilm.omni import speech
from omnilm.omni.audio import read_wav
from omnilm.omni.dit import DiT, DiTConfig, exact_window
from omnilm.omni.generate import generate_thinker
from omnilm.omni.processor import OmniProcessor
from omnilm.omni.speech import (
    Token2Wav,
    Voice,
    load_token2wav,
    load_voice,
    save_token2wav,
    save_voice,
)
from omnilm.omni.talker import Talker, TalkerConfig
from omnilm.omni.thinker import load_thinker
from omnilm.omni.vocoder import BigVGAN, BigVGANConfig, GriffinLimVocoder
from omnilm.tokenizer import Tokenizer
from omnilm.tokenizer.chat import IM_END, IM_START
from tiny_thinker import noise_image, tiny_thinker_folder

# 4 layers: layer 2 looks one block ahead, layers 0 and 3 one block back (as in Qwen2.5-Omni's DiT); blocks of 8
# frames (4 codes); 128 mel bins for Griffin-Lim.
DIT = DiTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, head_dim=16, ff_mult=2, emb_dim=8,
                block_size=8, look_ahead_layers=(2,), look_backward_layers=(0, 3), repeats=2, num_embeds=64,
                mel_dim=128, enc_emb_dim=5, enc_dim=7, enc_channels=(8, 8, 8, 16), enc_kernel_sizes=(5, 3, 3, 1),
                enc_dilations=(1, 2, 3, 1), enc_attention_channels=4, enc_res2net_scale=2, enc_se_channels=4,
                dropout=0.0)
BIGVGAN = BigVGANConfig(mel_dim=16, upsample_initial_channel=16, resblock_kernel_sizes=(3, 5),
                        resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)), upsample_rates=(4, 2),
                        upsample_kernel_sizes=(8, 4))
CODEC = dict(tts_codec_pad_token_id=60, tts_codec_start_token_id=61, tts_codec_end_token_id=62,
             tts_codec_mask_token_id=63)
#: Euler with 3 grid points: 2 evaluations, so the exact window [4 | 1 | 2] blocks is partial on 16 blocks.
EULER = dict(steps=3, method="euler")
#: Streamed Griffin-Lim (100 iterations, (32, 32) frames of context) against the whole utterance: measured 1.8e-4
#: max abs on this mel (waveform rms 0.18), and about the same with 16 to 48 frames of context: on this mel float32
#: rounding carried through 100 momentum iterations dominates what the context leaves out.
GL_TOL = 1e-3

#: Audio computed twice from equal weights on one CPU: float32 kernels may take another path for tensors at another
#: address (seen on an AMD host, up to 1e-4 after Griffin-Lim's iterations), so equal means within 16 steps of
#: 16-bit PCM; a wrong weight or code moves samples by orders more.
AUDIO_ATOL = 16 / 32768


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter at random, weights scaled by 1/sqrt(fan-in) so that every layer matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 25
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)


def tiny_token2wav(vocoder: GriffinLimVocoder | BigVGAN | None = None, seed: int = 0, **settings: object) -> Token2Wav:
    vocoder = GriffinLimVocoder() if vocoder is None else vocoder
    mel_dim = vocoder.config.mel_dim if isinstance(vocoder, BigVGAN) else DIT.mel_dim
    dit = DiT(replace(DIT, mel_dim=mel_dim)).eval()
    randomise(dit, seed)
    with torch.no_grad():  # the flow ends 3.5 lower: a log-mel of speech-like loudness (not clipped throughout)
        dit.proj_out.bias.fill_(-3.5)
    g = torch.Generator().manual_seed(seed + 1)
    reference, speaker = torch.randn(1, 30, mel_dim, generator=g) * 0.3, torch.randn(1, DIT.enc_emb_dim, generator=g)
    return Token2Wav(dit, vocoder, reference, speaker, **settings)  # type: ignore[arg-type]


def tiny_bigvgan(seed: int = 3) -> BigVGAN:
    vocoder = BigVGAN(BIGVGAN).eval()
    randomise(vocoder, seed)
    return vocoder


def tiny_talker(thinker_config, tokenizer: Tokenizer, seed: int = 4) -> Talker:  # noqa: ANN001
    """A 2-layer Talker of 64 codes that never says an end code (their head rows are zero, the others' logits are
    mostly positive), so greedy speech lasts exactly ``max_new_tokens`` codes."""
    text = ModelConfig(family="qwen2", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       mrope_section=(2, 3, 3), tie_embeddings=False)
    c = thinker_config
    media = {name: getattr(c, name) for name in ("audio_token_id", "image_token_id", "video_token_id",
                                                 "audio_start_token_id", "audio_end_token_id",
                                                 "vision_start_token_id", "vision_end_token_id",
                                                 "position_id_per_seconds", "seconds_per_chunk")}
    config = TalkerConfig(text=text, embedding_size=c.text.d_model, tts_text_start_token_id=tokenizer.token_to_id(
        IM_START), tts_text_end_token_id=tokenizer.token_to_id(IM_END), tts_text_pad_token_id=tokenizer.pad_id,
        spatial_merge_size=c.vision.spatial_merge_size, **CODEC, **media)
    talker = Talker(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in talker.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            if "norm" in name:
                param.add_(1.0)
        talker.codec_head.weight[list(config.end_codes)] = 0.0
    return talker


def codes(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, DIT.num_embeds + 1, (n,), generator=torch.Generator().manual_seed(seed))


def joined(t2w: Token2Wav, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    chunks = list(t2w.stream(ids.tolist()))
    return torch.cat(chunks), [len(c) for c in chunks]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Token2Wav
# ---------------------------------------------------------------------------------------------------------------


def test_griffin_lim_stream_equals_whole_utterance_within_the_context_error() -> None:
    """61 codes: 122 frames, 15 blocks of 8 and one of 2, one chunk each. With the DiT's exact window the mel is
    the whole utterance's, and streamed Griffin-Lim ((32, 32) frames of context on windows of at most 72 of the
    122 frames) stays within GL_TOL of whole-utterance vocoding; with 8 iterations and 2·8 frames of context it is
    exact, with none it is not."""
    ids = codes(61)
    t2w = tiny_token2wav(**EULER)
    t2w.past_blocks, t2w.future_blocks = exact_window(DIT, **EULER)
    whole = t2w.synthesize(ids)
    assert whole.shape == (122 * 160,) and whole.abs().max() <= 1.0
    assert 0.05 < whole.pow(2).mean().sqrt() < 0.5  # speech-like loudness, not clipped noise
    stream, lengths = joined(t2w, ids)
    assert lengths == [8 * 160] * 15 + [2 * 160]
    error = (stream - whole).abs().max().item()
    assert error < GL_TOL, error

    # I iterations reach 2I frames: with that much context the chunks are the whole utterance's, to float32
    # rounding (~1e-5), and to float64 rounding in float64.
    t2w.vocoder, t2w.context_frames = GriffinLimVocoder(iterations=8), (16, 16)
    torch.testing.assert_close(joined(t2w, ids)[0], t2w.synthesize(ids), atol=1e-4, rtol=0)
    t2w.double()
    torch.testing.assert_close(joined(t2w, ids)[0], t2w.synthesize(ids), atol=1e-12, rtol=0)
    t2w.context_frames = (0, 1)
    assert (joined(t2w, ids)[0] - t2w.synthesize(ids)).abs().max() > 0.05


def test_bigvgan_stream_equals_whole_utterance() -> None:
    """BigVGAN's reach is bounded, and (32, 32) frames of context cover the tiny one's: exact up to float error;
    without context the chunk edges differ."""
    ids = codes(61)
    t2w = tiny_token2wav(tiny_bigvgan(), **EULER)
    t2w.past_blocks, t2w.future_blocks = exact_window(DIT, **EULER)
    whole = t2w.synthesize(ids)
    stream, lengths = joined(t2w, ids)
    assert lengths == [8 * 8] * 15 + [2 * 8]  # hop 8 samples per frame
    torch.testing.assert_close(stream, whole, atol=1e-5, rtol=0)
    t2w.context_frames = (0, 0)
    assert (joined(t2w, ids)[0] - whole).abs().max() > 1e-2


def test_default_window_error() -> None:
    """Qwen's sampler (10 RK4 steps) on the DiT's default window [2 | 1 | 1] blocks: the mel is an approximation
    (test_dit), and so is the waveform: measured 3.2e-3 max abs (rms of the difference 9e-5, of the waveform 0.13)
    here, against 1.8e-4 for the exact window with the same vocoding."""
    ids = codes(61)
    t2w = tiny_token2wav()
    whole = t2w.synthesize(ids)
    stream, _ = joined(t2w, ids)
    error = (stream - whole).abs().max().item()
    assert 1e-3 < error < 0.02, error


def test_token2wav_folder_round_trip(tmp_path: Path) -> None:
    ids = codes(9)
    for name, t2w in (("gl", tiny_token2wav(past_blocks=3, context_frames=(20, 12))),
                      ("bigvgan", tiny_token2wav(tiny_bigvgan(), **EULER))):
        folder = save_token2wav(t2w, tmp_path / name)
        config = json.loads((folder / "config.json").read_text())
        assert {"dit", "vocoder", "steps", "method", "guidance_scale", "sample_rate"} <= set(config)
        assert config["vocoder"]["type"] == {"gl": "griffin_lim", "bigvgan": "bigvgan"}[name]
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "speaker.safetensors"]
        loaded = load_token2wav(folder)
        assert (loaded.steps, loaded.method, loaded.past_blocks, loaded.context_frames, loaded.sample_rate) == (
            t2w.steps, t2w.method, t2w.past_blocks, t2w.context_frames, t2w.sample_rate)
        torch.testing.assert_close(loaded.synthesize(ids), t2w.synthesize(ids), atol=AUDIO_ATOL, rtol=0)
    with pytest.raises(ConfigError, match="mel bins"):
        Token2Wav(DiT(DIT), tiny_bigvgan(), torch.zeros(1, 30, 128), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="codes must lie in"):
        tiny_token2wav().synthesize(torch.tensor([3, 65]))


# ---------------------------------------------------------------------------------------------------------------
# Voice
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    return tiny_thinker_folder(tmp_path_factory.mktemp("speech") / "plain", tokenizer)


@pytest.fixture(scope="module")
def voice_parts(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> tuple[Path, Voice]:
    """A tiny Thinker folder with a voice, and the same Voice built in memory."""
    folder = tiny_thinker_folder(tmp_path_factory.mktemp("speech") / "voice", tokenizer)
    thinker, own = load_thinker(folder), Tokenizer.from_dir(folder)
    talker, t2w = tiny_talker(thinker.config, own), tiny_token2wav()
    bos = own.token_to_id(IM_START)
    save_voice(folder, talker, t2w, bos)
    return folder, Voice(thinker, talker, t2w, own, bos)


def test_a_saved_voice_loads_and_speaks_the_same(voice_parts: tuple[Path, Voice], plain_dir: Path) -> None:
    folder, voice = voice_parts
    loaded = load_voice(folder)
    assert isinstance(loaded, Voice) and loaded.sample_rate == 16_000
    assert loaded.speaker_bos_id == voice.speaker_bos_id
    ours = list(voice.speak_text("hello there", greedy(12)))
    theirs = list(loaded.speak_text("hello there", greedy(12)))
    assert [c.dtype for c in ours] == [np.float32] * len(ours) and len(ours) == 3  # 24 frames: 3 blocks
    np.testing.assert_allclose(np.concatenate(theirs), np.concatenate(ours), atol=AUDIO_ATOL, rtol=0)
    # A reply that ends with its end-of-turn token says the same; what follows the end is not read.
    batch, reply = voice.text_prompt("hello there")
    end = voice.tokenizer.token_to_id(IM_END)
    np.testing.assert_array_equal(np.concatenate(list(voice.speak(batch, [*reply, end, 7, 8], greedy(12)))),
                                  np.concatenate(ours))
    assert list(voice.speak(batch, [end, 5], greedy(12))) == []
    assert load_voice(plain_dir) is None


def test_a_paced_voice_reads_its_track_as_its_duration_model_says(voice_parts: tuple[Path, Voice],
                                                                 tmp_path: Path) -> None:
    """A folder's pacing.json makes its Voice paced (spelled when it says so): the codes are the Talker's on the
    track that paced_reply lays out from the duration model's plan; the letters change what it reads."""
    from omnilm.omni.pacing import DurationModel, paced_reply
    from omnilm.omni.talker import generate_codes, talker_inputs

    folder, voice = voice_parts
    batch, reply = voice.text_prompt("Ann 12")
    said: dict[int, list[int]] = {}
    for spelled in (0, 2):
        copy = shutil.copytree(folder, tmp_path / f"spelled{spelled}")
        DurationModel(per_char=3.0, lead=2.0, gap=1.0, trail=2.0, spelled=spelled).save(copy / "talker")
        loaded = load_voice(copy)
        assert loaded is not None and loaded.pacing is not None and loaded.pacing.spelled == spelled
        counts, spoken = loaded.pacing.plan(loaded.tokenizer, reply)
        inputs = talker_inputs(loaded.thinker, loaded.talker.config, batch["input_ids"], reply + loaded.eos_ids[:1],
                               loaded.speaker_bos_id, loaded.eos_ids)
        expected = list(generate_codes(loaded.talker, paced_reply(inputs, counts, spoken, spelled, loaded.tokenizer,
                                                                  reply), greedy(30)))
        said[spelled] = list(loaded.codes(batch, reply, greedy(30)))
        assert said[spelled] == expected and len(expected) > 5
    assert said[0] != said[2]


def test_speech_starts_before_the_talker_finishes(voice_parts: tuple[Path, Voice],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """40 codes, 80 frames, 10 blocks: block 0's mel needs the codes up to block 1 (look-ahead), its waveform
    32 frames more of mel (block 4, so codes up to block 5): the first chunk comes after 24 of the 40 codes."""
    _, voice = voice_parts
    made: list[int] = []
    finished = []
    real = speech.generate_codes

    def counted(*args: object, **kwargs: object):  # noqa: ANN202
        for code in real(*args, **kwargs):
            made.append(code)
            yield code
        finished.append(True)

    monkeypatch.setattr(speech, "generate_codes", counted)
    batch, reply = voice.text_prompt("the quick brown fox")
    chunks = voice.speak(batch, reply, greedy(40))
    first = next(chunks)
    assert (len(made), finished) == (24, [])
    rest = list(chunks)
    assert (len(made), finished, len(rest)) == (40, [True], 9)
    whole = voice.token2wav.synthesize(torch.tensor(made))
    assert np.abs(np.concatenate([first, *rest]) - whole.numpy()).max() < 0.02  # the default window's error


def test_voice_refuses_a_talker_for_another_thinker(voice_parts: tuple[Path, Voice], tmp_path: Path) -> None:
    folder, voice = voice_parts
    other = replace(voice.talker.config, image_token_id=voice.talker.config.image_token_id + 1)
    with pytest.raises(ConfigError, match="image_token_id"):
        Voice(voice.thinker, Talker(other), voice.token2wav, voice.tokenizer, voice.speaker_bos_id)
    with pytest.raises(ConfigError, match="speaker_bos_id"):
        Voice(voice.thinker, voice.talker, voice.token2wav, voice.tokenizer, 10**6)
    half = tmp_path / "half"
    shutil.copytree(folder, half)
    shutil.rmtree(half / "token2wav")
    with pytest.raises(CheckpointError, match="token2wav/config.json"):
        load_voice(half)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def wav(path: Path) -> np.ndarray:
    samples, rate = read_wav(path)
    assert rate == 16_000
    return samples.numpy()


def quantised(chunks: list[np.ndarray]) -> np.ndarray:
    """What write_wav stores of float samples, read back."""
    return np.clip(np.round(np.concatenate(chunks).astype(np.float64) * 32768), -32768, 32767) / 32768


def test_speak_writes_a_16khz_wav(voice_parts: tuple[Path, Voice], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder, voice = voice_parts
    out = tmp_path / "said.wav"
    assert main(["omni", "speak", "--model", str(folder), "--text", "hello there", "--out", str(out),
                 "--max-codes", "14"]) == 0
    assert "16000 Hz" in capsys.readouterr().out
    samples = wav(out)
    assert samples.shape == (14 * 2 * 160,)
    batch, reply = voice.text_prompt("hello there")
    made = list(voice.codes(batch, reply, greedy(14)))
    np.testing.assert_allclose(samples, quantised([voice.token2wav.synthesize(torch.tensor(made)).numpy()]),
                               atol=AUDIO_ATOL, rtol=0)
    streamed = tmp_path / "streamed.wav"
    assert main(["omni", "speak", "--model", str(folder), "--text", "hello there", "--out", str(streamed),
                 "--max-codes", "14", "--stream"]) == 0
    assert "first audio after" in capsys.readouterr().out
    np.testing.assert_allclose(wav(streamed), quantised(list(voice.speak_text("hello there", greedy(14)))),
                               atol=AUDIO_ATOL, rtol=0)


def test_ask_speak_says_the_reply_as_voice_speak_does(voice_parts: tuple[Path, Voice], tmp_path: Path,
                                                      capsys) -> None:  # noqa: ANN001
    folder, voice = voice_parts
    image = tmp_path / "noise.png"
    Image.fromarray(noise_image(60, 80)).save(image)
    out = tmp_path / "reply.wav"
    capsys.readouterr()
    assert main(["omni", "ask", "--model", str(folder), "--image", str(image), "--prompt", "What is this?",
                 "--max-new-tokens", "6", "--speak", str(out), "--max-codes", "10"]) == 0
    printed = capsys.readouterr().out
    # The same prompt and greedy reply, made here.
    thinker, tokenizer = voice.thinker, voice.tokenizer
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "text", "text": "What is this?"}]}]
    batch = processor.collate([processor.encode(messages, add_generation_prompt=True)], pad_id=0, left_pad=True)
    reply = []
    for step in generate_thinker(thinker, batch, greedy(6), voice.eos_ids, 0):
        if int(step[0]) == FINISHED or int(step[0]) in voice.eos_ids:
            break
        reply.append(int(step[0]))
    assert reply and printed == tokenizer.decode(reply) + "\n"
    expected = quantised(list(voice.speak(batch, reply, greedy(10))))
    assert expected.shape == (10 * 2 * 160,)
    np.testing.assert_allclose(wav(out), expected, atol=AUDIO_ATOL, rtol=0)


def test_a_folder_without_a_voice_is_refused_clearly(plain_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "never.wav"
    capsys.readouterr()
    assert main(["omni", "speak", "--model", str(plain_dir), "--text", "hi", "--out", str(out)]) == 2
    assert "has no voice" in capsys.readouterr().err
    assert main(["omni", "ask", "--model", str(plain_dir), "--prompt", "hi", "--speak", str(out)]) == 2
    captured = capsys.readouterr()
    assert "has no voice" in captured.err and captured.out == ""  # refused before the Thinker says anything
    assert not out.exists()
