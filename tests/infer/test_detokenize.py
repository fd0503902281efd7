import pytest

from omnilm.infer.detokenize import REPLACEMENT_CHAR, StreamingDecoder


def stream(decoder: StreamingDecoder, ids: list[int]) -> list[str]:
    pieces = []
    for token in ids:
        pieces.append(decoder.push(token))
        if decoder.stopped:
            break
    pieces.append(decoder.finish())
    return pieces


@pytest.mark.parametrize("text", ["Alice was born in Lyon.", "東京 🙂🚀 café", "a\n\tb  c"])
def test_deltas_join_to_the_full_decode_and_never_show_partial_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    # Byte-level BPE splits rare characters into several tokens; at least one test text must do so.
    pieces = stream(StreamingDecoder(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


def test_multibyte_characters_span_several_tokens(tokenizer):
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1 and REPLACEMENT_CHAR in tokenizer.decode(ids[:1])


def test_stop_string_cuts_the_output_and_its_prefix_is_held_back(tokenizer):
    text = "Alice was born in Lyon. Bob was born in Uppsala."
    ids = tokenizer.encode(text)
    decoder = StreamingDecoder(tokenizer, stop=["Bob was", "never"])
    pieces = stream(decoder, ids)
    assert decoder.stopped and "".join(pieces) == "Alice was born in Lyon. "
    # Nothing emitted may later turn out to be part of the stop string.
    assert not any("Bob" in p for p in pieces)


def test_prefix_of_a_stop_string_is_released_when_the_stop_does_not_follow(tokenizer):
    ids = tokenizer.encode("the lazy dog")
    decoder = StreamingDecoder(tokenizer, stop=["the lazy cat"])
    assert "".join(stream(decoder, ids)) == "the lazy dog" and not decoder.stopped
