"""The Thinker against transformers' ``Qwen2_5OmniThinkerForConditionalGeneration``: folders both ways, equal
logits on text, audio, images, video and audio-in-video, in left-padded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnilm.omni import Thinker, load_thinker, save_thinker  # the public import the docs name
from omnilm.omni.audio import audio_features
from omnilm.omni.vision import preprocess_images, preprocess_videos
from tests_omni_layouts import build_batch


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter drawn at random (default inits leave norms at 1 and biases at 0, which hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def media_batch(config, kinds: list[str], use_audio_in_video: bool, seed: int = 0) -> dict:  # noqa: ANN001
    """Two left-padded rows holding the given media, with real inputs for every placeholder."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8) for i in range(kinds.count("image"))]
    videos = [rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8) for _ in range(kinds.count("video"))]
    image_features = preprocess_images(images) if images else None
    video_features = preprocess_videos(videos, fps=2.0, min_pixels=56 * 56, max_pixels=56 * 56) if videos else None
    sounds = [torch.tensor(rng.standard_normal(int(16000 * s)), dtype=torch.float32) * 0.1
              for s in (1.3, 2.7, 0.4, 3.1)]
    unused_sounds = iter(sounds)
    image_grids = iter([] if image_features is None else image_features.image_grid_thw.tolist())
    video_grids = iter([] if video_features is None else video_features.video_grid_thw.tolist())
    rows, used_audio = [], []
    for row in range(2):
        segments = [("text", [5 + row, 6, 7])]
        for kind in kinds[row::2]:
            if kind == "audio":
                used_audio.append(next(unused_sounds))
                segments.append(("audio", -(-len(used_audio[-1]) // 160)))
            elif kind == "image":
                segments.append(("image", next(image_grids)))
            else:
                frames = 0
                if use_audio_in_video:
                    used_audio.append(next(unused_sounds))
                    frames = -(-len(used_audio[-1]) // 160)
                segments.append(("video", (next(video_grids), 1.0, frames)))
            segments.append(("text", [8, 9 + row]))
        rows.append(segments)
    batch = build_batch({"rows": rows, "use_audio_in_video": use_audio_in_video}, config)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "use_audio_in_video": use_audio_in_video}
    if used_audio:
        features, mask = audio_features(used_audio)
        inputs["input_features"], inputs["feature_attention_mask"] = features, mask
    if image_features is not None:
        inputs["pixel_values"], inputs["image_grid_thw"] = image_features
    if video_features is not None:
        inputs["pixel_values_videos"], inputs["video_grid_thw"], inputs["video_second_per_grid"] = video_features
    return inputs


CASES = {"text": ([], False), "audio": (["audio", "audio"], False), "image": (["image", "audio", "image"], False),
         "video": (["video", "image"], False), "audio_in_video": (["video", "audio", "video"], True)}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, hf_thinker_config) -> Path:  # noqa: ANN001
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration(hf_thinker_config).eval()
    randomise(model)
    folder = tmp_path_factory.mktemp("hf-thinker")
    model.save_pretrained(folder)
    return folder


def hf_logits(model, inputs: dict) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("case", list(CASES))
def test_a_transformers_thinker_loads_with_equal_logits(hf_folder: Path, case: str) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    reference = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(hf_folder).eval()
    ours = load_thinker(hf_folder)
    kinds, in_video = CASES[case]
    inputs = media_batch(ours.config, kinds, in_video)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        logits = ours(**inputs)
    torch.testing.assert_close(logits[real], hf_logits(reference, inputs)[real], atol=1e-4, rtol=1e-4)


def test_logits_at_selected_positions_are_those_of_the_whole_sequence(hf_folder: Path) -> None:
    ours = load_thinker(hf_folder)
    inputs = media_batch(ours.config, CASES["audio_in_video"][0], True)
    chosen = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    chosen[0, -3:], chosen[1, [-1, -5]] = True, True
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs, logits_at=chosen), ours(**inputs)[chosen], atol=1e-5, rtol=1e-5)


def test_an_omnilm_thinker_folder_loads_in_transformers(tmp_path: Path, hf_thinker_config) -> None:  # noqa: ANN001
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omnilm.omni.config import thinker_config_from_hf

    config = thinker_config_from_hf(hf_thinker_config.to_dict())
    ours = Thinker(config).eval()
    randomise(ours, seed=1)
    folder = save_thinker(ours, tmp_path / "thinker")
    reference = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(folder).eval()
    again = load_thinker(folder)
    for case, (kinds, in_video) in CASES.items():
        inputs = media_batch(config, kinds, in_video, seed=2)
        real = inputs["attention_mask"].bool()
        with torch.no_grad():
            logits = ours(**inputs)
            torch.testing.assert_close(again(**inputs), logits, atol=0, rtol=0)
        torch.testing.assert_close(hf_logits(reference, inputs)[real], logits[real], atol=1e-4, rtol=1e-4,
                                   msg=lambda m, c=case: f"{c}: {m}")


@pytest.mark.parametrize("case", ["image", "audio_in_video"])
def test_greedy_generation_equals_transformers_generate(hf_folder: Path, case: str) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omnilm.infer.generate import FINISHED
    from omnilm.infer.sampling import SamplingParams
    from omnilm.omni.generate import generate_thinker

    reference = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(hf_folder).eval()
    ours = load_thinker(hf_folder)
    kinds, in_video = CASES[case]
    inputs = media_batch(ours.config, kinds, in_video, seed=3)
    steps = list(generate_thinker(ours, inputs, SamplingParams(max_new_tokens=12, temperature=0)))
    tokens = torch.stack(steps, dim=1)  # (B, new)
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[:, inputs["input_ids"].shape[1]:]
    assert (tokens != FINISHED).all()
    assert torch.equal(tokens, expected)


def test_the_package_exports_the_thinker_lazily() -> None:
    """``omnilm.omni`` names the Thinker's loader without importing torch-heavy modules until asked."""
    import subprocess
    import sys

    code = ("import sys, omnilm.omni as o; assert 'omnilm.omni.thinker' not in sys.modules; "
            "from omnilm.omni import load_thinker; from omnilm.omni.thinker import load_thinker as direct; "
            "assert load_thinker is direct; print(sorted(o.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "load_thinker" in out
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        import omnilm.omni

        omnilm.omni.missing  # noqa: B018


def test_a_thinker_loaded_with_another_rotary_split_is_transformers_with_that_split(hf_folder: Path) -> None:
    """``mrope_section`` at load time: the same weights reading positions with another temporal/height/width split,
    as transformers does with that split in its config (and unlike the folder's own split)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    source = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(hf_folder).eval()
    config = source.config
    config.text_config.rope_parameters = dict(config.text_config.rope_parameters) | {"mrope_section": [4, 2, 2]}
    reference = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    reference.load_state_dict(source.state_dict())
    ours = load_thinker(hf_folder, mrope_section=[4, 2, 2])
    assert ours.config.text.mrope_section == (4, 2, 2)
    inputs = media_batch(ours.config, *CASES["audio_in_video"])
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        logits = ours(**inputs)
        own_split = load_thinker(hf_folder)(**inputs)
    torch.testing.assert_close(logits[real], hf_logits(reference, inputs)[real], atol=1e-4, rtol=1e-4)
    assert (logits[real] - own_split[real]).abs().max() > 1e-2
