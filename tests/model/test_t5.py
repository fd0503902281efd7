"""T5 (v1.0 ReLU tied, v1.1 gated-GELU untied) against transformers: checkpoints both ways, generation with
the cache token for token (greedy and beam), and the cache against full recomputation."""

import pytest
import torch
import transformers

from omnilm.infer.generate import FINISHED
from omnilm.infer.sampling import SamplingParams
from omnilm.infer.seq2seq import seq2seq_beam_search, seq2seq_generate_ids
from omnilm.model.hf import CheckpointError
from omnilm.model.hf_t5 import load_t5, save_t5
from omnilm.model.t5 import T5, T5Config, relative_position_bucket

TOL = dict(atol=1e-4, rtol=0)
VARIANTS = {"v1.0": dict(ff_kind="relu", tie_embeddings=True), "v1.1": dict(ff_kind="gated-gelu",
                                                                             tie_embeddings=False)}


def small_t5(variant: str, seed: int = 0, decoder_layers: int = 3) -> T5:
    """Decoder deeper than the encoder where allowed (transformers' generate caches num_layers decoder layers)."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=90, d_model=32, head_dim=8, d_ff=48, n_layer=2, n_decoder_layer=decoder_layers,
                      n_head=4,
                      num_buckets=8, max_distance=20, **VARIANTS[variant])
    model = T5(config).eval()
    with torch.no_grad():  # a tied head mostly echoes the input token: larger residual updates make it vary
        for name, p in model.named_parameters():
            if config.tie_embeddings and name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(8)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 90, (3, 26), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 7:] = 0
    ids[mask == 0] = 0
    return ids, mask, torch.randint(2, 90, (3, 30), generator=g)


def test_bucket_agrees_with_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            expected = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_omnilm_t5_loads_in_transformers_with_same_logits(tmp_path, variant):
    model = small_t5(variant)
    save_t5(model, tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, dec = batch()
    with torch.no_grad():
        ours = model(ids, mask, dec)
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ours, **TOL)
        torch.testing.assert_close(load_t5(tmp_path)(ids, mask, dec), ours, atol=0, rtol=0)
    assert (hf.lm_head.weight is hf.shared.weight) == (variant == "v1.0")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_t5_loads_in_omnilm_with_same_logits(tmp_path, variant):
    torch.manual_seed(0)
    tied = variant == "v1.0"
    config = transformers.T5Config(vocab_size=90, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20, feed_forward_proj=VARIANTS[variant]["ff_kind"],
                                   tie_word_embeddings=tied)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    if not tied:  # transformers 5 ties every T5 head at init; a v1.1 checkpoint stores its own head
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))
        hf.config.tie_word_embeddings = False
    hf.save_pretrained(tmp_path)
    ours = load_t5(tmp_path)
    assert ours.config.tie_embeddings == tied and ours.config.scale_decoder_outputs == tied
    ids, mask, dec = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours(ids, mask, dec), expected, **TOL)


def test_cached_decoding_equals_full_recomputation():
    model = small_t5("v1.1")
    ids, mask, dec = batch()
    with torch.no_grad():
        full = model(ids, mask, dec)
        memory = model.encode(ids, mask)
        cache = model.new_cache(3, 40)
        steps = [model.decode(dec[:, :11], memory, mask, cache)]
        steps += [model.decode(dec[:, t:t + 1], memory, mask, cache) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=0)  # float32 sums in another order


def hf_generate(model: T5, tmp_path, prompt: list[int], **kwargs) -> list[int]:
    save_t5(model, tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    out = hf.generate(torch.tensor([prompt]), do_sample=False, **kwargs)[0, 1:].tolist()
    eos = model.config.eos_token_id
    return out[:out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_equals_transformers(tmp_path, variant):
    model = small_t5(variant, seed=1, decoder_layers=2)
    prompts = [[5, 17, 33, 2, 60, 9, 41], [70, 3, 3, 12]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    rows: list[list[int]] = [[], []]
    for step in seq2seq_generate_ids(model, prompts, params, [model.config.eos_token_id], pad_id=0):
        for r, token in enumerate(step.tolist()):
            if token != FINISHED:
                rows[r].append(token)
    for r, prompt in enumerate(prompts):
        assert rows[r] == hf_generate(model, tmp_path / str(r), prompt, max_new_tokens=12)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_beam_search_equals_transformers(tmp_path, variant):
    model = small_t5(variant, seed=2, decoder_layers=2)
    prompt = [8, 14, 61, 22, 5, 5, 77, 30]
    ours = seq2seq_beam_search(model, prompt, num_beams=3, max_new_tokens=10, eos_ids=[model.config.eos_token_id])
    assert ours == hf_generate(model, tmp_path, prompt, num_beams=3, max_new_tokens=10, early_stopping=False)


def test_unsupported_t5_activation_is_named(tmp_path):
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   feed_forward_proj="gated-silu")
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="gated-silu"):
        load_t5(tmp_path)
