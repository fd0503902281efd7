"""A tiny transformers Qwen2.5-Omni thinker config, built locally (no download), shared by the omni tests."""

from __future__ import annotations

import pytest

# Token ids above the text of the test vocabulary.
TOKENS = dict(audio_token_index=290, image_token_index=291, video_token_index=292, audio_start_token_id=293,
              audio_end_token_id=294, vision_start_token_id=295, vision_end_token_id=296, user_token_id=297)


def tiny_hf_thinker_config(vocab_size: int = 300):  # noqa: ANN201
    """transformers' thinker config: 2-layer decoder (head_dim 16, mrope 2/3/3), 2-layer encoders."""
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, n_window=100, output_dim=64, max_source_positions=1500),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=112),
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        **TOKENS)


@pytest.fixture(scope="session")
def hf_thinker_config():  # noqa: ANN201
    return tiny_hf_thinker_config()
