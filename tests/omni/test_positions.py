"""TMRoPE position ids against transformers' ``get_rope_index`` over random layouts of text, audio, images and
video (with and without audio in the video), batched and left-padded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from omnilm.omni.config import thinker_config_from_hf
from omnilm.omni.positions import _chunks, rope_index
from tests_omni_layouts import PAD, build_batch, layouts


@pytest.fixture(scope="module")
def hf_model(hf_thinker_config):  # noqa: ANN001, ANN201
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration(hf_thinker_config).model.eval()


@pytest.fixture(scope="module")
def config(hf_thinker_config):  # noqa: ANN001, ANN201
    return thinker_config_from_hf(hf_thinker_config.to_dict())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts())
def test_position_ids_equal_transformers(hf_model, config, layout) -> None:  # noqa: ANN001
    batch = build_batch(layout, config)
    ours, our_deltas = rope_index(batch["input_ids"], config, batch["attention_mask"], batch["image_grid_thw"],
                                  batch["video_grid_thw"], batch["audio_feature_lengths"],
                                  batch["video_second_per_grid"], layout["use_audio_in_video"])
    theirs, their_deltas = hf_model.get_rope_index(batch["input_ids"], batch["image_grid_thw"],
                                                   batch["video_grid_thw"], batch["attention_mask"],
                                                   layout["use_audio_in_video"], batch["audio_feature_lengths"],
                                                   batch["video_second_per_grid"])
    assert torch.equal(ours, theirs.long())
    assert torch.equal(our_deltas.view(-1), their_deltas.long().view(-1))


def test_chunks_advance_one_boundary_per_position() -> None:
    values = torch.tensor([0, 0, 100, 100, 101])
    assert _chunks(values, 0, 50) == [(0, 2), (2, 3), (3, 5)]
    assert _chunks(torch.arange(120), 0, 50) == [(0, 50), (50, 100), (100, 120)]


def test_text_only_is_plain_positions_from_the_mask() -> None:
    from omnilm.omni.config import ThinkerConfig

    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = (ids != PAD).long()
    positions, deltas = rope_index(ids, ThinkerConfig(), mask)
    assert positions[:, 0].tolist() == [[1, 1, 0, 1, 2]] * 3 and positions[:, 1].tolist() == [[0, 1, 2, 3, 4]] * 3
    assert deltas.view(-1).tolist() == [0, 0]
