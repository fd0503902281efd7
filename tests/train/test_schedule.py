import math

import pytest

from omnilm.config import ConfigError
from omnilm.train.config import TrainConfig
from omnilm.train.schedule import lr_multiplier


def multipliers(total: int, **kwargs) -> list[float]:
    config = TrainConfig(max_steps=total, **kwargs)
    return [lr_multiplier(step, total, config) for step in range(total)]


def test_warmup_is_linear_then_cosine_reaches_floor():
    values = multipliers(20, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine from step 4 (progress 0) to step 19 (progress 1)
    for step in range(4, 20):
        progress = (step - 4) / 15
        assert values[step] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert values[-1] == pytest.approx(0.1)


def test_linear_decay():
    values = multipliers(11, schedule="linear", min_lr_ratio=0.0)
    assert values == pytest.approx([1 - i / 10 for i in range(11)])


def test_wsd_is_flat_then_decays_over_the_final_fraction():
    values = multipliers(10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0, warmup_steps=2)
    assert values[:2] == pytest.approx([0.5, 1.0])
    assert values[2:8] == pytest.approx([1.0] * 6)
    assert values[8:] == pytest.approx([0.5, 0.0])


def test_budget_in_tokens_and_accumulation():
    config = TrainConfig(max_tokens=10_000, batch_size=4, seq_len=32, tokens_per_step=256)
    assert config.accumulation(world_size=1) == 2
    assert config.accumulation(world_size=2) == 1
    assert config.total_steps(world_size=1) == math.ceil(10_000 / 256)
    with pytest.raises(ConfigError, match="multiple"):
        TrainConfig(max_steps=1, batch_size=3, seq_len=32, tokens_per_step=256).accumulation(1)


@pytest.mark.parametrize("kwargs", [{}, {"max_steps": 1, "max_tokens": 5}, {"max_steps": 1, "schedule": "exp"},
                                    {"max_steps": 1, "batch_size": 0}])
def test_bad_configs_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)
