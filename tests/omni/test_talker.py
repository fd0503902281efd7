"""The Talker against transformers' ``Qwen2_5OmniTalkerForConditionalGeneration``: folders both ways with equal
codec logits (TMRoPE positions of images, audio and left padding included), decoding steps with the reply track,
the inputs built from a Thinker's reply against ``Qwen2_5OmniForConditionalGeneration.generate``'s own, and greedy
codes against transformers' talker ``generate``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilm.config import ConfigError
from omnilm.infer.sampling import SamplingParams
from omnilm.model.hf import CheckpointError
from omnilm.omni.audio import audio_features
from omnilm.omni.config import thinker_config_from_hf
from omnilm.omni.talker import (
    TALKER_SAMPLING,
    Talker,
    TalkerInputs,
    generate_codes,
    load_talker,
    prompt_positions,
    save_talker,
    talker_config_from_hf,
    talker_config_to_hf,
    talker_inputs,
)
from omnilm.omni.thinker import load_thinker
from omnilm.omni.vision import preprocess_images
from tests_omni_layouts import build_batch

CODEC = dict(tts_codec_pad_token_id=90, tts_codec_start_token_id=91, tts_codec_end_token_id=92,
             tts_codec_mask_token_id=94)
TEXT = dict(tts_text_pad_token_id=283, tts_text_start_token_id=284, tts_text_end_token_id=285)
SPEAKER_BOS = 286
E = 64  # the tiny Thinker's width


MEDIA_IDS = ("audio_token_index", "image_token_index", "video_token_index", "audio_start_token_id",
             "audio_end_token_id", "vision_start_token_id", "vision_end_token_id")


def tiny_hf_talker_config(thinker_config):  # noqa: ANN001, ANN201
    """transformers' talker config: width 48 but heads of 16 (4·16 ≠ 48), uneven mrope 4/2/2, codec vocab 96, the
    Thinker's media ids."""
    from transformers import Qwen2_5OmniTalkerConfig

    return Qwen2_5OmniTalkerConfig(
        vocab_size=96, embedding_size=E, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
        **CODEC, **TEXT, **{k: getattr(thinker_config, k) for k in MEDIA_IDS})


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (biases too), norm scales around 1 so that signals survive two layers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            if "norm" in name:
                param.add_(1.0)


@pytest.fixture(scope="module")
def hf_talker_config(hf_thinker_config):  # noqa: ANN001, ANN201
    return tiny_hf_talker_config(hf_thinker_config)


@pytest.fixture(scope="module")
def thinker_config(hf_thinker_config):  # noqa: ANN001, ANN201
    """omnilm's view of the tiny Thinker: its media ids lay out the prompts."""
    return thinker_config_from_hf(hf_thinker_config.to_dict())


@pytest.fixture(scope="module")
def hf_talker(hf_talker_config):  # noqa: ANN001, ANN201
    from transformers import Qwen2_5OmniTalkerForConditionalGeneration

    model = Qwen2_5OmniTalkerForConditionalGeneration(hf_talker_config).eval()
    randomise(model, seed=3)
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, hf_talker) -> Path:  # noqa: ANN001
    folder = tmp_path_factory.mktemp("hf-talker")
    hf_talker.save_pretrained(folder)
    return folder


LAYOUTS = {
    "text": [[("text", [5, 6, 7, 8, 9])]],
    # An image and a sound (3-D ids), then a second, shorter row: left padding.
    "media": [[("text", [5, 6]), ("image", [1, 4, 6]), ("text", [7]), ("audio", 250), ("text", [8, 9])],
              [("text", [10]), ("audio", 90), ("text", [11, 12])]],
    "image": [[("text", [5, 6]), ("image", [1, 4, 6]), ("text", [7, 8, 9])]],
}


def prompt_batch(config, layout: str, seed: int) -> dict:  # noqa: ANN001
    """Talker prompt rows (B, P, E) over the Thinker ids of ``layout``, with transformers' positional inputs."""
    batch = build_batch({"rows": LAYOUTS[layout], "use_audio_in_video": False}, config)
    ids = batch.pop("input_ids")
    generator = torch.Generator().manual_seed(seed)
    return {"inputs_embeds": torch.randn(*ids.shape, E, generator=generator), "input_text_ids": ids, **batch}


def our_positions(talker: Talker, inputs: dict) -> torch.Tensor:
    return prompt_positions(talker.config, inputs["input_text_ids"], inputs["attention_mask"],
                            inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["audio_feature_lengths"],
                            inputs["video_second_per_grid"])


def hf_prompt_logits(model, inputs: dict) -> torch.Tensor:  # noqa: ANN001
    model.rope_deltas = None
    with torch.no_grad():  # transformers adds the codec cue to inputs_embeds in place: give it a copy
        return model(**(inputs | {"inputs_embeds": inputs["inputs_embeds"].clone()})).logits


def test_config_round_trip_and_refusals(hf_talker_config, thinker_config) -> None:  # noqa: ANN001
    hf = hf_talker_config.to_dict()
    config = talker_config_from_hf(hf)
    assert config.text.head_dim == 16 and config.text.d_model == 48 and config.embedding_size == E
    assert config.text.mrope_section == (4, 2, 2) and config.audio_token_id == thinker_config.audio_token_id
    assert talker_config_from_hf(talker_config_to_hf(config)) == config
    assert talker_config_from_hf({"model_type": "qwen2_5_omni", "talker_config": hf}) == config
    # transformers' defaults when config.json leaves the rotary settings out
    bare = {k: v for k, v in hf.items() if k != "rope_parameters"} | {"head_dim": 128}
    assert talker_config_from_hf(bare).text.mrope_section == (16, 24, 24)
    assert talker_config_from_hf(bare).text.rope_theta == 1_000_000.0
    with pytest.raises(CheckpointError, match="sliding"):
        talker_config_from_hf(hf | {"use_sliding_window": True})
    with pytest.raises(ConfigError, match="outside the codec vocabulary"):
        replace(config, tts_codec_mask_token_id=96)
    with pytest.raises(ConfigError, match="not a Qwen2.5-Omni talker"):
        talker_config_from_hf(hf | {"model_type": "qwen2"})


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_transformers_talker_loads_with_equal_logits(hf_talker, hf_folder: Path, thinker_config,  # noqa: ANN001
                                                       layout: str) -> None:
    ours = load_talker(hf_folder)
    inputs = prompt_batch(thinker_config, layout, seed=1)
    real = inputs["attention_mask"].bool()
    positions = our_positions(ours, inputs)
    if layout != "text":
        assert not torch.equal(positions[0], positions[1])  # the image's rows and columns: 3-D ids
    with torch.no_grad():
        logits = ours(inputs["inputs_embeds"], position_ids=positions, attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(logits[real], hf_prompt_logits(hf_talker, inputs)[real], atol=1e-4, rtol=1e-4)


def test_decoding_steps_follow_the_reply_track(hf_talker, hf_folder: Path, thinker_config) -> None:  # noqa: ANN001
    """transformers' prefill then cached steps (a code each + the next reply-track vector, padding past its end)
    against one teacher-forced forward of ours over prompt and steps; the image's 3-D ids make the steps continue
    past the largest id, not past the row count."""
    ours = load_talker(hf_folder)
    inputs = prompt_batch(thinker_config, "image", seed=2)
    length = inputs["input_text_ids"].shape[1]
    track = torch.randn(1, 3, E, generator=torch.Generator().manual_seed(3))
    codes = torch.tensor([[3, 17, 90, 60, 5, 44]])
    steps = codes.shape[1]

    reply, mask = track, inputs["attention_mask"]
    hf_talker.rope_deltas = None
    with torch.no_grad():
        out = hf_talker(**(inputs | {"inputs_embeds": inputs["inputs_embeds"].clone()}), use_cache=True)
        expected = [out.logits[:, -1]]
        for j in range(steps - 1):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            out = hf_talker(input_ids=codes[:, j:j + 1], thinker_reply_part=reply, attention_mask=mask,
                            cache=out.cache, use_cache=True)
            reply = out.thinker_reply_part
            expected.append(out.logits[:, -1])

    view = TalkerInputs(prompt=inputs["inputs_embeds"], position_ids=our_positions(ours, inputs), reply=track)
    with torch.no_grad():
        logits = ours(view.prompt, codes[:, :-1], view.reply_rows(0, steps - 1),
                      position_ids=view.positions(steps - 1))
    torch.testing.assert_close(logits[:, length - 1:], torch.stack(expected, dim=1), atol=1e-4, rtol=1e-4)


def test_an_omnilm_talker_folder_loads_in_transformers(tmp_path: Path, hf_talker_config, thinker_config) -> None:  # noqa: ANN001
    from transformers import Qwen2_5OmniTalkerForConditionalGeneration

    config = talker_config_from_hf(hf_talker_config.to_dict())
    ours = Talker(config).eval()
    randomise(ours, seed=4)
    folder = save_talker(ours, tmp_path / "talker")
    assert not list(folder.glob(".*.tmp"))
    reference = Qwen2_5OmniTalkerForConditionalGeneration.from_pretrained(folder).eval()
    again = load_talker(folder)
    for layout in LAYOUTS:
        inputs = prompt_batch(thinker_config, layout, seed=5)
        real = inputs["attention_mask"].bool()
        positions = our_positions(ours, inputs)
        with torch.no_grad():
            logits = ours(inputs["inputs_embeds"], position_ids=positions, attention_mask=inputs["attention_mask"])
            torch.testing.assert_close(again(inputs["inputs_embeds"], position_ids=positions,
                                             attention_mask=inputs["attention_mask"]), logits, atol=0, rtol=0)
        torch.testing.assert_close(hf_prompt_logits(reference, inputs)[real], logits[real], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# a Thinker's reply, read by the Talker


@pytest.fixture(scope="module")
def hf_omni(hf_thinker_config, hf_talker_config, hf_talker):  # noqa: ANN001, ANN201
    """transformers' whole model around the tiny Thinker and the Talker (no Token2Wav: its input is captured)."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    config = Qwen2_5OmniConfig(thinker_config=hf_thinker_config.to_dict(),
                               talker_config=hf_talker_config.to_dict(), enable_audio_output=False)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    randomise(model.thinker, seed=6)
    model.talker, model.has_talker = hf_talker, True
    model.speaker_map = {"Chelsie": {"bos_token": SPEAKER_BOS}}
    return model


def omni_prompt(thinker_config) -> dict:  # noqa: ANN001
    """One row holding a sound and an image, with real inputs for the Thinker."""
    rng = np.random.default_rng(7)
    sound = torch.tensor(rng.standard_normal(16000 * 9 // 10), dtype=torch.float32) * 0.1
    images = preprocess_images([rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)])
    rows = [[("text", [5, 6]), ("audio", -(-len(sound) // 160)), ("text", [7]),
             ("image", images.image_grid_thw[0].tolist()), ("text", [8, 9])]]
    batch = build_batch({"rows": rows, "use_audio_in_video": False}, thinker_config)
    features, feature_mask = audio_features([sound])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "input_features": features,
            "feature_attention_mask": feature_mask, "pixel_values": images.pixel_values,
            "image_grid_thw": images.image_grid_thw}


class Captured(Exception):  # noqa: N818 - not an error: it carries the talker's inputs out of generate
    pass


def capture_talker_inputs(model, monkeypatch: pytest.MonkeyPatch, inputs: dict, eos: list[int]) -> dict:  # noqa: ANN001
    def capture(**kwargs: object) -> None:
        raise Captured(kwargs)

    monkeypatch.setattr(model.talker, "generate", capture)
    with pytest.raises(Captured) as caught, torch.no_grad():
        model.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=8, thinker_do_sample=False,
                       thinker_eos_token_id=eos,
                       # its default is Qwen2.5-Omni-7B's codec pad and end ids; the tiny codec has its own
                       talker_eos_token_id=[CODEC["tts_codec_pad_token_id"], CODEC["tts_codec_end_token_id"]])
    monkeypatch.undo()
    return caught.value.args[0]


def hf_greedy_codes(model, captured: dict, max_new_tokens: int) -> list[int]:  # noqa: ANN001
    """transformers' talker ``generate``, greedy, on the captured inputs, up to its first end code.

    transformers 5 drops an all-ones attention mask inside ``generate``, and without a mask its talker neither
    adds the codec cue nor uses the TMRoPE ids (both hang on the mask). A second row, the same prompt with its
    first token replaced by padding, keeps the mask; the first row is the one compared.
    """
    def two(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.cat([pad, x[:, 1:]], dim=1)])

    ids = captured["input_ids"]
    mask = captured["attention_mask"]
    inputs = {"input_ids": two(ids, ids[:, :1]), "input_text_ids": two(captured["input_text_ids"], ids[:, :1] * 0),
              "inputs_embeds": two(captured["inputs_embeds"], captured["inputs_embeds"][:, :1] * 0),
              "attention_mask": two(mask, mask[:, :1] * 0),
              "thinker_reply_part": captured["thinker_reply_part"].repeat(2, 1, 1),
              "image_grid_thw": captured["image_grid_thw"].repeat(2, 1),
              "audio_feature_lengths": captured["audio_feature_lengths"].repeat(2)}
    keep = ("suppress_tokens", "eos_token_id", "pad_token_id", "repetition_penalty")
    model.rope_deltas = None
    with torch.no_grad():
        sequence = model.generate(**inputs, **{k: captured[k] for k in keep}, do_sample=False,
                                  max_new_tokens=max_new_tokens)
    codes = sequence[0, ids.shape[1]:].tolist()
    ends = [i for i, code in enumerate(codes) if code in captured["eos_token_id"]]
    return codes[:ends[0]] if ends else codes


@pytest.mark.parametrize("ending", ["eos", "runs_out"])
def test_inputs_and_greedy_codes_match_transformers(tmp_path: Path, hf_omni, hf_folder: Path,  # noqa: ANN001
                                                    monkeypatch: pytest.MonkeyPatch, ending: str) -> None:
    """transformers' whole model makes the Talker's inputs from its Thinker's greedy reply (captured where they
    enter the talker's generate); ours are made from the same reply by our Thinker with the same weights."""
    hf_omni.thinker.save_pretrained(tmp_path / "thinker")
    thinker = load_thinker(tmp_path / "thinker")
    talker = load_talker(hf_folder)  # the weights of hf_omni.talker
    inputs = omni_prompt(thinker.config)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        reply = hf_omni.thinker.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, prompt_len:].tolist()
    c = thinker.config
    assert not {c.audio_token_id, c.image_token_id, c.video_token_id} & set(reply)
    if ending == "eos":  # end the reply at its first token not seen before, from the third on
        eos = [next(t for i, t in enumerate(reply) if i >= 3 and t not in reply[:i])]
    else:
        eos = [min(set(range(5, 280)) - set(reply))]
    captured = capture_talker_inputs(hf_omni, monkeypatch, inputs, eos)
    reply_ids = reply[:reply.index(eos[0]) + 1] if ending == "eos" else reply  # what the Thinker generated
    assert captured["thinker_reply_part"].shape[1] == len(reply_ids)

    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    ours = talker_inputs(thinker, talker.config, inputs["input_ids"], reply_ids, SPEAKER_BOS, eos, **media)
    torch.testing.assert_close(ours.prompt, captured["inputs_embeds"], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the Thinker's hidden states handed in (over the whole reply) give the same inputs
        hidden = thinker.hidden_states(torch.cat([inputs["input_ids"], torch.tensor([reply_ids])], dim=1), **media)
    again = talker_inputs(thinker, talker.config, inputs["input_ids"], reply_ids, SPEAKER_BOS, eos, hidden, **media)
    assert torch.equal(again.prompt, ours.prompt) and torch.equal(again.reply, ours.reply)
    track = captured["thinker_reply_part"]  # transformers pads it to the reply's length
    torch.testing.assert_close(ours.reply_rows(0, track.shape[1]), track, atol=1e-4, rtol=1e-4)
    hf_positions, _ = hf_omni.talker.get_rope_index(captured["input_text_ids"], captured["image_grid_thw"], None,
                                                    captured["attention_mask"], False,
                                                    captured["audio_feature_lengths"], None)
    assert torch.equal(ours.position_ids, hf_positions)

    # A strong repetition penalty: the prompt's codec ids count as seen, which a mild one would hardly show.
    params = SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.5)
    codes = list(generate_codes(talker, ours, params))
    expected = hf_greedy_codes(hf_omni.talker, captured | {"repetition_penalty": 1.5}, params.max_new_tokens)
    assert codes == expected
    assert len(codes) >= 5, "a reply this short tests little: change the seeds"
    # speech ends before the first end code, which is not yielded
    stop = next(code for i, code in enumerate(codes) if i >= 3 and code not in codes[:i])
    assert list(generate_codes(talker, ours, params, end_codes=(stop,))) == codes[:codes.index(stop)]


def test_a_whole_qwen2_5_omni_folder_gives_its_talker(tmp_path: Path, hf_omni, hf_folder: Path,  # noqa: ANN001
                                                      thinker_config) -> None:
    hf_omni.save_pretrained(tmp_path / "omni")
    talker, alone = load_talker(tmp_path / "omni"), load_talker(hf_folder)
    assert talker.config == alone.config
    inputs = prompt_batch(thinker_config, "media", seed=11)
    positions = our_positions(talker, inputs)
    with torch.no_grad():
        assert torch.equal(talker(inputs["inputs_embeds"], position_ids=positions),
                           alone(inputs["inputs_embeds"], position_ids=positions))


def test_sampled_codes_are_reproducible_and_never_restart(hf_folder: Path, thinker_config) -> None:  # noqa: ANN001
    talker = load_talker(hf_folder)
    view = prompt_batch(thinker_config, "text", seed=8)
    inputs = TalkerInputs(prompt=view["inputs_embeds"], position_ids=our_positions(talker, view),
                          reply=torch.randn(1, 4, E, generator=torch.Generator().manual_seed(9)))
    params = replace(TALKER_SAMPLING, max_new_tokens=12, seed=10)
    first = list(generate_codes(talker, inputs, params))
    assert first == list(generate_codes(talker, inputs, params))
    assert first and all(0 <= c < 96 and c != CODEC["tts_codec_start_token_id"] for c in first)
    assert not set(first) & set(talker.config.end_codes)
    # codec start is never chosen, even where it would be the most likely code
    greedy = replace(params, temperature=0)
    best = list(generate_codes(talker, inputs, greedy))
    with torch.no_grad():
        talker.codec_head.weight[CODEC["tts_codec_start_token_id"]] = 3 * talker.codec_head.weight[best[0]]
        logits = talker(inputs.prompt, position_ids=inputs.position_ids)[0, -1]
    assert logits.argmax() == CODEC["tts_codec_start_token_id"]
    assert list(generate_codes(talker, inputs, greedy))[:1] == best[:1]
