"""Long-context attention against transformers: RoPE scaling (linear, dynamic NTK, YaRN, Llama-3) beyond the
trained context, sliding windows (Mistral, Qwen2), and the rolling / attention-sink KV cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from helpers import small_model
from omnilm.config import ConfigError
from omnilm.model import ModelConfig
from omnilm.model.attention import RollingKVCache, rope_inv_freq
from omnilm.model.hf import load_pretrained, save_pretrained

TOL = dict(atol=1e-4, rtol=0)
TRAINED = 32  # max_position_embeddings of the tiny checkpoints; the tests run past it
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16,
                    "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


def hf_config(family: str, scaling: dict | None = None, **extra: object):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    rope = {"rope_type": "default", "rope_theta": 10000.0} | (scaling or {})
    return cls(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=TRAINED, rope_parameters=rope,
               tie_word_embeddings=False, **extra)


def random_hf(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for name, param in model.named_parameters():
        if name.endswith("proj.bias"):  # zero at init: make Qwen2's QKV biases count
            torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_inverse_frequencies_equal_transformers(name):
    scaling = SCALINGS[name]
    config = hf_config("llama", scaling)
    for seq_len in (None, 20, 100):  # dynamic NTK grows its base past the trained length
        expected, attention = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)
        ours, ours_attention = rope_inv_freq(16, 10000.0, dict(scaling), TRAINED, seq_len)
        torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)
        assert ours_attention == pytest.approx(attention)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_scaled_checkpoint_loads_with_logit_parity_beyond_the_context(tmp_path, family, name):
    hf_model = random_hf(hf_config(family, SCALINGS[name]))
    hf_model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == SCALINGS[name]["rope_type"]
    ids = torch.randint(0, 300, (2, 3 * TRAINED))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_model(ids).logits, **TOL)


@pytest.mark.parametrize("name", ["linear", "yarn", "llama3"])
def test_scaled_omnilm_model_loads_in_transformers(tmp_path, name):
    model = small_model("llama", max_seq_len=TRAINED, rope_scaling=SCALINGS[name], init_std=0.05)
    save_pretrained(model, tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 320, (1, 3 * TRAINED))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, **TOL)


def test_scaling_changes_logits_only_where_it_should():
    plain = small_model("llama", max_seq_len=TRAINED)
    dynamic = small_model("llama", max_seq_len=TRAINED, rope_scaling=SCALINGS["dynamic"])
    ids = torch.randint(0, 320, (1, TRAINED))
    with torch.no_grad():  # dynamic NTK is the identity up to the trained length
        torch.testing.assert_close(plain(ids), dynamic(ids), atol=0, rtol=0)
        longer = torch.randint(0, 320, (1, 2 * TRAINED))
        assert not torch.allclose(plain(longer), dynamic(longer))


def test_bad_rope_scaling_is_a_config_error():
    with pytest.raises(ConfigError, match="rope_type"):
        ModelConfig(rope_scaling={"rope_type": "longest", "factor": 2})
    with pytest.raises(ConfigError, match="missing"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2})
    with pytest.raises(ConfigError, match="rotary"):
        ModelConfig(family="gpt2", rope_scaling={"rope_type": "linear", "factor": 2})


# ---------------------------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_checkpoint_parity_both_ways(tmp_path, kind):
    extra = {"sliding_window": 8}
    if kind == "qwen2":
        extra |= {"use_sliding_window": True, "max_window_layers": 1}  # layer 0 full, layer 1 windowed
    hf_model = random_hf(hf_config(kind, **extra))
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.sliding_window == 8
    assert ours.config.window_from_layer == (1 if kind == "qwen2" else 0)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        expected = hf_model(ids).logits
        torch.testing.assert_close(ours(ids), expected, **TOL)
        full = small_model("llama") if kind == "mistral" else None
    save_pretrained(ours, tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(again).__name__ == type(hf_model).__name__
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, **TOL)
    assert full is None or full.config.sliding_window is None


def test_rolling_cache_decodes_a_sliding_window_model_like_a_full_forward():
    model = small_model("llama", sliding_window=6)
    ids = torch.randint(0, 320, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    with torch.no_grad():
        expected = model(ids, mask)
        cache = model.new_cache(2, rolling=True)
        assert isinstance(cache, RollingKVCache)
        steps = [model(ids[:, :10], mask[:, :10], cache=cache)]
        for t in range(10, 30):
            steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache))
            assert cache.kept <= 6
    got = torch.cat(steps, dim=1)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, 5:], expected[1, 5:], **TOL)


# ---------------------------------------------------------------------------------------------- attention sinks


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_attention_sinks_equal_a_fresh_pass_over_the_kept_tokens(family):
    # With one layer the keys/values of a token do not depend on its context, so after evictions the streaming
    # logits must equal a fresh forward over (sinks + window + new token) at positions 0..n: this checks the
    # eviction and the RoPE re-rotation of the kept keys.
    model = small_model(family, n_layer=1)
    sinks, window = 3, 5
    ids = torch.randint(0, 320, (1, 40))
    cache = model.new_cache(1, sinks=sinks, window=window)
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        for t in range(4, 40):
            streamed = model(ids[:, t:t + 1], cache=cache)[:, -1]
            kept = torch.cat([ids[:, :sinks], ids[:, max(sinks, t - window):t + 1]], dim=1)
            torch.testing.assert_close(streamed, model(kept)[:, -1], **TOL)
            assert cache.kept <= sinks + window and cache.length == cache.kept


def test_attention_sinks_match_a_full_cache_before_the_first_eviction_and_refuse_padding():
    model = small_model("qwen2")
    ids = torch.randint(0, 320, (1, 12))
    cache = model.new_cache(1, sinks=4, window=20)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cache=cache), model(ids), **TOL)
        with pytest.raises(ValueError, match="unpadded"):
            model(ids[:, :1], torch.tensor([[0] + [1] * 12]), cache=cache)


# ---------------------------------------------------------------------------------------------- ALiBi (BLOOM)


@pytest.mark.parametrize("n_head", [4, 6])  # 6: not a power of two, BLOOM's interleaved extra slopes
def test_alibi_slopes_equal_bloom(n_head):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from omnilm.model.attention import alibi_slopes

    torch.testing.assert_close(alibi_slopes(n_head), _get_alibi_slopes(n_head, "cpu"), atol=0, rtol=1e-6)


@pytest.mark.parametrize("n_head", [4, 6])
def test_bloom_checkpoint_parity_both_ways_with_padding_and_cache(tmp_path, n_head):
    from transformers import BloomConfig

    config = BloomConfig(vocab_size=300, hidden_size=48, n_layer=2, n_head=n_head, initializer_range=0.2)
    hf_model = random_hf(config)
    for name, param in hf_model.named_parameters():
        if name.endswith("bias") or "layernorm" in name:  # make biases and norm affines count
            torch.nn.init.normal_(param, mean=1.0 if "layernorm.weight" in name else 0.0, std=0.3)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.alibi and ours.config.embedding_norm and ours.pos_emb is None
    ids = torch.randint(0, 300, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask).logits
        got = ours(ids, mask)
        torch.testing.assert_close(got[0], expected[0], **TOL)
        torch.testing.assert_close(got[1, 6:], expected[1, 6:], **TOL)
        cache = ours.new_cache(2, 24)  # incremental decoding: the biases follow the cached key positions
        steps = [ours(ids[:, :10], mask[:, :10], cache=cache)]
        steps += [ours(ids[:, t:t + 1], mask[:, :t + 1], cache=cache) for t in range(10, 24)]
        stepped = torch.cat(steps, dim=1)
        torch.testing.assert_close(stepped[0], expected[0], **TOL)
        torch.testing.assert_close(stepped[1, 6:], expected[1, 6:], **TOL)
    save_pretrained(ours, tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == "BloomForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(again(ids[:1]).logits, expected[:1], **TOL)
