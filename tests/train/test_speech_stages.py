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


def word_timings(text: str, seconds: float) -> list[list]:
    """Made-up timings: the words share the audio evenly, 40 ms of silence at both ends and 60 ms between."""
    words = text.split()
    each = (seconds - 0.08 - 0.06 * (len(words) - 1)) / len(words)
    return [[word, 0.04 + k * (each + 0.06), 0.04 + k * (each + 0.06) + each] for k, word in enumerate(words)]


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
                        "reply_audio": f"reply{i}.wav", "split": "train",
                        "reply_words": word_timings(reply, len(tones(i)) / 16000)})
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


def test_the_batched_talker_loss_equals_the_sum_over_single_examples(speech_setup: dict) -> None:
    """Left-padded prompts and right-padded steps in one forward pass give each example's unpadded loss."""
    from omnilm.data.sources import ReadReport
    from omnilm.omni.codec import Codec
    from omnilm.omni.talker import Talker
    from omnilm.omni.thinker import load_thinker
    from omnilm.tokenizer import Tokenizer
    from omnilm.train.talker import TalkerTrainee, new_talker_config, prepare_examples, talker_loss_sums

    thinker = load_thinker(speech_setup["thinker"], dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_dir(speech_setup["thinker"])
    codec = Codec.load(speech_setup["codec"])
    records = [json.loads(line) for line in speech_setup["data"].read_text().splitlines()]
    records[1]["messages"][0]["content"][0]["text"] = "A much longer question about the colour number 1?"
    examples, _ = prepare_examples(thinker, tokenizer, new_talker_config(thinker, tokenizer, codec.codes, TINY_TALKER),
                                codec, [(r, speech_setup["data"].parent) for r in records], 400, True, ReadReport())
    assert len({e["prompt"].shape[0] for e in examples}) > 1 and len({len(e["codes"]) for e in examples}) > 1
    torch.manual_seed(0)
    talker = Talker(new_talker_config(thinker, tokenizer, codec.codes, TINY_TALKER)).eval()
    model = TalkerTrainee(talker, speech_setup["thinker"], talker.config.tts_text_start_token_id)
    batched, stats = talker_loss_sums(model, examples)
    singles = [talker_loss_sums(model, [e]) for e in examples]
    single_sum = sum(float(s[0]["codes"].detach()) for s in singles)
    assert float(batched["codes"].detach()) == pytest.approx(single_sum, rel=1e-5)
    # Code dropout: the same batch draws the same masked codes; evaluation reads every code.
    model.train()
    dropped = [float(talker_loss_sums(model, examples, code_dropout=0.5)[0]["codes"].detach()) for _ in range(2)]
    assert dropped[0] == dropped[1] and abs(dropped[0] - float(batched["codes"].detach())) > 1e-3
    model.eval()
    assert float(talker_loss_sums(model, examples, code_dropout=0.5)[0]["codes"].detach()) == pytest.approx(
        float(batched["codes"].detach()), rel=1e-6)
    counts = [len(e["codes"]) + 1 for e in examples]
    expected_accuracy = sum(s[1]["code_accuracy"] * n for s, n in zip(singles, counts, strict=True)) / sum(counts)
    assert stats["code_accuracy"] == pytest.approx(expected_accuracy)


def test_spelling_is_refused_without_pacing(speech_setup: dict, tmp_path: Path) -> None:
    from omnilm.config import ConfigError
    from omnilm.train.stage import run_stage

    with pytest.raises(ConfigError, match="spelled reads letters at the pace of speech"):
        run_stage(stage_config(speech_setup, "talker", speech_setup["thinker"], 2, {"spelled": 3}), tmp_path / "x")


@pytest.mark.parametrize("spelled", [0, 3])
def test_a_paced_talker_generates_the_codes_it_learnt_at_the_pace_it_learnt(speech_setup: dict, spelled: int) -> None:
    """Trained on reply tracks laid out by word timings (spelled: with the letters said), a Talker given the same
    layout generates its codes; the folder keeps the fitted duration model."""
    from omnilm.infer.sampling import SamplingParams
    from omnilm.omni.audio import load_audio
    from omnilm.omni.pacing import DurationModel, aligned_counts, paced_reply
    from omnilm.omni.processor import OmniProcessor, media_arguments
    from omnilm.omni.talker import generate_codes, load_talker, talker_inputs
    from omnilm.omni.thinker import load_thinker
    from omnilm.tokenizer import Tokenizer
    from omnilm.tokenizer.tokenizer import IM_END
    from omnilm.train.stage import run_stage
    from omnilm.train.talker import read_speaker

    out = speech_setup["root"] / f"paced-talker-run-{spelled}"
    run_stage(stage_config(speech_setup, "talker", speech_setup["thinker"], 150,
                           {"talker": TINY_TALKER, "paced": True, "spelled": spelled}), out)
    final = out / "final"
    thinker, tokenizer = load_thinker(final), Tokenizer.from_dir(final)
    talker = load_talker(final / "talker").eval()
    pacing = DurationModel.load(final / "talker")
    assert pacing is not None and pacing.per_char > 0 and pacing.lead > 0 and pacing.spelled == spelled
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget)
    codec = speech_setup["codec_obj"]
    records = [json.loads(line) for line in speech_setup["data"].read_text().splitlines()]
    for i, reply in enumerate(REPLIES):
        messages = [{"role": "user", "content": [{"type": "text", "text": f"Colour {i}?"}]}]
        batch = processor.collate([processor.encode(messages, add_generation_prompt=True)], tokenizer.pad_id)
        text_ids = tokenizer.encode(reply, special=False)
        expected = codec.encode(load_audio(speech_setup["data"].parent / f"reply{i}.wav")).tolist()
        counts, said = aligned_counts(tokenizer, text_ids, records[i]["reply_words"], len(expected),
                                      codec.config.code_rate)
        inputs = talker_inputs(thinker, talker.config, batch["input_ids"], text_ids + [tokenizer.token_to_id(IM_END)],
                               read_speaker(final), eos_ids=[tokenizer.token_to_id(IM_END)], **media_arguments(batch))
        paced = paced_reply(inputs, counts, said, spelled, tokenizer, text_ids)
        codes = list(generate_codes(talker, paced, SamplingParams(max_new_tokens=200, temperature=0.0)))
        assert codes == expected, f"reply {i}: {len(codes)} codes vs {len(expected)}"
