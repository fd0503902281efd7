from pathlib import Path

import pytest
import torch

from omnilm.config import ConfigError
from omnilm.model import PRESETS, ModelConfig, Transformer, get_preset, load_model_config


def count_params(config: ModelConfig) -> int:
    with torch.device("meta"):
        return Transformer(config).num_params()


def test_presets_have_the_published_shapes_and_sizes():
    qwen = PRESETS["qwen2.5-0.5b"]
    assert (qwen.n_layer, qwen.d_model, qwen.n_head, qwen.kv_heads, qwen.vocab_size) == (24, 896, 14, 2, 151936)
    assert qwen.tie_embeddings and qwen.dim_per_head == 64 and qwen.ff_dim == 4864
    # Published parameter counts: Qwen2.5-0.5B 494,032,768; GPT-2 small 124,439,808.
    assert count_params(qwen) == 494_032_768
    assert count_params(PRESETS["gpt2-124m"]) == 124_439_808
    assert 0.8e6 <= count_params(PRESETS["tiny"]) <= 1.3e6
    assert PRESETS["llama-tiny"].kv_heads < PRESETS["llama-tiny"].n_head


def test_yaml_config_with_preset_and_overrides(tmp_path: Path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: tiny\nn_layer: 2\nrope_theta: 500000\n")
    config = load_model_config(path)
    assert config.n_layer == 2 and config.rope_theta == 500000 and config.d_model == PRESETS["tiny"].d_model


def test_json_config_and_unknown_keys(tmp_path: Path):
    path = tmp_path / "model.json"
    path.write_text('{"family": "gpt2", "d_model": 32, "n_head": 2, "n_layer": 1}')
    assert load_model_config(path).family == "gpt2"
    path.write_text('{"family": "gpt2", "d_modle": 32}')
    with pytest.raises(ConfigError, match="d_modle"):
        load_model_config(path)


@pytest.mark.parametrize("bad, match", [
    (dict(n_head=4, n_kv_head=3), "must divide"),
    (dict(family="mamba"), "unknown model family"),
    (dict(d_model=30, n_head=4), "not divisible"),
    (dict(family="gpt2", n_head=4, n_kv_head=2), "grouped-query"),
])
def test_invalid_configs_are_rejected(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**bad)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="available"):
        get_preset("gpt5")
