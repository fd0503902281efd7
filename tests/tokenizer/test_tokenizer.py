from transformers import AutoTokenizer

from omnilm.tokenizer import SPECIAL_TOKENS, Tokenizer


def test_special_tokens_and_round_trip(tokenizer, tmp_path):
    for token in SPECIAL_TOKENS:
        assert tokenizer.token_to_id(token) is not None
    text = "Ünïcödé ✓ 🙂 \u200b tabs\tand\nnewlines <|im_start|>user"
    ids = tokenizer.encode(text)
    assert tokenizer.token_to_id("<|im_start|>") in ids
    assert tokenizer.decode(ids) == text
    tokenizer.save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode(text) == ids and loaded.eos_id == tokenizer.eos_id and loaded.pad_id == tokenizer.pad_id
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == ids


def test_missing_tokenizer_file(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
