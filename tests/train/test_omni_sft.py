"""The omni_sft stage on a tiny text model and hand-made media (tones, renders, a short video): it trains into
thinker folders, resumes exactly, draws one task per batch, and evaluates per task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import small_model
from omnilm.model.hf import save_pretrained
from omnilm.omni.audio import write_wav


def write_media_records(folder: Path, seed: int = 0) -> Path:
    """A jsonl of conversations over tones (audio), coloured squares (images) and a 4-frame video with a tone
    track; answers follow from the media (pitch band, colour)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    records = []
    for i in range(12):
        high = i % 2 == 0
        tone = np.sin(2 * np.pi * (880 if high else 220) * np.arange(8000 + 400 * i) / 16000) * 0.3
        write_wav(folder / f"tone{i}.wav", tone.astype(np.float32))
        records.append({"task": "audio", "messages": [
            {"role": "user", "content": [{"type": "audio", "audio": f"tone{i}.wav"},
                                         {"type": "text", "text": "Pitch?"}]},
            {"role": "assistant", "content": "high" if high else "low"}]})
        colour = ("red", (220, 30, 30)) if i % 3 else ("blue", (30, 30, 220))
        pixels = np.full((56, 56, 3), 240, dtype=np.uint8)
        pixels[10:40, 12:44] = colour[1]
        pixels += rng.integers(0, 5, pixels.shape, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.png")
        records.append({"task": "image", "messages": [
            {"role": "user", "content": [{"type": "image", "image": f"image{i}.png"},
                                         {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": colour[0]}]})
    video = folder / "video0"
    video.mkdir()
    for f in range(4):
        Image.fromarray(np.full((56, 56, 3), 60 * f, dtype=np.uint8)).save(video / f"frame_{f:03d}.png")
    (video / "video.json").write_text(json.dumps({"fps": 2}))
    write_wav(video / "narration.wav", (np.sin(np.arange(32000) / 7.0) * 0.2).astype(np.float32))
    records.append({"task": "video", "messages": [
        {"role": "user", "content": [{"type": "video", "video": "video0", "audio": "video0/narration.wav"},
                                     {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "it gets brighter"}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def omni_setup(tmp_path: Path, tokenizer) -> dict:  # noqa: ANN001
    model = small_model("llama", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id)
    text_dir = save_pretrained(model, tmp_path / "text", tokenizer=tokenizer)
    data = tmp_path / "media"
    data.mkdir()
    return {"text": text_dir, "data": write_media_records(data)}


def stage(setup: dict, steps: int, data: dict | None = None, options: dict | None = None, **train: object) -> object:
    from omnilm.train.stage import StageConfig

    return StageConfig.from_mapping({
        "name": "omni", "type": "omni_sft", "init_from": str(setup["text"]),
        "data": {"media": str(setup["data"])} if data is None else data,
        "options": {"audio": {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                              "encoder_ffn_dim": 64, "n_window": 50},
                    "vision": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                               "fullatt_block_indexes": [0]}} | (options or {}),
        "train": {"max_steps": steps, "batch_size": 4, "seq_len": 64, "lr": 3e-3, "log_every": 1,
                  "checkpoint_every": 2, "progress": False, "device": "cpu", "warmup_steps": 0,
                  "schedule": "constant"} | train})


def test_omni_sft_trains_a_thinker_and_resumes_exactly(omni_setup: dict, tmp_path: Path) -> None:
    from omnilm.omni.thinker import load_thinker
    from omnilm.train.stage import run_stage

    whole = run_stage(stage(omni_setup, 6), tmp_path / "whole")
    assert whole.status == "complete"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and all(np.isfinite(losses))
    thinker = load_thinker(whole.final_dir)
    assert thinker.media_budget is not None and thinker.config.audio.d_model == 32
    # The same run cut after 4 steps and resumed ends with the same weights.
    run_stage(stage(omni_setup, 4, checkpoint_every=4), tmp_path / "cut")
    resumed = run_stage(stage(omni_setup, 6, checkpoint_every=4), tmp_path / "cut", resume=True, force=True)
    again = load_thinker(resumed.final_dir)
    for (name, a), b in zip(thinker.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_loss_scores_the_reply_tokens_alone(omni_setup: dict) -> None:
    """The summed loss equals cross-entropy over the whole sequence's logits with every non-reply target ignored."""
    import torch.nn.functional as F

    from omnilm.omni.processor import OmniProcessor, media_arguments
    from omnilm.train.omni_sft import OMNI_OPTIONS, media_budget, starting_thinker, thinker_loss_sums

    options = OMNI_OPTIONS | stage(omni_setup, 1).options
    thinker, tokenizer = starting_thinker(omni_setup["text"], options, seed=0)
    processor = OmniProcessor(tokenizer, thinker.config, media_budget(options), root=omni_setup["data"].parent)
    records = [json.loads(line) for line in omni_setup["data"].read_text().splitlines()]
    batch = processor.collate([processor.encode(r["messages"]) for r in records[-3:]], 0)
    with torch.no_grad():
        sums, _ = thinker_loss_sums(thinker, batch)
        logits = thinker(batch["input_ids"], batch["attention_mask"], **media_arguments(batch))
    targets = batch["input_ids"][:, 1:].masked_fill(batch["loss_mask"][:, 1:] == 0, -100)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    assert int((targets != -100).sum()) > 3
    torch.testing.assert_close(sums["reply"], expected, atol=1e-4, rtol=1e-5)


def test_evaluation_counts_exact_replies_per_task(omni_setup: dict, tmp_path: Path) -> None:
    """A thinker whose replies are forced right (by construction of the check) scores 1, and a wrong reference
    scores 0: the teacher-forced check equals greedy decoding."""
    from omnilm.eval.omni import evaluate_omni
    from omnilm.infer.generate import FINISHED
    from omnilm.infer.sampling import SamplingParams
    from omnilm.omni.generate import generate_thinker
    from omnilm.omni.processor import OmniProcessor
    from omnilm.omni.thinker import load_thinker
    from omnilm.tokenizer import Tokenizer
    from omnilm.tokenizer.chat import IM_END
    from omnilm.train.stage import run_stage

    result = run_stage(stage(omni_setup, 2), tmp_path / "run")
    thinker, tokenizer = load_thinker(result.final_dir), Tokenizer.from_dir(result.final_dir)
    records = [json.loads(line) for line in omni_setup["data"].read_text().splitlines()][:6]
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget, omni_setup["data"].parent)
    eos = [tokenizer.token_to_id(IM_END), tokenizer.eos_id]
    greedy = []
    for record in records:  # what the model really says, one record at a time
        batch = processor.collate([processor.encode(record["messages"][:-1], add_generation_prompt=True)],
                                  tokenizer.pad_id, left_pad=True)
        tokens = [int(t[0]) for t in generate_thinker(thinker, batch, SamplingParams(max_new_tokens=8, temperature=0),
                                                      eos, tokenizer.pad_id)]
        greedy.append(tokens)
    as_said = []
    for record, tokens in zip(records, greedy, strict=True):
        if tokens and tokens[-1] in eos:  # a reply that ended: use it as the reference
            text = tokenizer.decode([t for t in tokens[:-1] if t != FINISHED])
            as_said.append(record | {"messages": record["messages"][:-1] + [{"role": "assistant", "content": text}]})
    assert as_said, "no greedy reply ended within 8 tokens"
    scores = evaluate_omni(thinker, tokenizer, as_said, omni_setup["data"].parent)
    assert scores["accuracy"] == 1.0
    wrong = [r | {"messages": r["messages"][:-1] + [{"role": "assistant", "content": "zebra crossing"}]}
             for r in as_said]
    assert evaluate_omni(thinker, tokenizer, wrong, omni_setup["data"].parent)["accuracy"] == 0.0


def test_timeline_replies_read_as_word_digit_pairs() -> None:
    from omnilm.eval.omni import timeline_digits

    assert timeline_digits("3 cat, 7, 1 dog, 5 red") == {"cat": "3", "dog": "1", "red": "5"}
    assert timeline_digits(" 3 cat,,dog 4, 8 cat owl") == {"cat": "3", "owl": "8"}  # first digit kept
    assert timeline_digits("") == {} and timeline_digits("no digits here") == {}


def test_video_question_answered_from_the_thinkers_own_timeline(omni_setup: dict, tmp_path: Path) -> None:
    """A Thinker taught one video's timeline answers that video's questions from it: right where the reply pairs the
    word with the digit asked for, wrong where it pairs it otherwise or does not name the word; the batched
    greedy replies are those each video gets alone."""
    from omnilm.data.synth.omni import VIDEO_TIMELINE_QUESTION
    from omnilm.eval.omni import evaluate_video_timeline, greedy_replies, timeline_digits
    from omnilm.omni.processor import OmniProcessor
    from omnilm.omni.thinker import load_thinker
    from omnilm.tokenizer import Tokenizer
    from omnilm.train.stage import run_stage

    folder = omni_setup["data"].parent
    part = {"type": "video", "video": "video0", "audio": "video0/narration.wav"}
    asked = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": VIDEO_TIMELINE_QUESTION}]},
                          {"role": "assistant", "content": "3 cat, 7, 1 dog, 5"}], "task": "video_timeline"}
    (folder / "timeline.jsonl").write_text(json.dumps(asked) + "\n")
    result = run_stage(stage(omni_setup, 40, data={"timeline": str(folder / "timeline.jsonl")}, lr=1e-2),
                       tmp_path / "run")
    thinker, tokenizer = load_thinker(result.final_dir), Tokenizer.from_dir(result.final_dir)
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget, folder)
    alone = processor.collate([processor.encode(asked["messages"][:1], add_generation_prompt=True)], 0, left_pad=True)
    [reply] = greedy_replies(thinker, tokenizer, alone, 32)
    assert reply == "3 cat, 7, 1 dog, 5"

    def question(word: str, answer: str, video: str = "video0", media: dict = part) -> dict:
        return {"task": "video_qa", "video": video, "word": word, "answer": answer,
                "messages": [{"role": "user", "content": [media, {"type": "text", "text": f"... {word}?"}]},
                             {"role": "assistant", "content": answer}]}

    records = [question("cat", "3"), question("dog", "1"), question("dog", "7"), question("owl", "5")]
    assert evaluate_video_timeline(thinker, tokenizer, records, folder) == {
        "accuracy": 0.5, "timeline_read": 0.75, "examples": 4.0}
    # A shorter prompt in the same batch (left-padded) is answered as it is alone.
    tone = {"type": "audio", "audio": "tone0.wav"}
    prompt = [{"role": "user", "content": [tone, {"type": "text", "text": VIDEO_TIMELINE_QUESTION}]}]
    [other] = greedy_replies(thinker, tokenizer, processor.collate(
        [processor.encode(prompt, add_generation_prompt=True)], 0, left_pad=True), 32)
    more = [question(word, digit, "tone", tone) for word, digit in (("cat", "3"), ("dog", "1"), ("owl", "5"))]
    expected = 2 + sum(timeline_digits(other).get(r["word"]) == r["answer"] for r in more)
    mixed = evaluate_video_timeline(thinker, tokenizer, records + more, folder, batch_size=2)
    assert mixed["accuracy"] == expected / 7


def test_final_answer_is_the_last_word_of_a_reply() -> None:
    from omnilm.eval.omni import final_answer

    assert final_answer("3 cat, 7, 1 dog, 5 red. 3 cat, dog? no; 1 dog, dog? yes. So 1.") == "1"
    assert final_answer("7") == "7" and final_answer(" 7. ") == "7"
    assert final_answer("So dog: 2. So cat: 4.") == "4" and final_answer("So cat:") == "cat:" and final_answer("") == ""


def test_video_question_asked_as_it_is_is_scored_by_the_answer_its_reply_ends_with(omni_setup: dict,
                                                                                  tmp_path: Path) -> None:
    """A Thinker taught to answer one video question by way of the timeline and another with the digit alone: both
    replies are read for their last answer; a reply that ends with another digit is wrong."""
    from omnilm.eval.omni import evaluate_video_answers, prompt_replies
    from omnilm.omni.thinker import load_thinker
    from omnilm.tokenizer import Tokenizer
    from omnilm.train.stage import run_stage

    folder = omni_setup["data"].parent
    part = {"type": "video", "video": "video0", "audio": "video0/narration.wav"}

    def question(word: str, answer: str, reply: str) -> dict:
        return {"task": "video_qa", "video": "video0", "word": word, "answer": answer,
                "messages": [{"role": "user", "content": [part, {"type": "text", "text": f"Which {word}?"}]},
                             {"role": "assistant", "content": reply}]}

    taught = [question("cat", "3", "3 cat, 7, 1 dog. So cat: 3."), question("dog", "1", "1")]
    (folder / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in taught))
    result = run_stage(stage(omni_setup, 40, data={"answers": str(folder / "answers.jsonl")}, lr=1e-2),
                       tmp_path / "run")
    thinker, tokenizer = load_thinker(result.final_dir), Tokenizer.from_dir(result.final_dir)
    replies = prompt_replies(thinker, tokenizer, [r["messages"][:1] for r in taught], folder, 2, 32)
    assert replies == ["3 cat, 7, 1 dog. So cat: 3.", "1"]
    records = [*taught, question("dog", "7", "7"), question("cat", "7", "7")]
    assert evaluate_video_answers(thinker, tokenizer, records, folder, batch_size=3) == {
        "accuracy": 0.5, "reasoned": 0.5, "examples": 4.0}


@settings(max_examples=30, deadline=None)
@given(sizes=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(1, 9), min_size=1),
       batch=st.integers(1, 4), cut=st.integers(0, 12))
def test_task_batches_hold_one_task_and_resume_exactly(sizes: dict[str, int], batch: int, cut: int) -> None:
    from omnilm.train.omni_sft import TaskBatches

    tasks, start = {}, 0
    for name, size in sizes.items():
        tasks[name] = list(range(start, start + size))
        start += size
    owner = {i: name for name, ids in tasks.items() for i in ids}

    def loader() -> TaskBatches:
        return TaskBatches(tasks, {}, batch, lambda ids: ids, seed=3, rank=0, world_size=1)

    first = loader()
    drawn = [first.next_batch() for _ in range(cut)]
    state = first.state_dict()
    rest = [first.next_batch() for _ in range(6)]
    for indices in drawn + rest:
        assert len({owner[i] for i in indices}) == 1
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [resumed.next_batch() for _ in range(6)] == rest


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), cut=st.integers(0, 4), rank=st.integers(0, 1), questions=st.integers(1, 4))
def test_fresh_image_batches_resume_exactly_and_skip_excluded_layouts(seed: int, cut: int, rank: int,
                                                                      questions: int) -> None:
    """Fresh renders: step s draws the same conversations however the run got there; every conversation opens with
    a picture and its question, asks at most ``questions`` and answers each as the scene says; excluded layouts
    never come back."""
    import random

    from PIL import Image

    from omnilm.data.synth.omni import draw_scenes, layout_key
    from omnilm.train.omni_sft import FreshImageBatches

    def batches(excluded: set[str] | None = None) -> FreshImageBatches:
        return FreshImageBatches(3, 112, questions, lambda conversations: conversations, seed, rank, excluded)

    whole = batches()
    drawn = [whole.next_batch() for _ in range(5)]
    resumed = batches()
    resumed.load_state_dict(json.loads(json.dumps({"step": cut})))
    again = [resumed.next_batch() for _ in range(5 - cut)]
    for expected, got in zip(drawn[cut:], again, strict=True):
        assert [[m["content"] if m["role"] == "assistant" else m for m in c] for c in got] == \
            [[m["content"] if m["role"] == "assistant" else m for m in c] for c in expected]
    for conversation in (c for batch in drawn for c in batch):
        first = conversation[0]["content"]
        assert isinstance(first[0]["image"], Image.Image) and first[0]["image"].size == (112, 112)
        assert first[1]["type"] == "text" and len(conversation) % 2 == 0
        assert len(conversation) // 2 <= questions
        assert all(isinstance(m["content"], str) for m in conversation[1:] if m["role"] == "user")
    # The scene behind step 0: its own question first, then further questions it answers, each answered right.
    scene, text, answer = draw_scenes(random.Random(f"{seed}/{rank}/0/images"), whole.kinds, 112, 3, set())[0]
    conversation = drawn[0][0]
    assert conversation[0]["content"][1]["text"] == text and conversation[1]["content"] == answer
    for user, reply in zip(conversation[2::2], conversation[3::2], strict=True):
        words = set(user["content"].rstrip("?.").split())
        if scene["kind"] == "count":
            shape = next(o["shape"] for o in scene["objects"] if o["shape"] + "s" in words)
            assert reply["content"] == str(sum(o["shape"] == shape for o in scene["objects"]))
        else:
            assert reply["content"] in {o["colour"] for o in scene["objects"] if o["shape"] in words} | \
                {o["shape"] for o in scene["objects"] if o["colour"] in words}
    excluded = {layout_key(s) for s, _, _ in draw_scenes(random.Random(f"{seed}/{rank}/0/images"), whole.kinds,
                                                         112, 3, set())}
    avoiding = batches(excluded).conversations(0)
    assert len(avoiding) == 3
    assert not excluded & {layout_key(s) for s, _, _ in draw_scenes(random.Random(f"{seed}/{rank}/0/images"),
                                                                    whole.kinds, 112, 3, excluded)}


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), cut=st.integers(0, 3), rank=st.integers(0, 1), questions=st.integers(1, 3),
       words=st.integers(1, 3))
def test_fresh_video_batches_answer_from_frames_and_narration_and_resume_exactly(seed: int, cut: int, rank: int,
                                                                                 questions: int, words: int) -> None:
    """Fresh videos: each answer is the digit on screen (read off the pixels) while the asked word's clip sounds in
    the narration (found by its length: each word a tone of its own length); step s draws the same videos however
    the run got there. One word per video is the ``one_word_videos`` source."""
    import hashlib

    from PIL import Image

    from helpers import read_digit
    from omnilm.data.synth.omni import omni_config
    from omnilm.train.omni_sft import FreshVideoBatches

    config = omni_config(overrides={"video_segments": 4, "words_per_video": words, "video_size": 56})
    names = ["cat", "dog", "red", "blue", "frog"]
    length = {name: 2400 + 800 * i for i, name in enumerate(names)}  # 0.15 s, 0.2 s, ... in distinct lengths
    clips = {voice: {name: np.full(length[name], 0.5) for name in names} for voice in ("v1", "v2")}

    def batches() -> FreshVideoBatches:
        return FreshVideoBatches(2, clips, config, questions, lambda conversations: conversations, seed, rank)

    def digest(conversation: list[dict]) -> str:
        video = conversation[0]["content"][0]
        frames = b"".join(np.asarray(frame).tobytes() for frame in video["video"])
        return hashlib.sha1(frames + video["audio"].tobytes() + json.dumps(conversation[1:]).encode()).hexdigest()

    whole = batches()
    drawn = [whole.next_batch() for _ in range(4)]
    resumed = batches()
    resumed.load_state_dict(json.loads(json.dumps({"step": cut})))
    assert [[digest(c) for c in b] for b in drawn[cut:]] == \
        [[digest(c) for c in resumed.next_batch()] for _ in range(4 - cut)]
    # Question first: the same conversations with the first turn's text before the video.
    flipped = FreshVideoBatches(2, clips, config, questions, lambda conversations: conversations, seed, rank,
                                question_first=True).next_batch()
    for before, after in zip(drawn[0], flipped, strict=True):
        assert [part["type"] for part in after[0]["content"]] == ["text", "video"]
        assert digest([after[0] | {"content": after[0]["content"][::-1]}, *after[1:]]) == digest(before)
    for conversation in (c for batch in drawn for c in batch):
        video = conversation[0]["content"][0]
        assert video["type"] == "video" and video["fps"] == config.video_fps
        assert all(isinstance(f, Image.Image) and f.size == (56, 56) for f in video["video"])
        assert len(video["audio"]) == round(len(video["video"]) / video["fps"] * 16000)
        asks = min(questions, words)  # one question per word said
        assert len(conversation) == 2 * asks and all(isinstance(m["content"], str) for m in conversation[2::2])
        # Where each word sounds: the runs of non-silent samples, named by their length.
        loud = np.concatenate([[0], (video["audio"] != 0).astype(int), [0]])
        starts, ends = np.flatnonzero(np.diff(loud) == 1), np.flatnonzero(np.diff(loud) == -1)
        heard = {next(n for n in names if length[n] == end - start): (start + end) / 2 / 16000
                 for start, end in zip(starts, ends, strict=True)}
        assert len(heard) == config.words_per_video
        shown = [read_digit(frame) for frame in video["video"]]
        assert len(set(shown)) == config.video_segments and None not in shown
        asked = set()
        for user, reply in zip(conversation[0::2], conversation[1::2], strict=True):
            text = user["content"] if isinstance(user["content"], str) else user["content"][-1]["text"]
            word = text.removeprefix("Which digit was on screen when the voice said ").removesuffix("?")
            asked.add(word)
            assert reply["content"] == str(shown[int(heard[word] * config.video_fps)])
        assert len(asked) == asks
    # Without the sound track: the frames alone, asked which digits were shown, in order.
    silent = FreshVideoBatches(2, clips, config, 1, lambda conversations: conversations, seed, rank,
                               ("video_digits",), show="frames")
    for conversation in silent.next_batch():
        video, question = conversation[0]["content"]
        assert "audio" not in video and question["text"] == "Which digits were shown?" and len(conversation) == 2
        shown = [read_digit(frame) for frame in video["video"]]
        changes = [digit for i, digit in enumerate(shown) if i == 0 or digit != shown[i - 1]]
        assert conversation[1]["content"] == " ".join(map(str, changes))
    # "Did the voice say X?": yes for each word heard in the narration, no for as many others (as there are), once.
    heard_batches = FreshVideoBatches(2, clips, config, 8, lambda conversations: conversations, seed, rank,
                                      ("video_heard",))
    for conversation in heard_batches.next_batch():
        loud = np.concatenate([[0], (conversation[0]["content"][0]["audio"] != 0).astype(int), [0]])
        lengths = np.flatnonzero(np.diff(loud) == -1) - np.flatnonzero(np.diff(loud) == 1)
        said = {n for n in names if length[n] in lengths}
        answers = {}
        for user, reply in zip(conversation[0::2], conversation[1::2], strict=True):
            text = user["content"] if isinstance(user["content"], str) else user["content"][-1]["text"]
            answers[text.removeprefix("Did the voice say ").removesuffix("?")] = reply["content"]
        assert len(answers) == len(conversation) // 2 == words + min(words, len(names) - words)
        assert answers == {word: "yes" if word in said else "no" for word in answers} and said <= set(answers)


@given(seed=st.integers(0, 1000), words=st.integers(1, 3))
def test_fresh_videos_shown_as_words_sound_or_timeline_answer_what_was_said(seed: int, words: int) -> None:
    """``show``: a fresh video's narration as the words said written out, or as its sound alone (an audio part);
    "Did the voice say X?" is answered from what is shown, yes for the words said and no for as many others. Its
    timeline written out answers the video question. The frames alone and the whole video draw what the earlier
    streams drew (a resumed run keeps its batches)."""
    from omnilm.config import ConfigError
    from omnilm.data.synth.omni import VIDEO_SHOWN, omni_config, shown_part
    from omnilm.train.omni_sft import FreshVideoBatches, fresh_video_source

    config = omni_config(overrides={"video_segments": 4, "words_per_video": words, "video_size": 56})
    names = ["cat", "dog", "red", "blue", "frog"]
    length = {name: 2400 + 800 * i for i, name in enumerate(names)}
    clips = {voice: {name: np.full(length[name], 0.5) for name in names} for voice in ("v1", "v2")}

    def draw(show: str, tasks: tuple[str, ...] = ("video_heard",)) -> FreshVideoBatches:
        return FreshVideoBatches(3, clips, config, 1, lambda conversations: conversations, seed, 0, tasks, show)

    assert [draw(show).stream for show in VIDEO_SHOWN] == [
        f"/{prefix}videos/{words}-words" for prefix in ("", "silent-", "sound-", "words-", "timeline-")]
    # The timeline: each digit shown, then the word said while it was; the video question reads the digit off it.
    for conversation in draw("timeline", ("video_qa",)).next_batch():
        part, question = conversation[0]["content"]
        assert part["type"] == "text" and part["text"].startswith("Shown, then said: ") and len(conversation) == 2
        segments = [s.split(" ") for s in part["text"].removeprefix("Shown, then said: ")[:-1].split(", ")]
        assert len(segments) == config.video_segments and all(1 <= len(s) <= 2 for s in segments)
        assert len({s[0] for s in segments}) == config.video_segments and all(s[0].isdigit() for s in segments)
        digit_of = {s[1]: s[0] for s in segments if len(s) == 2}
        assert len(digit_of) == words and set(digit_of) <= set(names)
        asked = question["text"].removeprefix("Which digit was on screen when the voice said ").removesuffix("?")
        assert conversation[1]["content"] == digit_of[asked]
    # Answered by way of it (option timeline_lookup): the timeline shown, written again, then the word and its digit.
    for conversation in draw("timeline", ("video_qa_reasoned",)).next_batch():
        part, question = conversation[0]["content"]
        shown = part["text"].removeprefix("Shown, then said: ").removesuffix(".")
        asked = question["text"].removeprefix("Which digit was on screen when the voice said ").removesuffix("?")
        digit = next(s.split(" ")[0] for s in shown.split(", ") if s.split(" ")[1:] == [asked])
        assert conversation[1]["content"].startswith(f"{shown}. ") and conversation[1]["content"].endswith(
            f"{digit} {asked}, {asked}? yes. So {digit}.")
    for show in ("words", "sound"):
        for conversation in draw(show).next_batch():
            part, question = conversation[0]["content"]
            assert len(conversation) == 2
            asked = question["text"].removeprefix("Did the voice say ").removesuffix("?")
            if show == "words":
                assert part["type"] == "text" and part["text"].startswith("The voice said: ")
                said = part["text"].removeprefix("The voice said: ").removesuffix(".").split(" ")
            else:
                assert set(part) == {"type", "audio"} and part["type"] == "audio"
                loud = np.concatenate([[0], (part["audio"] != 0).astype(int), [0]])
                lengths = np.flatnonzero(np.diff(loud) == -1) - np.flatnonzero(np.diff(loud) == 1)
                said = [n for n in names if length[n] in lengths]
            assert len(set(said)) == words and set(said) <= set(names)
            assert conversation[1]["content"] == ("yes" if asked in said else "no")
    with pytest.raises(ValueError, match="show: unknown 'smell'"):
        shown_part(None, "smell")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="video_show: unknown 'smell'"):
        fresh_video_source((config, clips), 1, ("video_qa",), 2, lambda conversations: conversations, seed, 0,
                           show="smell")


@given(seed=st.integers(0, 1000), words=st.integers(1, 3))
def test_fresh_videos_timeline_pairs_each_digit_with_the_word_heard_while_it_was_shown(seed: int, words: int) -> None:
    """``video_timeline``: the reply lists the digits in the order the frames show them, each followed by the word
    whose sound starts while its picture is on screen: checked against the frames (a segment is a run of equal
    pictures) and the narration (each word's clip has a length of its own), not against the drawn timeline."""
    from omnilm.data.synth.media import SAMPLE_RATE
    from omnilm.data.synth.omni import VIDEO_DIGITS_QUESTION, VIDEO_TIMELINE_QUESTION, omni_config
    from omnilm.train.omni_sft import FreshVideoBatches

    config = omni_config(overrides={"video_segments": 4, "words_per_video": words, "video_size": 56})
    names = ["cat", "dog", "red", "blue", "frog"]
    length = {2400 + 800 * i: name for i, name in enumerate(names)}
    clips = {voice: {name: np.full(n, 0.5) for n, name in length.items()} for voice in ("v1", "v2")}
    tasks = ("video_timeline", "video_digits")
    for conversation in FreshVideoBatches(3, clips, config, 2, lambda c: c, seed, 0, tasks).next_batch():
        video = conversation[0]["content"][0]
        questions = [t["content"] if isinstance(t["content"], str) else t["content"][-1]["text"]
                     for t in conversation[::2]]
        replies = dict(zip(questions, [reply["content"] for reply in conversation[1::2]], strict=True))
        assert set(replies) == {VIDEO_TIMELINE_QUESTION, VIDEO_DIGITS_QUESTION}
        pictures = [np.asarray(frame) for frame in video["video"]]
        first_frames = [0] + [f for f in range(1, len(pictures)) if not np.array_equal(pictures[f], pictures[f - 1])]
        assert len(first_frames) == config.video_segments
        loud = np.concatenate([[0], (video["audio"] != 0).astype(int), [0]])
        starts, ends = np.flatnonzero(np.diff(loud) == 1), np.flatnonzero(np.diff(loud) == -1)
        heard: list[list[str]] = [[] for _ in first_frames]
        for start, end in zip(starts, ends, strict=True):
            frame = int(start / SAMPLE_RATE * video["fps"])
            heard[max(k for k, first in enumerate(first_frames) if first <= frame)].append(length[int(end - start)])
        segments = [s.split(" ") for s in replies[VIDEO_TIMELINE_QUESTION].split(", ")]
        assert [s[1:] for s in segments] == heard and sum(map(len, heard)) == words
        assert [s[0] for s in segments] == replies[VIDEO_DIGITS_QUESTION].split(" ")
        assert len(set(replies[VIDEO_DIGITS_QUESTION].split(" "))) == config.video_segments


@given(seed=st.integers(0, 1000), words=st.integers(1, 3))
def test_fresh_videos_reasoned_answer_is_the_timeline_then_the_digit_it_pairs_with_the_word(seed: int,
                                                                                             words: int) -> None:
    """``video_qa_reasoned``: the video question's reply is the video's timeline, its words walked up to the one
    asked about, each beside it ("3 cat, dog? no; 1 dog, dog? yes"), then "So D." where D is the plain ``video_qa``
    answer to the same question, the digit the timeline pairs the word with."""
    from omnilm.data.synth.omni import VIDEO_TIMELINE_QUESTION, omni_config
    from omnilm.eval.omni import final_answer, timeline_digits
    from omnilm.train.omni_sft import FreshVideoBatches

    config = omni_config(overrides={"video_segments": 4, "words_per_video": words, "video_size": 56})
    names = ["cat", "dog", "red", "blue", "frog"]
    clips = {voice: {name: np.full(2400 + 800 * i, 0.5) for i, name in enumerate(names)} for voice in ("v1", "v2")}
    tasks = ("video_qa", "video_qa_reasoned", "video_timeline")
    for conversation in FreshVideoBatches(3, clips, config, 99, lambda c: c, seed, 0, tasks).next_batch():
        replies: dict[str, list[str]] = {}
        for asked, reply in zip(conversation[::2], conversation[1::2], strict=True):
            text = asked["content"] if isinstance(asked["content"], str) else asked["content"][-1]["text"]
            replies.setdefault(text, []).append(reply["content"])
        [timeline] = replies.pop(VIDEO_TIMELINE_QUESTION)
        assert len(replies) == words
        for question, (plain, reasoned) in ((q, sorted(r, key=len)) for q, r in replies.items()):
            word = question.removesuffix("?").rsplit(" ", 1)[-1]
            assert timeline_digits(timeline)[word] == plain and final_answer(reasoned) == plain
            # The timeline, then its words walked in time order up to the one asked about, then its digit.
            head, walk, tail = reasoned.split(". ")
            assert head == timeline and tail == f"So {plain}."
            said = [(digit, *rest) for digit, *rest in (s.split(" ") for s in timeline.split(", ")) if rest]
            steps = [step.replace(",", "").replace("?", "").split(" ") for step in walk.split("; ")]
            assert steps == [[d, w, word, "yes" if w == word else "no"] for d, w in said[:len(steps)]]
            assert steps[-1] == [plain, word, word, "yes"]


def test_task_batches_mix_fresh_tasks_and_refuse_bad_weights() -> None:
    from omnilm.config import ConfigError
    from omnilm.train.omni_sft import TaskBatches

    class Counter:
        def __init__(self) -> None:
            self.step = 0

        def next_batch(self) -> str:
            self.step += 1
            return "fresh"

        def state_dict(self) -> dict:
            return {"step": self.step}

        def load_state_dict(self, state: dict) -> None:
            self.step = state["step"]

    tasks = {"chat": [0, 1, 2, 3]}
    mixed = TaskBatches(tasks, {"chat": 1, "image_qa": 3}, 2, lambda ids: ids, 0, 0, 1, {"image_qa": Counter()})
    drawn = [mixed.next_batch() for _ in range(400)]
    fresh = sum(b == "fresh" for b in drawn)
    assert 0.68 < fresh / 400 < 0.82  # 3 : 1
    assert mixed.state_dict()["sources"]["image_qa"] == {"step": fresh}
    with pytest.raises(ConfigError, match="need a task_weights entry"):
        TaskBatches(tasks, {}, 2, lambda ids: ids, 0, 0, 1, {"image_qa": Counter()})
    with pytest.raises(ConfigError, match="leave their records out"):
        TaskBatches(tasks | {"image_qa": [4]}, {"image_qa": 1}, 2, lambda ids: ids, 0, 0, 1, {"image_qa": Counter()})


def test_one_word_videos_train_as_a_task_of_their_own(omni_setup: dict, tmp_path: Path) -> None:
    """``one_word_videos`` adds task ``video_one_word`` (fresh videos saying one word) beside ``video_qa``; without
    ``fresh_videos`` it is refused."""
    from omnilm.config import ConfigError
    from omnilm.data.synth.omni import NARRATION_FILE, narration_record
    from omnilm.train.stage import run_stage

    clips = tmp_path / "clips"
    (clips / "audio").mkdir(parents=True)
    records = []
    for voice in ("v1", "v2"):
        for i, word in enumerate(("cat", "dog", "red")):
            write_wav(clips / "audio" / f"{voice}-{word}.wav", np.full(2400 + 800 * i, 0.3, dtype=np.float32))
            records.append(narration_record(word, voice, f"audio/{voice}-{word}.wav"))
    (clips / NARRATION_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    (clips / "config.json").write_text(json.dumps({"video_size": 56, "video_segments": 3, "words_per_video": 2}))

    def videos(**options: object) -> object:
        return stage(omni_setup, 2, data={}, options=options)

    result = run_stage(videos(fresh_videos=str(clips / NARRATION_FILE), one_word_videos=True,
                              task_weights={"video_qa": 0, "video_one_word": 1}), tmp_path / "run")
    assert result.status == "complete"
    with pytest.raises(ConfigError, match="one_word_videos"):
        run_stage(videos(one_word_videos=True, task_weights={"video_one_word": 1}), tmp_path / "refused")
    # The heard question about narrations written out or heard alone: tasks of their own, refused the same way.
    heard = run_stage(videos(fresh_videos=str(clips / NARRATION_FILE), heard_words=True, heard_sound=True,
                             task_weights={"video_qa": 0, "heard_words": 1, "heard_sound": 1}), tmp_path / "heard")
    assert heard.status == "complete"
    with pytest.raises(ConfigError, match="heard_sound draw fresh videos"):
        run_stage(videos(heard_sound=True, task_weights={"heard_sound": 1}), tmp_path / "refused-heard")
    # So is the video question about a timeline written out, answered by way of it.
    lookup = run_stage(videos(fresh_videos=str(clips / NARRATION_FILE), timeline_lookup=True,
                              task_weights={"video_qa": 0, "timeline_lookup": 1}), tmp_path / "lookup")
    assert lookup.status == "complete"
    with pytest.raises(ConfigError, match="timeline_lookup draw fresh videos"):
        run_stage(videos(timeline_lookup=True, task_weights={"timeline_lookup": 1}), tmp_path / "refused-lookup")
