"""Token2wav's DiT against transformers' ``Qwen2_5OmniToken2WavDiTModel`` (the oracle): configs and weights both
ways, equal velocities, equal sampling (RK4 against its sampler, Euler against a loop over its forward); the
block-limited dependence; streaming against whole-utterance sampling; the flow-matching loss and a few steps of
training."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniDiTConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavDiTModel

from omnilm.config import ConfigError
from omnilm.omni.dit import (
    HF_PREFIX,
    DiT,
    DiTConfig,
    dit_config_from_hf,
    dit_config_to_hf,
    dit_state_from_hf,
    dit_state_to_hf,
    exact_window,
    flow_matching_loss,
    ode_evaluations,
    sample,
    sample_stream,
    time_grid,
)

TOL = dict(atol=1e-4, rtol=0)
EXACT = dict(atol=1e-5, rtol=0)

# 4 layers: layer 2 looks one block ahead, layers 0 and 3 one block back (n_back 2, n_ahead 1, as in the 7B).
CONFIG = DiTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, head_dim=16, ff_mult=2, emb_dim=8,
                   block_size=4, look_ahead_layers=(2,), look_backward_layers=(0, 3), repeats=2, num_embeds=20,
                   mel_dim=6, enc_emb_dim=5, enc_dim=7, enc_channels=(8, 8, 8, 16), enc_kernel_sizes=(5, 3, 3, 1),
                   enc_dilations=(1, 2, 3, 1), enc_attention_channels=4, enc_res2net_scale=2, enc_se_channels=4)
B, N, T_REF = 2, 20, 30
T = N * CONFIG.repeats  # 40 frames = 10 blocks


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter at random, weights scaled by 1/sqrt(fan-in) so that every layer matters (transformers'
    0.02-std init leaves the velocity, and so any difference, near zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 25
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)


@pytest.fixture(scope="module")
def models() -> tuple[Qwen2_5OmniToken2WavDiTModel, DiT]:
    hf = Qwen2_5OmniToken2WavDiTModel(Qwen2_5OmniDiTConfig(**dit_config_to_hf(CONFIG))).eval()
    randomise(hf)
    ours = DiT(CONFIG).eval()
    ours.load_state_dict(dit_state_from_hf(hf.state_dict()))
    return hf, ours


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(codes=torch.randint(0, CONFIG.num_embeds + 1, (B, N), generator=g),
                reference=torch.randn(B, T_REF, CONFIG.mel_dim, generator=g),
                speaker=torch.randn(B, CONFIG.enc_emb_dim, generator=g),
                x=torch.randn(B, T, CONFIG.mel_dim, generator=g),
                noise=torch.randn(B, T, CONFIG.mel_dim, generator=g))


def hf_velocity(hf: Qwen2_5OmniToken2WavDiTModel, x: torch.Tensor, inputs: dict, time: torch.Tensor,
                **kwargs: object) -> torch.Tensor:
    speaker = inputs["speaker"][:, None].expand(-1, x.shape[1], -1)  # transformers takes it per frame
    with torch.no_grad():
        return hf(x, inputs["reference"], speaker, inputs["codes"], time, **({"apply_cfg": False} | kwargs))


# ----------------------------------------------------------------------------------------------------------------
# Config and weights
# ----------------------------------------------------------------------------------------------------------------


def test_config_round_trip() -> None:
    hf = Qwen2_5OmniDiTConfig(**dit_config_to_hf(CONFIG)).to_dict()
    assert dit_config_from_hf(hf) == CONFIG
    assert dit_config_from_hf({"model_type": "qwen2_5_omni_token2wav", "dit_config": hf}) == CONFIG
    full = {"model_type": "qwen2_5_omni", "token2wav_config": {"model_type": "qwen2_5_omni_token2wav",
                                                               "dit_config": hf}}
    assert dit_config_from_hf(full) == CONFIG
    # transformers' defaults are ours.
    assert dit_config_from_hf(Qwen2_5OmniDiTConfig().to_dict()) == DiTConfig()


def test_config_refusals() -> None:
    hf = dit_config_to_hf(CONFIG)
    with pytest.raises(ConfigError, match="rope_type"):
        dit_config_from_hf(hf | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ConfigError, match="not a Qwen2.5-Omni DiT"):
        dit_config_from_hf(hf | {"model_type": "qwen2"})
    with pytest.raises(ConfigError, match="look_ahead_layers"):
        DiTConfig(num_hidden_layers=4, look_ahead_layers=(4,), look_backward_layers=(0,))
    with pytest.raises(ConfigError, match="sum"):
        DiTConfig(enc_channels=(8, 8, 8, 8), enc_kernel_sizes=(5, 3, 3, 1), enc_dilations=(1, 2, 3, 1))
    with pytest.raises(ConfigError, match="equal"):
        DiTConfig(enc_channels=(8, 16, 8, 24), enc_kernel_sizes=(5, 3, 3, 1), enc_dilations=(1, 2, 3, 1))


def test_state_dict_both_ways(models: tuple) -> None:
    hf, ours = models
    # Our names load into transformers' model strictly, and a full checkpoint's sub-tree into ours.
    fresh = Qwen2_5OmniToken2WavDiTModel(Qwen2_5OmniDiTConfig(**dit_config_to_hf(CONFIG)))
    fresh.load_state_dict(dit_state_to_hf(ours.state_dict(), prefix=""), strict=True)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, hf.state_dict()[name]), name
    full = dit_state_to_hf(ours.state_dict()) | {"token2wav.code2wav_bigvgan_model.conv_pre.weight": torch.ones(1),
                                                 "thinker.lm_head.weight": torch.ones(1)}
    assert all(k.startswith(HF_PREFIX) for k in dit_state_to_hf(ours.state_dict()))
    reloaded = DiT(CONFIG)
    reloaded.load_state_dict(dit_state_from_hf(full), strict=True)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", [(False, False), (True, False), (False, True), (True, True)])
def test_forward_matches_transformers(models: tuple, inputs: dict, drop: tuple[bool, bool]) -> None:
    hf, ours = models
    time = torch.tensor([0.3, 0.85])
    expected = hf_velocity(hf, inputs["x"], inputs, time, drop_audio_conditioning=drop[0], drop_code=drop[1])
    with torch.no_grad():
        got = ours(inputs["x"], inputs["reference"], inputs["speaker"], inputs["codes"], time,
                   drop_reference=drop[0], drop_codes=drop[1])
    assert expected.abs().mean() > 0.3  # the random model is far from zero
    torch.testing.assert_close(got, expected, **TOL)


def test_per_row_drops(models: tuple, inputs: dict) -> None:
    hf, ours = models
    time = torch.tensor(0.4)
    with torch.no_grad():
        got = ours(inputs["x"], inputs["reference"], inputs["speaker"], inputs["codes"], time,
                   drop_reference=torch.tensor([True, False]), drop_codes=torch.tensor([False, True]))
    torch.testing.assert_close(got[0], hf_velocity(hf, inputs["x"], inputs, time, drop_audio_conditioning=True)[0],
                               **TOL)
    torch.testing.assert_close(got[1], hf_velocity(hf, inputs["x"], inputs, time, drop_code=True)[1], **TOL)


def test_one_evaluation_reaches_n_back_blocks_behind_and_n_ahead_ahead(models: tuple, inputs: dict) -> None:
    """Changing block j of x changes the velocity of block b only if b − n_ahead ≤ j ≤ b + n_back."""
    _, ours = models
    bs, b = CONFIG.block_size, 5
    with torch.no_grad():
        base = ours(inputs["x"], inputs["reference"], inputs["speaker"], inputs["codes"], 0.5)
        for j in range(T // bs):
            x = inputs["x"].clone()
            x[:, j * bs:(j + 1) * bs] += 1.0
            out = ours(x, inputs["reference"], inputs["speaker"], inputs["codes"], 0.5)
            changed = (out - base)[:, b * bs:(b + 1) * bs].abs().max().item()
            reaches = b - CONFIG.n_look_back <= j <= b + CONFIG.n_look_ahead
            assert (changed > 1e-3) == reaches, (j, changed)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,guidance,sway", [(10, 0.5, -1.0), (4, 0.0, -1.0), (3, 0.7, None)])
def test_rk4_sample_matches_transformers(models: tuple, inputs: dict, steps: int, guidance: float,
                                         sway: float | None) -> None:
    hf, ours = models
    torch.manual_seed(123)  # transformers draws its noise from the global generator
    expected = hf.sample(inputs["speaker"], inputs["reference"], inputs["codes"], num_steps=steps,
                         guidance_scale=guidance, sway_coefficient=sway)
    torch.manual_seed(123)
    noise = torch.randn(B, T, CONFIG.mel_dim)
    got = sample(ours, inputs["codes"], inputs["reference"], inputs["speaker"], steps, "rk4",
                 guidance_scale=guidance, sway_coefficient=sway, noise=noise)
    assert got.shape == (B, CONFIG.mel_dim, T)
    assert (expected.transpose(1, 2) - noise).abs().mean() > 0.5  # the flow moved the noise
    torch.testing.assert_close(got, expected, **TOL)


def test_euler_sample_matches_a_loop_over_transformers_forward(models: tuple, inputs: dict) -> None:
    hf, ours = models
    steps, guidance = 6, 0.5
    grid = torch.linspace(0, 1, steps)
    grid = grid + -1.0 * (torch.cos(torch.pi / 2 * grid) - 1 + grid)
    x = inputs["noise"]
    speaker = inputs["speaker"][:, None].expand(-1, T, -1)
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        with torch.no_grad():
            both = hf(x, inputs["reference"], speaker, inputs["codes"], t0, apply_cfg=True)
        cond, uncond = both.chunk(2)
        x = x + (t1 - t0) * (cond + (cond - uncond) * guidance)
    got = sample(ours, inputs["codes"], inputs["reference"], inputs["speaker"], steps, "euler",
                 guidance_scale=guidance, noise=inputs["noise"])
    torch.testing.assert_close(got, x.transpose(1, 2), **TOL)


def test_time_grid_and_evaluations() -> None:
    grid = time_grid(10, -1.0)
    assert grid[0] == 0 and abs(grid[-1] - 1) < 1e-6 and bool((grid.diff() > 0).all())
    torch.testing.assert_close(grid, 1 - torch.cos(torch.pi / 2 * torch.linspace(0, 1, 10)))
    assert ode_evaluations(10, "euler") == 9 and ode_evaluations(10, "rk4") == 36
    with pytest.raises(ValueError, match="non-increasing"):
        time_grid(10, 3.0)
    with pytest.raises(ValueError, match="unknown ODE method"):
        ode_evaluations(10, "midpoint")


# ----------------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------------


def stream(ours: DiT, inputs: dict, steps: int, method: str, pieces: int | None = None,
           **window: int) -> torch.Tensor:
    codes = inputs["codes"] if pieces is None else inputs["codes"].split(pieces, dim=1)
    chunks = list(sample_stream(ours, codes, inputs["reference"], inputs["speaker"], steps, method,
                                noise=inputs["noise"], **window))
    assert [c.shape[-1] for c in chunks] == [CONFIG.block_size] * (T // CONFIG.block_size)
    return torch.cat(chunks, dim=-1)


def whole(ours: DiT, inputs: dict, steps: int, method: str) -> torch.Tensor:
    return sample(ours, inputs["codes"], inputs["reference"], inputs["speaker"], steps, method,
                  noise=inputs["noise"])


@pytest.mark.parametrize("steps,method,pieces", [(3, "euler", 3), (2, "rk4", None)])
def test_stream_with_the_dependency_window_equals_whole_utterance(models: tuple, inputs: dict, steps: int,
                                                                    method: str, pieces: int | None) -> None:
    """E evaluations: chunk b depends on blocks b − 2E … b + E, and with those in its window it is exact."""
    _, ours = models
    past, future = exact_window(CONFIG, steps, method)
    assert (past, future) == (2 * ode_evaluations(steps, method), ode_evaluations(steps, method))
    assert past + 1 + future < T // CONFIG.block_size or method == "rk4"  # the windows really are partial
    expected = whole(ours, inputs, steps, method)
    torch.testing.assert_close(stream(ours, inputs, steps, method, pieces, past_blocks=past, future_blocks=future),
                               expected, **EXACT)
    if method == "euler":
        # One block less of look-ahead and it is no longer exact. (With RK4 the far end of the cone acts through
        # four evaluations in a row, each scaled by the step, and moves the chunk by only ~1e-5 here.)
        short = stream(ours, inputs, steps, method, pieces, past_blocks=past, future_blocks=future - 1)
        assert (short - expected).abs().max() > 1e-3


def test_default_window_one_evaluation_is_exact(models: tuple, inputs: dict) -> None:
    """[2 previous | current | 1 look-ahead] is one evaluation's reach: exact for a single Euler step."""
    _, ours = models
    torch.testing.assert_close(stream(ours, inputs, 2, "euler", pieces=5), whole(ours, inputs, 2, "euler"), **EXACT)


def test_default_window_approximates_whole_utterance(models: tuple, inputs: dict) -> None:
    """Qwen's setting (10 RK4 steps) on [2 previous | current | 1 look-ahead]: close, not exact (measured 0.013
    max abs on a mel of mean magnitude 1.2; without the look-ahead block 0.40, without the previous blocks 0.44)."""
    _, ours = models
    expected = whole(ours, inputs, 10, "rk4")
    error = (stream(ours, inputs, 10, "rk4", pieces=7) - expected).abs().max().item()
    assert error < 0.05, error
    no_look_ahead = (stream(ours, inputs, 10, "rk4", future_blocks=0) - expected).abs().max().item()
    assert no_look_ahead > 0.1, no_look_ahead


def test_stream_last_block_partial_and_noise_drawn_per_block(models: tuple, inputs: dict) -> None:
    _, ours = models
    codes = inputs["codes"][:, :13]  # 26 frames: 6 blocks of 4 and one of 2
    g = torch.Generator().manual_seed(5)
    chunks = list(sample_stream(ours, codes.split(4, dim=1), inputs["reference"], inputs["speaker"], 2, "euler",
                                generator=g))
    assert [c.shape[-1] for c in chunks] == [4] * 6 + [2]
    g = torch.Generator().manual_seed(5)
    noise = torch.cat([torch.randn(B, CONFIG.block_size, CONFIG.mel_dim, generator=g) for _ in range(7)], dim=1)
    expected = sample(ours, codes, inputs["reference"], inputs["speaker"], 2, "euler", noise=noise[:, :26])
    torch.testing.assert_close(torch.cat(chunks, dim=-1), expected, **EXACT)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def test_flow_matching_loss_is_the_straight_path_regression(models: tuple, inputs: dict) -> None:
    hf, ours = models
    mel = inputs["x"].transpose(1, 2)  # (B, mel_dim, T), a stand-in target
    time, noise = torch.tensor([0.2, 0.9]), inputs["noise"]
    x_t = (1 - time)[:, None, None] * noise + time[:, None, None] * inputs["x"]
    for drop_all, hf_drops in ((0.0, {}), (1.0, dict(drop_audio_conditioning=True, drop_code=True))):
        with torch.no_grad():
            loss = flow_matching_loss(ours, mel, inputs["codes"], inputs["reference"], inputs["speaker"],
                                      drop_reference_prob=0.0, drop_all_prob=drop_all, time=time, noise=noise)
        expected = (hf_velocity(hf, x_t, inputs, time, **hf_drops) - (inputs["x"] - noise)).pow(2).mean()
        torch.testing.assert_close(loss, expected, **TOL)


def test_a_few_training_steps_reduce_the_loss(inputs: dict) -> None:
    torch.manual_seed(0)
    dit = DiT(CONFIG)
    mel = torch.randn(B, CONFIG.mel_dim, T, generator=torch.Generator().manual_seed(7)).cumsum(-1) * 0.3
    args = (mel, inputs["codes"], inputs["reference"], inputs["speaker"])

    def held_out() -> float:
        dit.eval()
        with torch.no_grad():
            losses = [flow_matching_loss(dit, *args, torch.Generator().manual_seed(s)).item() for s in range(4)]
        dit.train()
        return sum(losses) / len(losses)

    before = held_out()
    optimizer = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(11)
    for _ in range(30):
        loss = flow_matching_loss(dit, *args, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out()
    assert after < 0.7 * before, (before, after)
