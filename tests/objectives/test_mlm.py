"""BERT masking rates, whole-word masking and the ELECTRA loss."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.model.encoder import EncoderConfig, EncoderForMaskedLM, EncoderForTokenDetection
from omnilm.objectives.lm import IGNORE_INDEX
from omnilm.objectives.mlm import MaskingConfig, electra_step, mask_tokens, mlm_loss, word_ids

MASK, VOCAB = 3, 1000


def test_rates_are_15_percent_and_80_10_10():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, VOCAB, (64, 512), generator=g)
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    inputs, labels = mask_tokens(tokens, MaskingConfig(), MASK, VOCAB, maskable, g)
    selected = labels != IGNORE_INDEX
    assert abs(selected.float().mean().item() - 0.15) < 0.005
    n = selected.sum().item()
    as_mask = (inputs[selected] == MASK).sum().item() / n
    unchanged = (inputs[selected] == tokens[selected]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.01 and abs(unchanged - (0.1 + 0.1 / VOCAB)) < 0.01
    assert torch.equal(inputs[~selected], tokens[~selected]) and torch.equal(labels[selected], tokens[selected])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 4), width=st.integers(2, 60))
def test_whole_words_share_selection_and_specials_are_never_selected(seed, rows, width):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, VOCAB, (rows, width), generator=g)
    word_start = torch.rand(rows, width, generator=g) < 0.4
    maskable = torch.rand(rows, width, generator=g) < 0.9
    config = MaskingConfig(mask_prob=0.5, whole_word=True)
    mask_id = VOCAB  # outside the random-replacement range, so a random token never looks like a mask
    inputs, labels = mask_tokens(tokens, config, mask_id, VOCAB, maskable, g, word_start)
    ids = word_ids(word_start)
    selected = labels != IGNORE_INDEX
    assert not bool((selected & ~maskable).any())
    for r in range(rows):
        for w in ids[r].unique():
            inside = (ids[r] == w) & maskable[r]
            assert selected[r][inside].all() or not selected[r][inside].any()
            assert len(set((inputs[r][inside & selected[r]] == mask_id).tolist())) <= 1


def test_mlm_loss_counts_selected_positions_only():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 4] = 3, 6
    expected = torch.nn.functional.cross_entropy(torch.stack([logits[0, 1], logits[1, 4]]), torch.tensor([3, 6]))
    torch.testing.assert_close(mlm_loss(logits, labels), expected)
    assert mlm_loss(logits, torch.full((2, 5), IGNORE_INDEX)).item() == 0.0


def test_electra_step_labels_replacements_and_trains_both():
    torch.manual_seed(0)
    disc = EncoderForTokenDetection(EncoderConfig(family="electra", vocab_size=50, n_layer=1, n_head=2, d_model=16,
                                                  embedding_size=8, max_seq_len=16))
    gen = EncoderForMaskedLM(EncoderConfig(family="electra", vocab_size=50, n_layer=1, n_head=1, d_model=8,
                                           embedding_size=8, max_seq_len=16))
    tokens = torch.randint(5, 50, (4, 12))
    inputs, labels = mask_tokens(tokens, MaskingConfig(mask_prob=0.3), 3, 50, torch.ones_like(tokens).bool())
    loss, logs = electra_step(gen, disc, inputs, labels, torch.ones_like(tokens), disc_weight=50.0)
    loss.backward()
    assert gen.encoder.blocks[0].up_proj.weight.grad.abs().sum() > 0
    assert disc.encoder.blocks[0].up_proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(loss.item(), logs["gen_loss"] + 50 * logs["disc_loss"], atol=1e-4, rtol=1e-5)
    assert 0 < logs["replaced_frac"] <= 0.3 + 0.2
