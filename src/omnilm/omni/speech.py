"""Speech out: a Thinker's reply → Talker codes → DiT mel → vocoder waveform, streamed as the codes arrive.

Written for this project. Two objects own the path from a reply to audio:

- :class:`Token2Wav` turns codec ids into a waveform: the DiT (:mod:`omnilm.omni.dit`) samples the mel under a
  fixed speaker conditioning (a reference mel and a speaker vector, Qwen's ``ref_mel`` and ``cond``), and a
  vocoder (:mod:`omnilm.omni.vocoder`: Griffin–Lim at 16 kHz over the Whisper-style 128-bin log-mel, or BigVGAN)
  turns the mel into samples. :meth:`Token2Wav.synthesize` does a whole utterance, :meth:`Token2Wav.stream` the
  same utterance chunk by chunk while the codes are still coming.
- :class:`Voice` is a Thinker with a Talker and a Token2Wav: :meth:`Voice.speak` runs ``talker_inputs`` →
  ``generate_codes`` → ``Token2Wav.stream`` so that audio starts before the Talker has finished.

Streaming, and how close it stays to the whole utterance. Chunk b of :meth:`Token2Wav.stream` is the waveform of
DiT block b (``block_size`` mel frames), so there is one chunk per DiT block and the chunks joined have exactly
the whole utterance's length. Two windows make a chunk:

1. Mel. :func:`omnilm.omni.dit.sample_stream` samples block b on [previous blocks | block b | look-ahead blocks]
   (``past_blocks`` / ``future_blocks``; None: the DiT's one-evaluation reach, [2 | 1 | 1] blocks for
   Qwen2.5-Omni). With :func:`omnilm.omni.dit.exact_window` the mel equals the whole utterance's up to float
   summation order; with the default window it is an approximation (see ``sample_stream``). Both paths draw the
   same noise: block by block from a generator seeded with ``seed``.
2. Waveform. The vocoder runs on the mel frames [block b − left | block b | right] (``context_frames`` = (left,
   right)) and only block b's samples are kept: the windows overlap by left + right frames and are cut at the
   block boundaries. The chunk is emitted once ``right`` frames past the block are sampled (or the utterance has
   ended), which is the extra latency the waveform costs.

   - BigVGAN is a stack of convolutions: an output sample depends on a bounded span of mel frames (measured for
     the released layout by the gradient's support: 29 frames back, 28 ahead). With context at least that reach,
     chunks equal whole-utterance vocoding up to float error; the default (32, 32) covers it.
   - Griffin–Lim is iterative and global: each iteration couples a frame with its neighbours (n_fft 400 over hop
     160 reaches 2 frames each side), so after I iterations a sample depends on ±2I frames, and it starts from
     random phases. Here the starting phases belong to the utterance's frames (frame t's are drawn from its own
     generator, seeded by the vocoder's seed and t), so a window starts from exactly the phases the whole
     utterance has there, and the remaining difference comes only from the frames the window lacks. With ≥ 2I
     frames each side a chunk is exact (to float64 rounding in float64; float32 rounding leaves ~1e-5 after 8
     iterations, ~2e-4 after 100). Below that the difference decays fast with the distance: measured on speech
     (espeak-ng, 100 iterations, momentum 0.99), chunks with (32, 32) frames of context differ from
     whole-utterance vocoding by at most 3.5e-4 (peak 0.87), with (24, 24) by 1e-3, with (16, 16) by 4e-2. No
     cross-fade is applied at the cuts: both sides of a cut agree with the whole utterance within that error,
     whereas blending in the neighbouring window's edge (its least converged part) could only add error.
     Whole-utterance vocoding (:meth:`Token2Wav.synthesize`) is the same Griffin–Lim run on all frames, equal in
     every respect to :class:`~omnilm.omni.vocoder.GriffinLimVocoder` except the layout of the random starting
     phases.

Folders. A Token2Wav folder holds ``config.json`` (``{"dit": <transformers' DiT config>, "vocoder": {"type":
"griffin_lim", ...} | {"type": "bigvgan", <transformers' BigVGAN config>, "sample_rate": ...}, "steps", "method",
"guidance_scale", "sample_rate", ...}``), ``model.safetensors`` (the DiT under ``code2wav_dit_model.`` and a
BigVGAN under ``code2wav_bigvgan_model.``, transformers' token2wav names) and ``speaker.safetensors``
(``ref_mel`` (1, T_ref, mel_dim), ``cond`` (1, enc_emb_dim)); each file is written atomically and config.json
last. A voice lives in a thinker folder: ``talker/`` (:func:`~omnilm.omni.talker.save_talker`, with the speaker's
text-start id in ``talker/speaker.json``, as the talker training stage writes it) and ``token2wav/``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.data.synth.omni import SAY_PROMPT
from omnilm.infer.sampling import SamplingParams
from omnilm.model.hf import CheckpointError, check_tensors, read_hf_tensors, write_weights
from omnilm.omni.audio import HOP_LENGTH, N_FFT, N_MELS
from omnilm.omni.dit import (
    METHODS,
    DiT,
    dit_config_from_hf,
    dit_config_to_hf,
    sample,
    sample_stream,
)
from omnilm.omni.pacing import DurationModel, paced_reply
from omnilm.omni.processor import OmniProcessor, media_arguments
from omnilm.omni.talker import Talker, TalkerInputs, generate_codes, load_talker, save_talker, talker_inputs
from omnilm.omni.thinker import Thinker, load_thinker
from omnilm.omni.vocoder import (
    BigVGAN,
    BigVGANConfig,
    GriffinLimVocoder,
    bigvgan_config_from_hf,
    bigvgan_config_to_hf,
    istft,
    mel_to_power,
    stft,
)
from omnilm.tokenizer.chat import IM_END
from omnilm.utils.atomic import atomic_path, write_json_atomic

TALKER_DIR, TOKEN2WAV_DIR = "talker", "token2wav"
#: The speaker's text-start id, inside ``talker/`` (the talker training stage writes the same file).
SPEAKER_FILE = "speaker.json"
SPEAKER_TENSORS = "speaker.safetensors"
DIT_PREFIX, BIGVGAN_PREFIX = "code2wav_dit_model.", "code2wav_bigvgan_model."
#: Mel frames of vocoder context on each side of a chunk (see the module docstring).
CONTEXT_FRAMES = (32, 32)
#: The Talker's sampling unless told otherwise: greedy, so that a voice says the same thing every time
#: (``omnilm.omni.talker.TALKER_SAMPLING`` is Qwen2.5-Omni's sampled setting).
GREEDY_CODES = SamplingParams(max_new_tokens=4096, temperature=0.0)

#: The vocoders a Token2Wav can hold (both satisfy omnilm.omni.vocoder.Vocoder; streaming needs to know which).
Token2WavVocoder = GriffinLimVocoder | BigVGAN


# ---------------------------------------------------------------------------------------------------------------
# Griffin–Lim on a window of an utterance
# ---------------------------------------------------------------------------------------------------------------


def frame_phases(seed: int, first: int, count: int, bins: int) -> torch.Tensor:
    """Starting phases (bins, count) of STFT frames first … first + count − 1 of an utterance: frame t's come from
    its own generator (seeded by ``seed`` and t), so any window of the utterance gets the same phases there."""
    columns = [torch.rand(bins, generator=torch.Generator().manual_seed((seed << 32) + t), dtype=torch.float64)
               for t in range(first, first + count)]
    return torch.stack(columns, dim=1) * (2 * math.pi)  # (bins, count)


def _unit(z: torch.Tensor) -> torch.Tensor:
    """z / |z|, with 1 where z is 0."""
    magnitude = z.abs()
    return torch.where(magnitude > 0, z / magnitude.clamp(min=1e-30), torch.ones_like(z))


def griffin_lim_window(vocoder: GriffinLimVocoder, log_mel: torch.Tensor, first: int, last: bool) -> torch.Tensor:
    """Griffin–Lim of the utterance frames first … first + n − 1 given as ``log_mel`` (n_mels, n), in [-1, 1].

    :func:`omnilm.omni.vocoder.griffin_lim` (NNLS mel inversion, then fast Griffin–Lim with the vocoder's
    iterations and momentum) from the starting phases of :func:`frame_phases`. ``last``: the window ends the
    utterance, so its last frame is repeated (the STFT frame Whisper dropped) and the result has n·hop samples,
    starting at sample first·hop. Otherwise frame first + n − 1 has no successor here and the result stops at its
    centre: (n − 1)·hop samples. Float32, or float64 for a float64 ``log_mel``.
    """
    if log_mel.shape[-1] < (2 if last else 3):
        raise ValueError(f"a Griffin–Lim window needs at least {2 if last else 3} frames, got {log_mel.shape[-1]}")
    magnitude = mel_to_power(log_mel.to(torch.float64 if log_mel.dtype == torch.float64 else torch.float32)).sqrt()
    if last:
        magnitude = torch.cat([magnitude, magnitude[:, -1:]], dim=-1)  # (bins, n + 1)
    bins, frames = magnitude.shape
    samples = (frames - 1) * HOP_LENGTH
    window = torch.hann_window(N_FFT, dtype=magnitude.dtype, device=magnitude.device)
    angles = frame_phases(vocoder.seed, first, frames, bins).to(magnitude.device, magnitude.dtype)
    t = torch.polar(torch.ones_like(magnitude), angles)  # (bins, frames) unit phases
    previous = magnitude * t
    for _ in range(vocoder.iterations):
        c = stft(istft(magnitude * _unit(t), N_FFT, HOP_LENGTH, window, length=samples), N_FFT, HOP_LENGTH, window)
        t = c + vocoder.momentum * (c - previous)
        previous = c
    return istft(magnitude * _unit(t), N_FFT, HOP_LENGTH, window, length=samples).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Token2Wav: codes → waveform
# ---------------------------------------------------------------------------------------------------------------


class Token2Wav(nn.Module):
    """DiT + vocoder + one speaker: codec ids → waveform, whole (:meth:`synthesize`) or streamed (:meth:`stream`).

    ``reference`` (1, T_ref, mel_dim) and ``speaker`` (1, enc_emb_dim) condition every frame. ``steps``,
    ``method``, ``guidance_scale`` and ``sway_coefficient`` are :func:`omnilm.omni.dit.sample`'s; ``seed`` fixes
    the DiT's noise, so one Token2Wav says the same codes the same way, streamed or not. ``past_blocks`` /
    ``future_blocks`` (None: the DiT's own reach) and ``context_frames`` are the streaming windows of the module
    docstring.
    """

    def __init__(self, dit: DiT, vocoder: Token2WavVocoder, reference: torch.Tensor, speaker: torch.Tensor,
                 steps: int = 10, method: str = "rk4", guidance_scale: float = 0.5, *,
                 sway_coefficient: float | None = -1.0,
                 seed: int = 0, past_blocks: int | None = None, future_blocks: int | None = None,
                 context_frames: tuple[int, int] = CONTEXT_FRAMES) -> None:
        super().__init__()
        c = dit.config
        mel_dim = N_MELS if isinstance(vocoder, GriffinLimVocoder) else vocoder.config.mel_dim
        if c.mel_dim != mel_dim:
            raise ConfigError(f"the DiT writes {c.mel_dim} mel bins, its {type(vocoder).__name__} reads {mel_dim}")
        if reference.dim() != 3 or reference.shape[0] != 1 or reference.shape[2] != c.mel_dim:
            raise ConfigError(f"reference must be (1, T_ref, {c.mel_dim}), got {tuple(reference.shape)}")
        if tuple(speaker.shape) != (1, c.enc_emb_dim):
            raise ConfigError(f"speaker must be (1, {c.enc_emb_dim}), got {tuple(speaker.shape)}")
        if method not in METHODS or steps < 2:
            raise ConfigError(f"need method in {METHODS} and steps ≥ 2, got {method!r} and {steps}")
        if c.block_size % c.repeats:
            raise ConfigError(f"streaming needs block_size ({c.block_size}) to be a multiple of repeats "
                              f"({c.repeats})")
        left, right = (int(v) for v in context_frames)
        if left < 0 or right < (1 if isinstance(vocoder, GriffinLimVocoder) else 0):
            raise ConfigError(f"context_frames {context_frames}: left ≥ 0, right ≥ 0 (≥ 1 for Griffin–Lim)")
        self.dit, self.vocoder = dit, vocoder
        self.register_buffer("reference", reference, persistent=False)
        self.register_buffer("speaker", speaker, persistent=False)
        self.steps, self.method, self.guidance_scale = steps, method, guidance_scale
        self.sway_coefficient, self.seed = sway_coefficient, seed
        self.past_blocks, self.future_blocks = past_blocks, future_blocks
        self.context_frames = (left, right)

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    @property
    def hop_length(self) -> int:
        """Waveform samples per mel frame."""
        return HOP_LENGTH if isinstance(self.vocoder, GriffinLimVocoder) else self.vocoder.config.hop_length

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.reference.device).manual_seed(self.seed)

    def _check(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as (1, n) long on the model's device, each one a row of the DiT's code embedding."""
        codes = torch.as_tensor(codes, dtype=torch.long).reshape(1, -1).to(self.reference.device)
        top = self.dit.config.num_embeds
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > top):
            raise ValueError(f"codes must lie in [0, {top}] (the DiT's code embedding), got "
                             f"{int(codes.min())}..{int(codes.max())}")
        return codes

    def noise(self, frames: int) -> torch.Tensor:
        """The DiT's starting noise (1, frames, mel_dim): blocks of ``block_size`` frames drawn in turn from the
        seeded generator, as :func:`omnilm.omni.dit.sample_stream` draws them."""
        c = self.dit.config
        generator = self._generator()
        blocks = [torch.randn((1, c.block_size, c.mel_dim), generator=generator, dtype=self.reference.dtype,
                              device=self.reference.device) for _ in range(-(-frames // c.block_size))]
        return torch.cat(blocks, dim=1)[:, :frames]

    def vocode(self, mel: torch.Tensor, first: int = 0, last: bool = True) -> torch.Tensor:
        """Waveform of mel frames (mel_dim, n) starting at utterance frame ``first`` (the whole utterance by default);
        Griffin–Lim windows not ending the utterance stop one frame short (see :func:`griffin_lim_window`)."""
        if isinstance(self.vocoder, GriffinLimVocoder):
            return griffin_lim_window(self.vocoder, mel, first, last)
        return self.vocoder.vocode(mel)

    @torch.no_grad()
    def mel(self, codes: torch.Tensor) -> torch.Tensor:
        """The whole utterance's mel (mel_dim, n·repeats) for codes (n,)."""
        codes = self._check(codes)
        return sample(self.dit, codes, self.reference, self.speaker, self.steps, self.method,
                      guidance_scale=self.guidance_scale, sway_coefficient=self.sway_coefficient,
                      noise=self.noise(codes.shape[1] * self.dit.config.repeats))[0]

    @torch.no_grad()
    def synthesize(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The waveform (n·repeats·hop_length,) of codes (n,): whole-utterance sampling, then vocoding."""
        codes = self._check(codes)
        if codes.shape[1] == 0:
            return self.reference.new_zeros(0)
        return self.vocode(self.mel(codes[0])).float()

    @torch.no_grad()
    def stream(self, codes: Iterable[int]) -> Iterator[torch.Tensor]:
        """Waveform chunks (samples,) of the codes as they arrive, one per DiT block; see the module docstring."""
        pieces = (self._check([code]) for code in codes)
        blocks = sample_stream(self.dit, pieces, self.reference, self.speaker, self.steps, self.method,
                               guidance_scale=self.guidance_scale, sway_coefficient=self.sway_coefficient,
                               generator=self._generator(), past_blocks=self.past_blocks,
                               future_blocks=self.future_blocks)
        left, right = self.context_frames
        hop = self.hop_length
        mel: torch.Tensor | None = None  # (mel_dim, frames sampled so far)
        waiting: deque[tuple[int, int]] = deque()  # frame spans of blocks not vocoded yet
        finished = False  # whether the codes have ended (the last frame sampled is the utterance's last)

        def chunk(start: int, end: int) -> torch.Tensor:
            assert mel is not None
            lo, hi = max(0, start - left), min(mel.shape[-1], end + right)
            wave = self.vocode(mel[:, lo:hi], lo, last=finished and hi == mel.shape[-1])
            return wave[(start - lo) * hop:(end - lo) * hop].float()

        for block in blocks:  # (1, mel_dim, frames of the block)
            mel = block[0] if mel is None else torch.cat([mel, block[0]], dim=-1)
            waiting.append((mel.shape[-1] - block.shape[-1], mel.shape[-1]))
            while waiting and waiting[0][1] + right <= mel.shape[-1]:
                yield chunk(*waiting.popleft())
        finished = True
        while waiting:
            yield chunk(*waiting.popleft())


def _vocoder_config(vocoder: Token2WavVocoder) -> dict[str, Any]:
    if isinstance(vocoder, GriffinLimVocoder):
        return {"type": "griffin_lim", "iterations": vocoder.iterations, "momentum": vocoder.momentum,
                "seed": vocoder.seed, "sample_rate": vocoder.sample_rate}
    return {"type": "bigvgan"} | bigvgan_config_to_hf(vocoder.config) | {"sample_rate": vocoder.sample_rate}


def save_token2wav(t2w: Token2Wav, folder: str | Path) -> Path:
    """Write ``t2w`` to ``folder``: weights, speaker tensors, then config.json (each atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {DIT_PREFIX + k: v.detach().contiguous() for k, v in t2w.dit.state_dict().items()}
    if isinstance(t2w.vocoder, BigVGAN):
        tensors |= {BIGVGAN_PREFIX + k: v.detach().contiguous() for k, v in t2w.vocoder.state_dict().items()}
    write_weights(folder, tensors)
    with atomic_path(folder / SPEAKER_TENSORS) as tmp:
        save_file({"ref_mel": t2w.reference.detach().cpu().contiguous(),
                   "cond": t2w.speaker.detach().cpu().contiguous()}, str(tmp))
    config = {"model_type": "omnilm_token2wav", "dit": dit_config_to_hf(t2w.dit.config),
              "vocoder": _vocoder_config(t2w.vocoder), "steps": t2w.steps, "method": t2w.method,
              "guidance_scale": t2w.guidance_scale, "sway_coefficient": t2w.sway_coefficient,
              "sample_rate": t2w.sample_rate, "seed": t2w.seed, "past_blocks": t2w.past_blocks,
              "future_blocks": t2w.future_blocks, "context_frames": list(t2w.context_frames),
              "dtype": str(t2w.reference.dtype).removeprefix("torch.")}
    write_json_atomic(folder / "config.json", config)
    return folder


def _vocoder_from_config(config: dict[str, Any], source: str) -> Token2WavVocoder:
    kind = config.get("type")
    if kind == "griffin_lim":
        return GriffinLimVocoder(iterations=int(config.get("iterations", 100)),
                                 momentum=float(config.get("momentum", 0.99)), seed=int(config.get("seed", 0)),
                                 sample_rate=int(config.get("sample_rate", GriffinLimVocoder.sample_rate)))
    if kind == "bigvgan":
        hf = {k: v for k, v in config.items() if k not in ("type", "sample_rate")}
        return BigVGAN(bigvgan_config_from_hf(hf, int(config.get("sample_rate", BigVGANConfig.sample_rate)), source))
    raise ConfigError(f"{source}: vocoder type {kind!r} is not 'griffin_lim' or 'bigvgan'")


def load_token2wav(folder: str | Path, dtype: torch.dtype | None = None) -> Token2Wav:
    """A Token2Wav from a folder written by :func:`save_token2wav`; every tensor is checked by name and shape."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing file config.json")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != "omnilm_token2wav":
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not omnilm_token2wav")
    if not (folder / SPEAKER_TENSORS).is_file():
        raise CheckpointError(f"{folder}: missing file {SPEAKER_TENSORS}")
    dit_config = dit_config_from_hf(config["dit"], source=str(path))
    vocoder = _vocoder_from_config(config["vocoder"], str(path))
    tensors = read_hf_tensors(folder)
    unknown = sorted(k for k in tensors if not k.startswith((DIT_PREFIX, BIGVGAN_PREFIX)))
    if unknown:
        raise CheckpointError(f"{folder}: unexpected tensor(s) {unknown}")
    with torch.device("meta"):
        dit = DiT(dit_config)
    dit_state = {k[len(DIT_PREFIX):]: v for k, v in tensors.items() if k.startswith(DIT_PREFIX)}
    check_tensors(folder, dit_state, {k: v.shape for k, v in dit.state_dict().items()})
    vocoder_state = {k[len(BIGVGAN_PREFIX):]: v for k, v in tensors.items() if k.startswith(BIGVGAN_PREFIX)}
    if isinstance(vocoder, BigVGAN):
        check_tensors(folder, vocoder_state, {k: v.shape for k, v in vocoder.state_dict().items()})
        vocoder.load_state_dict(vocoder_state)
        vocoder.eval()
        if dtype is not None:
            vocoder.to(dtype)
    elif vocoder_state:
        raise CheckpointError(f"{folder}: BigVGAN tensors beside a Griffin–Lim vocoder")
    if dtype is not None:
        dit_state = {k: v.to(dtype) for k, v in dit_state.items()}
    dit.load_state_dict(dit_state, assign=True)
    speaker = load_file(str(folder / SPEAKER_TENSORS))
    check_tensors(folder, speaker, {"ref_mel": torch.Size([1, speaker["ref_mel"].shape[1], dit_config.mel_dim]),
                                    "cond": torch.Size([1, dit_config.enc_emb_dim])})
    speaker_dtype = dtype or dit.proj_out.weight.dtype
    context = tuple(config.get("context_frames", CONTEXT_FRAMES))
    return Token2Wav(dit.eval(), vocoder, speaker["ref_mel"].to(speaker_dtype), speaker["cond"].to(speaker_dtype),
                     int(config["steps"]), config["method"], float(config["guidance_scale"]),
                     sway_coefficient=config.get("sway_coefficient", -1.0), seed=int(config.get("seed", 0)),
                     past_blocks=config.get("past_blocks"), future_blocks=config.get("future_blocks"),
                     context_frames=(int(context[0]), int(context[1]))).eval()


# ---------------------------------------------------------------------------------------------------------------
# Voice: a Thinker that speaks
# ---------------------------------------------------------------------------------------------------------------

# Fields of the Talker's config that must equal the Thinker's (the Talker positions the Thinker's prompt).
_SHARED_IDS = ("audio_token_id", "image_token_id", "video_token_id", "audio_start_token_id", "audio_end_token_id",
               "vision_start_token_id", "vision_end_token_id", "position_id_per_seconds", "seconds_per_chunk")


class Voice:
    """A Thinker with a Talker and a Token2Wav: its replies, or any text, as streamed speech.

    ``speaker_bos_id`` is the Thinker token the Talker was conditioned on as the speaker's text start (a
    Qwen2.5-Omni speaker's ``bos_token``). ``params``: the Talker's sampling (greedy by default). ``pacing``: the
    duration model of a paced Talker (:mod:`omnilm.omni.pacing`; its replies are read at the pace of speech).
    """

    def __init__(self, thinker: Thinker, talker: Talker, token2wav: Token2Wav, tokenizer: Any, speaker_bos_id: int,
                 params: SamplingParams = GREEDY_CODES, pacing: DurationModel | None = None) -> None:
        tc, c = talker.config, thinker.config
        if tc.embedding_size != c.text.d_model:
            raise ConfigError(f"the Talker reads vectors of width {tc.embedding_size}, the Thinker's are "
                              f"{c.text.d_model}")
        differ = {name: (getattr(tc, name), getattr(c, name)) for name in _SHARED_IDS
                  if getattr(tc, name) != getattr(c, name)}
        if tc.spatial_merge_size != c.vision.spatial_merge_size:
            differ["spatial_merge_size"] = (tc.spatial_merge_size, c.vision.spatial_merge_size)
        if differ:
            raise ConfigError(f"the Talker's and the Thinker's media settings differ (talker, thinker): {differ}")
        text_ids = {"speaker_bos_id": speaker_bos_id, "tts_text_start_token_id": tc.tts_text_start_token_id,
                    "tts_text_end_token_id": tc.tts_text_end_token_id,
                    "tts_text_pad_token_id": tc.tts_text_pad_token_id}
        outside = {k: v for k, v in text_ids.items() if not 0 <= v < c.text.vocab_size}
        if outside:
            raise ConfigError(f"{outside} are not tokens of the Thinker's vocabulary of {c.text.vocab_size}")
        self.thinker, self.talker, self.token2wav, self.tokenizer = thinker, talker, token2wav, tokenizer
        self.speaker_bos_id, self.params, self.pacing = speaker_bos_id, params, pacing

    @property
    def sample_rate(self) -> int:
        return self.token2wav.sample_rate

    @property
    def eos_ids(self) -> list[int]:
        """Tokens that end a reply: the tokenizer's end of text and end of turn, the Thinker's end of text."""
        ids = (self.tokenizer.eos_id, self.thinker.config.text.eos_token_id, self.tokenizer.token_to_id(IM_END))
        return sorted({i for i in ids if i is not None})

    def codes(self, batch: dict[str, Any], reply_ids: Sequence[int],
              params: SamplingParams | None = None) -> Iterator[int]:
        """The Talker's codes for reply ``reply_ids`` to the prompt ``batch`` (one row, as ``OmniProcessor``
        collates it, media included), one at a time.

        The reply is read up to its first end token (:attr:`eos_ids`); an end token is added when it has none, so
        every token before it is spoken. An empty reply says nothing.
        """
        ids = batch["input_ids"]
        if ids.shape[0] != 1:
            raise ValueError(f"a Voice speaks one reply at a time, got a batch of {ids.shape[0]}")
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("the prompt batch holds padding; collate the one prompt alone")
        eos = self.eos_ids
        reply = list(reply_ids)
        ends = [i for i, token in enumerate(reply) if token in eos]
        reply = reply[:ends[0]] if ends else reply
        if not reply:
            return
        device = self.talker.codec_head.weight.device
        media = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in media_arguments(batch).items()}
        inputs = talker_inputs(self.thinker, self.talker.config, ids.to(device), reply + eos[:1],
                               self.speaker_bos_id, eos, **media)
        params = params or self.params
        if self.pacing is not None:
            inputs = self.paced(inputs, reply, *self.pacing.plan(self.tokenizer, reply))
            # A paced reply has a planned length: a Talker that misses the end code stops at twice that.
            planned = inputs.reply.shape[1] - 1
            params = replace(params, max_new_tokens=min(params.max_new_tokens, 2 * planned + 25))
        yield from generate_codes(self.talker, inputs, params)

    def paced(self, inputs: TalkerInputs, reply: Sequence[int], counts: Sequence[int], spoken: Sequence[float],
              ) -> TalkerInputs:
        """A paced Talker's ``inputs`` for ``reply`` laid out by ``counts`` codes per token (``spoken`` of them
        speech), spelled when its duration model says so (:func:`~omnilm.omni.pacing.paced_reply`)."""
        assert self.pacing is not None, "only a paced Talker lays out its reply track"
        return paced_reply(inputs, counts, spoken, self.pacing.spelled, self.tokenizer, reply)

    def speak(self, batch: dict[str, Any], reply_ids: Sequence[int],
              params: SamplingParams | None = None) -> Iterator[np.ndarray]:
        """Waveform chunks (float32, mono, in [-1, 1], at :attr:`sample_rate`) of the reply, yielded while the
        Talker is still writing codes (:meth:`codes` feeds :meth:`Token2Wav.stream`)."""
        for chunk in self.token2wav.stream(self.codes(batch, reply_ids, params)):
            yield chunk.detach().float().cpu().numpy()

    def text_prompt(self, text: str) -> tuple[dict[str, Any], list[int]]:
        """The prompt batch and reply that :meth:`speak_text` speaks: one user turn, ``SAY_PROMPT`` with the
        text (``"Repeat after me: {text}"``), and the text itself as the reply (its tokens, special-token strings
        encoded as plain text)."""
        thinker = self.thinker
        processor = OmniProcessor(self.tokenizer, thinker.config, thinker.media_budget)
        example = processor.encode([{"role": "user", "content": SAY_PROMPT.format(text=text)}],
                                   add_generation_prompt=True)
        return processor.collate([example], pad_id=0, left_pad=True), self.tokenizer.encode(text, special=False)

    def speak_text(self, text: str, params: SamplingParams | None = None) -> Iterator[np.ndarray]:
        """Text to speech: the user turn ``"Repeat after me: {text}"`` and the reply ``text`` (no Thinker
        generation), spoken as :meth:`speak` speaks a reply."""
        batch, reply = self.text_prompt(text)
        return self.speak(batch, reply, params)


def speak_stream(voice: Voice, batch: dict[str, Any], reply_ids: Sequence[int],
                 params: SamplingParams | None = None) -> Iterator[np.ndarray]:
    """:meth:`Voice.speak`: waveform chunks of a reply while the Talker is still decoding."""
    return voice.speak(batch, reply_ids, params)


def save_voice(folder: str | Path, talker: Talker, token2wav: Token2Wav, speaker_bos_id: int) -> Path:
    """Give the thinker folder ``folder`` a voice: ``talker/`` (with ``speaker.json``) and ``token2wav/``."""
    from omnilm.omni.thinker import is_thinker_folder

    folder = Path(folder)
    if not is_thinker_folder(folder):
        raise CheckpointError(f"{folder}: not a thinker folder (a voice is saved beside its Thinker)")
    save_talker(talker, folder / TALKER_DIR)
    write_json_atomic(folder / TALKER_DIR / SPEAKER_FILE, {"speaker_bos_id": int(speaker_bos_id)})
    save_token2wav(token2wav, folder / TOKEN2WAV_DIR)
    return folder


def has_voice(folder: str | Path) -> bool:
    """Whether ``folder`` holds any part of a voice (``talker/`` or ``token2wav/``)."""
    return any((Path(folder) / name / "config.json").is_file() for name in (TALKER_DIR, TOKEN2WAV_DIR))


def load_voice(folder: str | Path, thinker: Thinker | None = None, tokenizer: Any = None,
               dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Voice | None:
    """The Voice of a thinker folder, or None when it has neither ``talker/`` nor ``token2wav/``.

    ``thinker`` and ``tokenizer`` already loaded from the folder are reused. A folder with only part of a voice
    is refused, naming what is missing.
    """
    folder = Path(folder)
    if not has_voice(folder):
        return None
    needed = [TALKER_DIR + "/config.json", f"{TALKER_DIR}/{SPEAKER_FILE}", TOKEN2WAV_DIR + "/config.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: an incomplete voice, missing {missing} (a voice is a talker/ folder with "
                              f"{SPEAKER_FILE} and a token2wav/ folder)")
    from omnilm.tokenizer import Tokenizer

    if thinker is None:
        thinker = load_thinker(folder, dtype)
    tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_dir(folder)
    speaker = json.loads((folder / TALKER_DIR / SPEAKER_FILE).read_text(encoding="utf-8"))
    talker = load_talker(folder / TALKER_DIR, dtype)
    token2wav = load_token2wav(folder / TOKEN2WAV_DIR, dtype)
    if device is not None:
        thinker, talker, token2wav = thinker.to(device), talker.to(device), token2wav.to(device)
    return Voice(thinker, talker, token2wav, tokenizer, int(speaker["speaker_bos_id"]),
                 pacing=DurationModel.load(folder / TALKER_DIR))
