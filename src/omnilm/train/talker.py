"""Stage ``talker``: a Talker learns to speak a frozen Thinker's replies as speech codec codes.

Written for this project. The stage starts from a thinker folder (``init_from``) and reads chat records whose
reply was spoken in the assistant's voice (``reply_audio``, e.g. ``speech.jsonl`` of ``omnilm data synth omni``).
The codec (``codec``: a folder of :mod:`omnilm.omni.codec`) turns each reply's audio into codes. The Thinker is
frozen, so each record's Talker inputs (prompt rows, positions and reply track, :func:`talker_inputs`) are computed
once before training; the Talker is then trained by teacher forcing: the last prompt row predicts the first code,
each step row (code i + reply vector i) the next code, the last one the codec end code.

The stage's model folder is the thinker folder with the Talker in ``talker/`` (transformers'
``Qwen2_5OmniTalkerForConditionalGeneration`` layout) and the speaker's id in ``talker/speaker.json``; a
``token2wav/`` folder already there is carried along.

Options:

``codec`` (required)      the codec folder (relative paths are inside the run folder)
``talker`` ({})           decoder fields of a new Talker (``n_layer``, ``d_model``, ``n_head``, ``n_kv_head``,
                          ``d_ff``, ``max_seq_len``, ``mrope_section``); defaults: 4 layers, d_model 192
``max_codes`` (400)       replies longer than this many codes (8 s) are skipped
``paced`` (false)         read each reply at the pace of its speech (:mod:`omnilm.omni.pacing`): records need
                          ``reply_words`` timings; the fitted duration model is saved as ``talker/pacing.json``
``spelled`` (0)           (paced Talkers) characters read at each step along with the token: the letter or
                          digit being said and the ones after it (:func:`~omnilm.omni.pacing.paced_reply`); saved
                          in ``talker/pacing.json``
``code_dropout`` (0)      while training, this fraction of the codes the Talker reads back (not the ones it
                          predicts) is replaced by the codec mask code, drawn per batch from its examples: the
                          Talker cannot lean on its own last codes alone and must read the reply track
``strict`` (false)        a bad record fails the run instead of being skipped and reported
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ConfigError
from omnilm.objectives.lm import IGNORE_INDEX
from omnilm.train.stage import StageConfig, register_stage, stage_options
from omnilm.train.trainer import SummedObjective, Trainer, TrainResult

TALKER_OPTIONS: dict[str, Any] = {"codec": "", "talker": {}, "max_codes": 400, "paced": False,
                                  "spelled": 0, "code_dropout": 0.0, "strict": False}
TALKER_DECODER = {"n_layer": 4, "d_model": 192, "n_head": 6, "n_kv_head": 2, "d_ff": 512, "max_seq_len": 1024,
                  "mrope_section": [4, 6, 6]}


def new_talker_config(thinker: Any, tokenizer: Any, codes: int, decoder: dict[str, Any]) -> Any:
    """A Talker for ``thinker``: the codec's ``codes`` plus four codec specials (pad, start, end, mask) after them;
    the reply track's start / end / pad are the chat's ``<|im_start|>`` / ``<|im_end|>`` / padding tokens."""
    from omnilm.model.config import ModelConfig
    from omnilm.omni.talker import TalkerConfig
    from omnilm.tokenizer.tokenizer import IM_END, IM_START

    fields = TALKER_DECODER | decoder
    unknown = sorted(set(fields) - set(TALKER_DECODER))
    if unknown:
        raise ConfigError(f"talker: unknown decoder field(s) {unknown}; known: {sorted(TALKER_DECODER)}")
    text = ModelConfig(family="qwen2", vocab_size=codes + 4, tie_embeddings=False,
                       **{k: tuple(v) if k == "mrope_section" else v for k, v in fields.items()})
    c = thinker.config
    ids = {name: getattr(c, name) for name in ("audio_token_id", "image_token_id", "video_token_id",
                                               "audio_start_token_id", "audio_end_token_id",
                                               "vision_start_token_id", "vision_end_token_id")}
    return TalkerConfig(text=text, embedding_size=c.text.d_model, tts_codec_pad_token_id=codes,
                        tts_codec_start_token_id=codes + 1, tts_codec_end_token_id=codes + 2,
                        tts_codec_mask_token_id=codes + 3, tts_text_start_token_id=tokenizer.token_to_id(IM_START),
                        tts_text_end_token_id=tokenizer.token_to_id(IM_END),
                        tts_text_pad_token_id=tokenizer.pad_id, position_id_per_seconds=c.position_id_per_seconds,
                        seconds_per_chunk=c.seconds_per_chunk, spatial_merge_size=c.vision.spatial_merge_size, **ids)


class TalkerTrainee(nn.Module):
    """The Talker being trained, saved as ``talker/`` inside a copy of the thinker folder it speaks for."""

    def __init__(self, talker: nn.Module, thinker_folder: Path, speaker_bos_id: int, pacing: Any = None) -> None:
        super().__init__()
        self.talker = talker
        self.thinker_folder = Path(thinker_folder)
        self.speaker_bos_id = speaker_bos_id
        self.pacing = pacing  # a DurationModel when the Talker reads its replies paced

    def flops_per_token(self, seq_len: int) -> float:
        c = self.talker.config.text
        params = sum(p.numel() for n, p in self.talker.named_parameters() if "embed" not in n)
        return 6.0 * params + 12.0 * c.n_layer * c.n_head * c.dim_per_head * seq_len

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None, state: dict[str, torch.Tensor] | None = None,
                        ) -> None:
        from omnilm.omni.speech import SPEAKER_FILE, TALKER_DIR
        from omnilm.omni.talker import save_talker
        from omnilm.utils.atomic import write_json_atomic

        folder = Path(folder)
        copy_thinker_folder(self.thinker_folder, folder, skip=(TALKER_DIR,))
        talker_state = None if state is None else {k.removeprefix("talker."): v for k, v in state.items()}
        save_talker(self.talker, folder / TALKER_DIR, state=talker_state)
        write_json_atomic(folder / TALKER_DIR / SPEAKER_FILE, {"speaker_bos_id": self.speaker_bos_id})
        if self.pacing is not None:
            self.pacing.save(folder / TALKER_DIR)

    def read_state(self, folder: str | Path) -> dict[str, torch.Tensor]:
        from omnilm.omni.speech import TALKER_DIR
        from omnilm.omni.talker import load_talker

        return {f"talker.{k}": v for k, v in load_talker(Path(folder) / TALKER_DIR).state_dict().items()}


def copy_thinker_folder(source: Path, target: Path, skip: tuple[str, ...]) -> None:
    """The thinker folder's files (and its voice subfolders except ``skip``) into ``target``; checkpoint state
    files are not model files and stay behind."""
    from omnilm.train.checkpoint import STATE_FILE, TENSORS_FILE

    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name in skip or path.name in (STATE_FILE, TENSORS_FILE) or path.name.endswith(".tmp"):
            continue
        if path.is_dir():
            shutil.copytree(path, target / path.name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target / path.name)


def reply_audio_path(record: dict[str, Any], root: Path) -> Path:
    path = Path(record["reply_audio"])
    return path if path.is_absolute() else root / path


@torch.no_grad()
def prepare_examples(thinker: nn.Module, tokenizer: Any, talker_config: Any, codec: Any,
                     records: list[tuple[dict[str, Any], Path]], max_codes: int, strict: bool, report: Any,
                     paced: bool = False, spelled: int = 0) -> tuple[list[dict[str, torch.Tensor]], Any]:
    """Each record's Talker inputs (from the frozen Thinker) and the codes of its spoken reply; with ``paced``
    the reply tracks laid out by the records' word timings (``spelled``: with the letters said), and the duration
    model fitted to them (else None)."""
    from omnilm.omni.audio import load_audio
    from omnilm.omni.pacing import DurationModel, aligned_counts, paced_reply
    from omnilm.omni.processor import OmniProcessor, media_arguments
    from omnilm.omni.talker import talker_inputs
    from omnilm.tokenizer.tokenizer import IM_END

    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget)
    eos = [tokenizer.token_to_id(IM_END)]
    examples, timed = [], []
    for record, root in records:
        where = f"{record.get('reply_audio')}"
        if not record.get("reply_audio"):
            report.skip(where, "record has no reply_audio", strict)
            continue
        processor.root = root
        example = processor.encode(record["messages"])
        ids, mask = example.ids, example.mask
        start = mask.index(1) if 1 in mask else len(mask)
        reply = [t for t, m in zip(ids, mask, strict=True) if m]
        if len(reply) < 2:
            report.skip(where, "reply shorter than two tokens", strict)
            continue
        if paced and not record.get("reply_words"):
            report.skip(where, "record has no reply_words timings (paced)", strict)
            continue
        batch = processor.collate([processor.encode(record["messages"][:-1], add_generation_prompt=True)],
                                  tokenizer.pad_id)
        if batch["input_ids"].shape[1] != start:
            raise RuntimeError(f"{where}: prompt and conversation encode differently")
        codes = codec.encode(load_audio(reply_audio_path(record, root)))
        if len(codes) > max_codes:
            report.skip(where, f"reply speech of {len(codes)} codes is over max_codes {max_codes}", strict)
            continue
        inputs = talker_inputs(thinker, talker_config, batch["input_ids"], reply, talker_config.tts_text_start_token_id,
                               eos_ids=eos, **media_arguments(batch))
        if paced:
            timing = (tokenizer, reply[:-1], record["reply_words"], len(codes), codec.config.code_rate)
            try:
                counts, said = aligned_counts(*timing)
            except ValueError as error:
                report.skip(where, str(error), strict)
                continue
            inputs = paced_reply(inputs, counts, said, spelled, tokenizer, reply[:-1])
            timed.append(timing)
        examples.append({"prompt": inputs.prompt[0], "positions": inputs.positions(len(codes) + 1)[:, 0],
                         "reply": inputs.reply_rows(0, len(codes) + 1)[0], "codes": codes.long()})
    return examples, (replace(DurationModel.fit(timed), spelled=spelled) if paced else None)


def talker_loss_sums(model: nn.Module, batch: list[dict[str, torch.Tensor]], code_dropout: float = 0.0,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Summed cross-entropy of every code and the end code, teacher-forced, the batch in one forward pass: prompts
    left-padded to a common length (so every prompt's last row, the codec cue, sits in the same column), step rows
    right-padded; padding is masked out of attention and loss. In training, ``code_dropout`` of the codes read back
    are the codec mask code (drawn from a generator seeded by the batch's codes, so a resumed run draws alike)."""
    talker = model.talker
    end = talker.config.tts_codec_end_token_id
    first = batch[0]["prompt"]
    rows, width = len(batch), first.shape[-1]
    prompt_len = max(e["prompt"].shape[0] for e in batch)
    steps = max(len(e["codes"]) for e in batch)
    prompt = first.new_zeros(rows, prompt_len, width)
    reply = first.new_zeros(rows, steps, width)
    codes = batch[0]["codes"].new_full((rows, steps), end)
    positions = batch[0]["positions"].new_zeros(3, rows, prompt_len + steps)
    mask = batch[0]["codes"].new_zeros(rows, prompt_len + steps)
    targets = batch[0]["codes"].new_full((rows, steps + 1), IGNORE_INDEX)
    for row, example in enumerate(batch):
        length, count = example["prompt"].shape[0], len(example["codes"])
        pad = prompt_len - length
        prompt[row, pad:] = example["prompt"]
        codes[row, :count] = example["codes"]
        reply[row, :count] = example["reply"][:count]
        positions[:, row, pad:prompt_len + count] = example["positions"][:, :length + count]
        mask[row, pad:prompt_len + count] = 1
        # The last prompt row (the codec cue) predicts codes[0]; step row i (codes[i] + reply vector i) predicts
        # codes[i + 1], and the last one the end code: as generate_codes feeds them.
        targets[row, :count] = example["codes"]
        targets[row, count] = end
    if code_dropout and model.training:
        seed = int(sum(int(e["codes"].sum()) * (k + 1) for k, e in enumerate(batch))) & 0x7FFFFFFF
        dropped = torch.rand(codes.shape, generator=torch.Generator().manual_seed(seed)) < code_dropout
        codes = codes.masked_fill(dropped.to(codes.device), talker.config.tts_codec_mask_token_id)
    logits = talker(prompt, codes, reply, position_ids=positions, attention_mask=mask)
    predicted = logits[:, prompt_len - 1:]  # (B, steps + 1, V)
    total = F.cross_entropy(predicted.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    scored = targets != IGNORE_INDEX
    correct = int((predicted.argmax(-1)[scored] == targets[scored]).sum())
    return {"codes": total}, {"code_accuracy": correct / max(int(scored.sum()), 1)}


def code_units(batch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    return {"codes": float(sum(len(example["codes"]) + 1 for example in batch))}


@register_stage("talker")
def run_talker_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.data.examples import ExampleLoader
    from omnilm.omni.codec import Codec
    from omnilm.omni.talker import Talker
    from omnilm.omni.thinker import is_thinker_folder, load_thinker
    from omnilm.tokenizer import Tokenizer
    from omnilm.train.checkpoint import latest_checkpoint
    from omnilm.train.distributed import init_distributed
    from omnilm.train.omni_sft import read_omni_records
    from omnilm.train.sft import print_read_report
    from omnilm.train.trainer import resolve_device

    options = stage_options(config, TALKER_OPTIONS)
    if options["spelled"] and not options["paced"]:
        raise ConfigError(f"stage {config.name!r}: options.spelled reads letters at the pace of speech; set paced")
    if not config.init_from or not is_thinker_folder(config.init_from):
        raise ConfigError(f"stage {config.name!r}: a talker stage starts from a thinker folder (init_from)")
    if not options["codec"]:
        raise ConfigError(f"stage {config.name!r}: options.codec (a speech codec folder) is required")
    train = config.train
    device = resolve_device(train.device)
    info = init_distributed(device.type)
    thinker = load_thinker(config.init_from, dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = Tokenizer.from_dir(config.init_from)
    codec = Codec.load(options["codec"])
    talker_folder = Path(config.init_from) / "talker"  # speech.TALKER_DIR
    if (talker_folder / "config.json").exists():  # a Talker trained before goes on training
        from omnilm.omni.talker import load_talker

        talker = load_talker(talker_folder, dtype=torch.float32)
    else:
        torch.manual_seed(train.seed)
        talker = Talker(new_talker_config(thinker, tokenizer, codec.codes, dict(options["talker"])))
    records, report = read_omni_records(config, bool(options["strict"]))
    examples, pacing = prepare_examples(thinker, tokenizer, talker.config, codec, records, int(options["max_codes"]),
                                        bool(options["strict"]), report, bool(options["paced"]),
                                        int(options["spelled"]))
    model = TalkerTrainee(talker.train(), Path(config.init_from), talker.config.tts_text_start_token_id, pacing)
    del thinker
    if info.is_main:
        print_read_report(config.name, report, len(examples))
        lengths = [len(e["codes"]) for e in examples]
        print(f"[{config.name}] {len(examples):,} spoken replies, {sum(lengths):,} codes "
              f"({sum(lengths) / codec.config.code_rate / 60:.1f} min of speech)", flush=True)
    model = model.to(device)

    def collate(indices: list[int]) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in examples[i].items()} for i in indices]

    loader = ExampleLoader(len(examples), train.batch_size, collate, seed=train.seed, rank=info.rank,
                           world_size=info.world_size)
    resume_from = latest_checkpoint(out_dir / "checkpoints") if resume else None
    loss_sums = partial(talker_loss_sums, code_dropout=float(options["code_dropout"]))
    trainer = Trainer(model, SummedObjective(loss_sums, code_units), loader, train, out_dir, info=info,
                      tokenizer=tokenizer, tokens_per_batch=train.batch_size * train.seq_len)
    return trainer.fit(resume=resume_from is not None)


def read_speaker(folder: str | Path) -> int:
    """The speaker's text-start id a trained Talker was conditioned on (``talker/speaker.json``)."""
    from omnilm.omni.speech import SPEAKER_FILE, TALKER_DIR

    return int(json.loads((Path(folder) / TALKER_DIR / SPEAKER_FILE).read_text(encoding="utf-8"))["speaker_bos_id"])
