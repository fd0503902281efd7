"""Changing a trained model's context settings: weights shared or kept, only context fields, the stage hook."""

import pytest
import torch

from helpers import small_model
from omnilm.config import ConfigError
from omnilm.model.context import with_context


def test_shared_copy_changes_only_the_copy_and_keeps_the_weights():
    model = small_model("llama", max_seq_len=32)
    extended = with_context(model, {"max_seq_len": 256, "rope_scaling": {"rope_type": "linear", "factor": 8}},
                            share=True)
    assert model.config.rope_scaling is None and extended.config.rope_scaling["factor"] == 8
    assert extended.tok_emb.weight is model.tok_emb.weight
    ids = torch.randint(0, 320, (1, 40))
    with torch.no_grad():  # linear scaling by 8 = positions divided by 8: equal to feeding positions / 8
        positions = (torch.arange(40) / 8)[None]
        from omnilm.model.attention import rope_cos_sin

        cos, sin = rope_cos_sin(positions, 16, 10000.0, torch.float32)
        scaled_cos, _ = rope_cos_sin(torch.arange(40)[None], 16, 10000.0, torch.float32,
                                     scaling=extended.config.rope_scaling)
        torch.testing.assert_close(scaled_cos, cos)
        assert not torch.allclose(extended(ids), model(ids))


def test_only_context_fields_and_no_growing_position_tables():
    with pytest.raises(ConfigError, match="d_model"):
        with_context(small_model("llama"), {"d_model": 32})
    with pytest.raises(ConfigError, match="position table"):
        with_context(small_model("gpt2", max_seq_len=32), {"max_seq_len": 64})
    with pytest.raises(ConfigError, match="rope_type"):
        with_context(small_model("llama"), {"rope_scaling": {"rope_type": "nope", "factor": 2}})
