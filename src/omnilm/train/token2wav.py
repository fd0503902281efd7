"""Stage ``token2wav``: the DiT that turns speech codes into mel frames, trained by flow matching.

Written for this project. Data: records with a spoken reply (``reply_audio``, e.g. ``speech.jsonl`` of ``omnilm
data synth omni``), each distinct file once. The codec (``codec``: a folder of :mod:`omnilm.omni.codec`) gives each
reply's codes; the target is the reply's own log-mel (the Whisper-style 128 bins of :mod:`omnilm.omni.audio`, 100
frames per second, 2 per code), which the Griffin–Lim vocoder turns into audio. Each step trains on random crops
of ``crop_codes`` codes, aligned to code boundaries. The speaker conditioning is one fixed reference mel (the first
training reply: a single assistant voice) and a zero speaker vector.

The stage's model folder is the ``init_from`` folder (a thinker, with its Talker if one was trained) with the
Token2wav in ``token2wav/`` (:func:`omnilm.omni.speech.save_token2wav`).

Options:

``codec`` (required)      the codec folder (relative paths are inside the run folder)
``dit`` ({})              DiTConfig fields of the new DiT; defaults: 4 layers, width 192, blocks of 24 frames
``crop_codes`` (100)      codes per training crop (2 s); shorter replies are used whole
``steps`` (10)            ODE steps when speaking, ``method`` (rk4) its solver, ``guidance_scale`` (0.5)
``context_frames``        mel frames of Griffin–Lim context on each side of a streamed chunk (default [32, 32]);
                          fewer on the right start the audio sooner (:mod:`omnilm.omni.speech`: (24, 24) keeps chunks
                          within 1e-3 of whole-utterance vocoding)
``strict`` (false)        a bad record fails the run instead of being skipped and reported
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.train.stage import StageConfig, register_stage, stage_options
from omnilm.train.trainer import SummedObjective, Trainer, TrainResult

TOKEN2WAV_OPTIONS: dict[str, Any] = {"codec": "", "dit": {}, "crop_codes": 100, "steps": 10, "method": "rk4",
                                     "guidance_scale": 0.5, "context_frames": [32, 32], "strict": False}
SMALL_DIT = {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 48, "emb_dim": 128,
             "block_size": 24, "look_ahead_layers": [2], "look_backward_layers": [0], "mel_dim": 128,
             "dropout": 0.0, "enc_emb_dim": 64, "enc_dim": 64, "enc_channels": [64, 64, 64, 64, 192],
             "enc_attention_channels": 32, "enc_se_channels": 32}


class Token2WavTrainee(nn.Module):
    """The DiT being trained with its fixed speaker conditioning; saved as ``token2wav/`` inside a copy of the
    folder it speaks for."""

    def __init__(self, dit: nn.Module, reference: torch.Tensor, speaker: torch.Tensor, source: Path,
                 settings: dict[str, Any]) -> None:
        super().__init__()
        self.dit = dit
        self.register_buffer("reference", reference)  # (1, T_ref, mel_dim)
        self.register_buffer("speaker", speaker)  # (1, enc_emb_dim)
        self.source, self.settings = Path(source), settings

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * sum(p.numel() for p in self.dit.parameters())

    def token2wav(self, state: dict[str, torch.Tensor] | None = None) -> Any:
        from omnilm.omni.speech import Token2Wav
        from omnilm.omni.vocoder import GriffinLimVocoder

        dit = self.dit
        if state is not None:
            import copy

            dit = copy.deepcopy(self.dit)
            dit.load_state_dict({k.removeprefix("dit."): v for k, v in state.items() if k.startswith("dit.")})
        left, right = self.settings["context_frames"]
        return Token2Wav(dit, GriffinLimVocoder(), self.reference, self.speaker, steps=self.settings["steps"],
                         method=self.settings["method"], guidance_scale=self.settings["guidance_scale"],
                         context_frames=(int(left), int(right)))

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None, state: dict[str, torch.Tensor] | None = None,
                        ) -> None:
        from omnilm.omni.speech import TOKEN2WAV_DIR, save_token2wav
        from omnilm.train.talker import copy_thinker_folder

        folder = Path(folder)
        copy_thinker_folder(self.source, folder, skip=(TOKEN2WAV_DIR,))
        save_token2wav(self.token2wav(state), folder / TOKEN2WAV_DIR)

    def read_state(self, folder: str | Path) -> dict[str, torch.Tensor]:
        from omnilm.omni.speech import TOKEN2WAV_DIR, load_token2wav

        loaded = load_token2wav(Path(folder) / TOKEN2WAV_DIR)
        return {f"dit.{k}": v for k, v in loaded.dit.state_dict().items()} | {
            "reference": loaded.reference, "speaker": loaded.speaker}


def reply_mels(records: list[tuple[dict[str, Any], Path]], codec: Any, strict: bool, report: Any,
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log-mel (mel, 2n), codes (n,)) of every distinct spoken reply."""
    from omnilm.omni.audio import load_audio, log_mel_spectrogram
    from omnilm.train.talker import reply_audio_path

    seen: set[Path] = set()
    out = []
    for record, root in records:
        if not record.get("reply_audio"):
            report.skip(str(root), "record has no reply_audio", strict)
            continue
        path = reply_audio_path(record, root)
        if path in seen:
            continue
        seen.add(path)
        wave = load_audio(path)
        mel = log_mel_spectrogram(wave)  # (128, T)
        codes = codec.encode(wave)
        frames = 2 * len(codes)
        if mel.shape[1] < frames:  # an odd last frame was paired with itself: repeat it
            mel = torch.cat([mel, mel[:, -1:]], dim=1)
        out.append((mel[:, :frames], codes.long()))
    return out


@register_stage("token2wav")
def run_token2wav_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.data.examples import ExampleLoader
    from omnilm.omni.codec import Codec
    from omnilm.omni.dit import DiT, DiTConfig, flow_matching_loss
    from omnilm.tokenizer import Tokenizer
    from omnilm.train.checkpoint import latest_checkpoint
    from omnilm.train.distributed import init_distributed
    from omnilm.train.omni_sft import read_omni_records
    from omnilm.train.sft import print_read_report
    from omnilm.train.trainer import resolve_device

    options = stage_options(config, TOKEN2WAV_OPTIONS)
    if not config.init_from:
        raise ConfigError(f"stage {config.name!r}: a token2wav stage starts from a thinker folder (init_from)")
    if not options["codec"]:
        raise ConfigError(f"stage {config.name!r}: options.codec (a speech codec folder) is required")
    if options["method"] not in ("euler", "rk4"):
        raise ConfigError(f"stage {config.name!r}: method must be euler or rk4, not {options['method']!r}")
    train = config.train
    device = resolve_device(train.device)
    info = init_distributed(device.type)
    codec = Codec.load(options["codec"])
    records, report = read_omni_records(config, bool(options["strict"]))
    pairs = reply_mels(records, codec, bool(options["strict"]), report)
    if not pairs:
        raise ConfigError(f"stage {config.name!r}: no records with reply_audio")
    dit_fields = SMALL_DIT | {"num_embeds": codec.codes} | dict(options["dit"])
    torch.manual_seed(train.seed)
    dit = DiT(DiTConfig(**dit_fields))
    if dit.config.repeats != codec.config.frames_per_code or dit.config.mel_dim != pairs[0][0].shape[0]:
        raise ConfigError(f"stage {config.name!r}: the DiT must take {codec.config.frames_per_code} mel frames per "
                          f"code and {pairs[0][0].shape[0]} mel bins (the codec's)")
    reference = pairs[0][0].T[None].clone()  # (1, T_ref, mel)
    speaker = torch.zeros(1, dit.config.enc_emb_dim)
    settings = {k: options[k] for k in ("steps", "method", "guidance_scale", "context_frames")}
    model = Token2WavTrainee(dit.train(), reference, speaker, Path(config.init_from), settings).to(device)
    if info.is_main:
        print_read_report(config.name, report, len(pairs))
        seconds = sum(mel.shape[1] for mel, _ in pairs) / 100
        print(f"[{config.name}] {len(pairs):,} distinct spoken replies, {seconds / 60:.1f} min of speech", flush=True)
    crop = int(options["crop_codes"])

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        # Crops of one length per batch (the shortest reply's, at most crop_codes), at seeded random offsets.
        length = min(crop, *(len(pairs[i][1]) for i in indices))
        generator = torch.Generator().manual_seed(hash((train.seed, *indices)) & 0x7FFFFFFF)
        mels, codes = [], []
        for i in indices:
            mel, code = pairs[i]
            start = int(torch.randint(0, len(code) - length + 1, (1,), generator=generator))
            codes.append(code[start:start + length])
            mels.append(mel[:, 2 * start:2 * (start + length)])
        return {"mel": torch.stack(mels).to(device), "codes": torch.stack(codes).to(device),
                "seed": int(torch.randint(0, 2**31 - 1, (1,), generator=generator))}

    def loss_sums(module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, float]]:
        size = batch["mel"].shape[0]
        generator = torch.Generator(device=batch["mel"].device).manual_seed(batch["seed"])
        loss = flow_matching_loss(module.dit, batch["mel"], batch["codes"], module.reference.expand(size, -1, -1),
                                  module.speaker.expand(size, -1), generator)
        return {"flow": loss * size}, {}

    def units(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"flow": float(batch["mel"].shape[0])}

    loader = ExampleLoader(len(pairs), train.batch_size, collate, seed=train.seed, rank=info.rank,
                           world_size=info.world_size)
    resume_from = latest_checkpoint(out_dir / "checkpoints") if resume else None
    tokenizer = Tokenizer.from_dir(config.init_from)
    trainer = Trainer(model, SummedObjective(loss_sums, units), loader, train, out_dir, info=info,
                      tokenizer=tokenizer, tokens_per_batch=train.batch_size * 2 * crop)
    return trainer.fit(resume=resume_from is not None)
