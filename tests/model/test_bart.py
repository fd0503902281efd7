"""BART against transformers: checkpoints both ways with padded encoder inputs, cache against recomputation."""

import pytest
import torch
import transformers

from omnilm.infer.seq2seq import seq2seq_beam_search
from omnilm.model.bart import Bart, BartConfig
from omnilm.model.hf import CheckpointError
from omnilm.model.hf_bart import load_bart, save_bart

TOL = dict(atol=1e-4, rtol=0)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 90, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    ids[mask == 0] = 1
    return ids, mask, torch.randint(3, 90, (3, 18), generator=g)


def small_bart(scale_embedding: bool = False) -> Bart:
    torch.manual_seed(0)
    model = Bart(BartConfig(vocab_size=90, d_model=32, n_layer=2, n_decoder_layer=3, n_head=4, d_ff=40,
                            max_seq_len=40, scale_embedding=scale_embedding, init_std=0.1)).eval()
    with torch.no_grad():  # initialisation leaves biases at 0 and norms at 1: make swapped names visible
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        model.final_logits_bias.normal_()
    return model


@pytest.mark.parametrize("scale_embedding", [False, True])
def test_omnilm_bart_loads_in_transformers_with_same_logits(tmp_path, scale_embedding):
    model = small_bart(scale_embedding)
    save_bart(model, tmp_path)
    hf = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, dec = batch()
    with torch.no_grad():
        ours = model(ids, mask, dec)
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ours, **TOL)
        torch.testing.assert_close(load_bart(tmp_path)(ids, mask, dec), ours, atol=0, rtol=0)


def test_transformers_bart_loads_in_omnilm_with_same_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=90, d_model=32, encoder_layers=2, decoder_layers=3,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40,
                                     decoder_ffn_dim=40, max_position_embeddings=40, init_std=0.1)
    hf = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        hf.final_logits_bias.normal_()
    hf.save_pretrained(tmp_path)
    ours = load_bart(tmp_path)
    ids, mask, dec = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours(ids, mask, dec), expected, **TOL)


def test_cached_decoding_equals_full_recomputation():
    model = small_bart()
    ids, mask, dec = batch()
    with torch.no_grad():
        full = model(ids, mask, dec)
        memory = model.encode(ids, mask)
        cache = model.new_cache(3, 30)
        steps = [model.decode(dec[:, :5], memory, mask, cache)]
        steps += [model.decode(dec[:, t:t + 1], memory, mask, cache) for t in range(5, 18)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_beam_search_equals_transformers(tmp_path):
    model = small_bart()
    save_bart(model, tmp_path)
    hf = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    prompt = [0, 14, 61, 22, 5, 77, 30, 2]
    # forced_eos/min_length off: plain beam search, as omnilm runs it
    expected = hf.generate(torch.tensor([prompt]), num_beams=3, max_new_tokens=10, do_sample=False,
                           early_stopping=False, forced_eos_token_id=None, forced_bos_token_id=None,
                           min_length=0, no_repeat_ngram_size=0)[0, 1:].tolist()
    ours = seq2seq_beam_search(model, prompt, 3, 10, eos_ids=[2], pad_id=1)
    assert ours == (expected[:expected.index(2) + 1] if 2 in expected else expected)


def test_unsupported_bart_variant_is_named(tmp_path):
    config = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=20, activation_function="relu")
    transformers.BartForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="relu"):
        load_bart(tmp_path)
