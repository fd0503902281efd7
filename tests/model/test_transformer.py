import torch

from helpers import small_model
from omnilm.model import ModelConfig, Transformer


def test_kv_cache_decoding_equals_full_recomputation(family):
    model = small_model(family)
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :10], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 20)]
        steps.append(model(ids[:, 20:], cache=cache))  # a multi-token chunk after the cache is warm
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 24


def test_left_padded_batch_equals_each_sequence_alone(family):
    model = small_model(family)
    lengths = [9, 4, 12]
    seqs = [torch.randint(0, 320, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        # ... and with a KV cache, decoding two more tokens per row.
        cache = model.new_cache(3, width + 2)
        model(ids, attention_mask=mask, cache=cache)
        extra = torch.randint(0, 320, (3, 2))
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        step1 = model(extra[:, :1], attention_mask=mask2, cache=cache)
        step2 = model(extra[:, 1:], attention_mask=torch.cat([mask2, torch.ones(3, 1, dtype=torch.long)], 1),
                      cache=cache)
        for row, seq in enumerate(seqs):
            alone = model(torch.cat([seq, extra[row]])[None])
            torch.testing.assert_close(batched[row, width - len(seq):], alone[0, :len(seq)], atol=1e-5, rtol=0)
            torch.testing.assert_close(step1[row, 0], alone[0, len(seq)], atol=1e-5, rtol=0)
            torch.testing.assert_close(step2[row, 0], alone[0, len(seq) + 1], atol=1e-5, rtol=0)


def test_attention_is_causal(family):
    model = small_model(family)
    ids = torch.randint(0, 320, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 320
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    """A GQA model and the MHA model whose K/V heads are copies give identical outputs."""
    gqa = small_model("llama", n_kv_head=2)
    mha = small_model("llama", n_kv_head=4)
    state = gqa.state_dict()
    hd = gqa.config.dim_per_head
    for i in range(gqa.config.n_layer):
        for name in ("k_proj", "v_proj"):
            w = state[f"blocks.{i}.attn.{name}.weight"].view(2, hd, -1)
            state[f"blocks.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=0)


def test_tied_embeddings_share_storage_and_last_only():
    model = Transformer(ModelConfig(family="qwen2", vocab_size=100, n_layer=1, n_head=2, d_model=32))
    assert model.lm_head.weight is model.tok_emb.weight
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:])
