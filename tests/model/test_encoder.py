"""BERT/ELECTRA encoders against transformers: both checkpoint directions, with padding, every head."""

import pytest
import torch
import transformers

from omnilm.model.encoder import (
    EncoderConfig,
    EncoderForMaskedLM,
    EncoderForPreTraining,
    EncoderForSequenceClassification,
    EncoderForTokenDetection,
)
from omnilm.model.hf import CheckpointError
from omnilm.model.hf_encoder import load_encoder, save_encoder

TOL = dict(atol=1e-4, rtol=0)

HF_CLASSES = {
    "BertForMaskedLM": (transformers.BertConfig, "mlm"),
    "BertForSequenceClassification": (transformers.BertConfig, "classify"),
    "ElectraForMaskedLM": (transformers.ElectraConfig, "mlm"),
    "ElectraForPreTraining": (transformers.ElectraConfig, "rtd"),
    "ElectraForSequenceClassification": (transformers.ElectraConfig, "classify"),
}


def hf_config(arch: str, embedding_size: int = 24) -> transformers.PretrainedConfig:
    cls, _ = HF_CLASSES[arch]
    extra = {"embedding_size": embedding_size} if cls is transformers.ElectraConfig else {}
    return cls(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=40, type_vocab_size=2, num_labels=3, **extra)


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding, as encoders are fed
    mask[2, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    return ids, mask, types


def perturb(model: torch.nn.Module) -> None:
    """Random biases and norms (initialisation leaves them at 0/1, which would hide swapped names)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def compare(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> None:
    if ours.dim() >= 2 and ours.shape[:2] == mask.shape:  # per-token outputs: padding positions are undefined
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("arch", sorted(HF_CLASSES))
def test_transformers_encoder_loads_with_same_logits(tmp_path, arch):
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(hf_config(arch)).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = load_encoder(tmp_path)
    assert ours.config.family == ("bert" if arch.startswith("Bert") else "electra")
    ids, mask, types = inputs()
    with torch.no_grad():
        compare(ours(ids, mask, types), hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, mask)


@pytest.mark.parametrize("cls, family, embedding_size", [
    (EncoderForMaskedLM, "bert", None), (EncoderForSequenceClassification, "bert", None),
    (EncoderForMaskedLM, "electra", 16), (EncoderForTokenDetection, "electra", 16),
    (EncoderForTokenDetection, "electra", None), (EncoderForSequenceClassification, "electra", 16)])
def test_omnilm_encoder_loads_in_transformers_with_same_logits(tmp_path, cls, family, embedding_size):
    torch.manual_seed(0)
    config = EncoderConfig(family=family, vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=48,
                           embedding_size=embedding_size, max_seq_len=40, num_labels=3, init_std=0.1)
    model = cls(config).eval()
    perturb(model)
    save_encoder(model, tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path).architectures[0]
    hf_model = getattr(transformers, hf).from_pretrained(tmp_path).eval()
    ids, mask, types = inputs()
    with torch.no_grad():
        ours = model(ids, mask, types)
        compare(ours, hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, mask)
        reloaded = load_encoder(tmp_path)
        for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), name  # the weights round-trip exactly; kernels may not (see test_speech)
        torch.testing.assert_close(reloaded(ids, mask, types), ours, atol=1e-6, rtol=1e-5)


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = EncoderForMaskedLM(EncoderConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=32)).eval()
    ids = torch.randint(0, 50, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask)[:, :9], model(ids), atol=1e-5, rtol=0)


def test_mlm_checkpoint_fine_tunes_with_a_fresh_classifier(tmp_path):
    torch.manual_seed(0)
    mlm = EncoderForMaskedLM(EncoderConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=32))
    save_encoder(mlm, tmp_path)
    clf = load_encoder(tmp_path, head="classify", num_labels=5)
    assert isinstance(clf, EncoderForSequenceClassification) and clf.classifier.out_features == 5
    torch.testing.assert_close(clf.encoder.tok_emb.weight, mlm.encoder.tok_emb.weight)


def test_electra_discriminator_fine_tunes_through_electras_head(tmp_path):
    torch.manual_seed(0)
    config = EncoderConfig(family="electra", vocab_size=50, n_layer=1, n_head=2, d_model=16, embedding_size=8,
                           max_seq_len=32)
    disc = EncoderForTokenDetection(config)
    save_encoder(disc, tmp_path / "disc")
    clf = load_encoder(tmp_path / "disc", head="classify", num_labels=4)
    assert clf.config.family == "electra" and clf.out.out_features == 4 and not hasattr(clf, "pooler")
    torch.testing.assert_close(clf.encoder.emb_proj.weight, disc.encoder.emb_proj.weight)
    save_encoder(clf, tmp_path / "clf")
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "clf")
    assert hf.architectures == ["ElectraForSequenceClassification"] and hf.num_labels == 4


def test_unsupported_encoder_config_is_named(tmp_path):
    config = hf_config("BertForMaskedLM")
    config.hidden_act = "relu"
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="relu"):
        load_encoder(tmp_path)


def test_bert_pretraining_heads_match_transformers_both_ways(tmp_path):
    """BertForPreTraining: masked-LM and next-sentence logits, loaded from transformers and saved back."""
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(hf_config("BertForMaskedLM")).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_encoder(tmp_path / "hf")
    assert isinstance(ours, EncoderForPreTraining)
    ids, mask, types = inputs()
    with torch.no_grad():
        mlm, nsp = ours(ids, mask, types)
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        compare(mlm, expected.prediction_logits, mask)
        torch.testing.assert_close(nsp, expected.seq_relationship_logits, **TOL)
    save_encoder(ours, tmp_path / "ours")
    back = transformers.BertForPreTraining.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask, token_type_ids=types)
    compare(mlm, again.prediction_logits, mask)
    torch.testing.assert_close(nsp, again.seq_relationship_logits, **TOL)
    # The folder also loads as a plain masked LM (the encoder kept).
    plain = load_encoder(tmp_path / "hf", head="mlm")
    assert isinstance(plain, EncoderForMaskedLM)
    torch.testing.assert_close(plain.encoder.tok_emb.weight, ours.encoder.tok_emb.weight)
