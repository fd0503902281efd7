"""The talker and token2wav stages on a tiny random Thinker and hand-made "speech" (tone sequences): trained by
teacher forcing, a Talker then generates exactly the codes it learnt, so training and generation read the same
rows; the token2wav stage lowers its flow-matching loss and writes a folder that speaks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilm.omni.audio import write_wav
from tiny_thinker import tiny_thinker_folder

REPLIES = ["red", "blue sky", "green"]


def tones(seed: int) -> np.ndarray:
    """Half a second to a second of tone pieces of random pitch: distinct frames for the codec to tell apart."""
    rng = np.random.default_rng(seed)
    pieces = [np.sin(2 * np.pi * rng.uniform(200, 2000) * np.arange(1600) / 16000) * 0.3
              for _ in range(rng.integers(5, 10))]
    return np.concatenate(pieces).astype(np.float32)


@pytest.fixture(scope="module")
def speech_setup(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict:  # noqa: ANN001
    from omnilm.omni.audio import load_audio
    from omnilm.omni.codec import fit_codec

    root = tmp_path_factory.mktemp("speech")
    thinker = tiny_thinker_folder(root / "thinker", tokenizer)
    data = root / "data"
    data.mkdir()
    records = []
    for i, reply in enumerate(REPLIES):
        write_wav(data / f"reply{i}.wav", tones(i))
        records.append({"messages": [{"role": "user", "content": [{"type": "text", "text": f"Colour {i}?"}]},
                                     {"role": "assistant", "content": reply}],
                        "reply_audio": f"reply{i}.wav", "split": "train"})
    (data / "speech.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    codec = fit_codec([load_audio(data / f"reply{i}.wav") for i in range(len(REPLIES))], 24, iterations=20)
    codec.save(root / "codec")
    return {"root": root, "thinker": thinker, "data": data / "speech.jsonl", "codec": root / "codec",
            "codec_obj": codec}


def stage_config(setup: dict, stage_type: str, init_from: Path, steps: int, options: dict) -> object:
    from omnilm.train.stage import StageConfig

    return StageConfig.from_mapping({
        "name": stage_type, "type": stage_type, "init_from": str(init_from), "data": {"speech": str(setup["data"])},
        "options": {"codec": str(setup["codec"])} | options,
        "train": {"max_steps": steps, "batch_size": 3, "seq_len": 64, "lr": 3e-3, "log_every": 10,
                  "checkpoint_every": steps, "progress": False, "device": "cpu", "warmup_steps": 0,
                  "weight_decay": 0.0}})


TINY_TALKER = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "d_ff": 128, "mrope_section": [2, 3, 3]}


@pytest.fixture(scope="module")
def talker_run(speech_setup: dict) -> Path:
    from omnilm.train.stage import run_stage

    out = speech_setup["root"] / "talker-run"
    run_stage(stage_config(speech_setup, "talker", speech_setup["thinker"], 150, {"talker": TINY_TALKER}), out)
    return out


def test_a_trained_talker_generates_the_codes_it_learnt(speech_setup: dict, talker_run: Path) -> None:
    from omnilm.infer.sampling import SamplingParams
    from omnilm.omni.audio import load_audio
    from omnilm.omni.processor import OmniProcessor, media_arguments
    from omnilm.omni.talker import generate_codes, load_talker, talker_inputs
    from omnilm.omni.thinker import load_thinker
    from omnilm.tokenizer import Tokenizer
    from omnilm.tokenizer.tokenizer import IM_END
    from omnilm.train.talker import read_speaker

    final = talker_run / "final"
    thinker, tokenizer = load_thinker(final), Tokenizer.from_dir(final)
    talker = load_talker(final / "talker").eval()
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget)
    codec = speech_setup["codec_obj"]
    metrics = [json.loads(line) for line in (talker_run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.1 * losses[0]
    for i, reply in enumerate(REPLIES):
        messages = [{"role": "user", "content": [{"type": "text", "text": f"Colour {i}?"}]}]
        batch = processor.collate([processor.encode(messages, add_generation_prompt=True)], tokenizer.pad_id)
        reply_ids = tokenizer.encode(reply, special=False) + [tokenizer.token_to_id(IM_END)]
        inputs = talker_inputs(thinker, talker.config, batch["input_ids"], reply_ids, read_speaker(final),
                               eos_ids=[tokenizer.token_to_id(IM_END)], **media_arguments(batch))
        expected = codec.encode(load_audio(speech_setup["data"].parent / f"reply{i}.wav")).tolist()
        codes = list(generate_codes(talker, inputs, SamplingParams(max_new_tokens=200, temperature=0.0)))
        assert codes == expected, f"reply {i}: {len(codes)} codes vs {len(expected)}"


def test_the_talker_folder_keeps_the_thinker_loadable_in_transformers(talker_run: Path) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omnilm.omni.thinker import load_thinker

    final = talker_run / "final"
    ours = load_thinker(final)
    theirs = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(final).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, torch.ones_like(ids)),
                                   theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                                   atol=1e-4, rtol=1e-4)
