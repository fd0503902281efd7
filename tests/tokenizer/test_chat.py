"""The ChatML format: template vs Python twin, ids vs transformers, the assistant mask, validation."""

import jinja2
import pytest
from transformers import AutoTokenizer

from omnilm.errors import UserError
from omnilm.tokenizer import CHAT_TEMPLATE, encode_chat, format_chat, train_bpe, validate_messages
from omnilm.tokenizer.chat import IM_END, IM_START

SINGLE = [{"role": "user", "content": "Where was Alice born?"},
          {"role": "assistant", "content": "Alice was born in Lyon."}]
MULTI = [{"role": "system", "content": "Answer briefly. Emoji allowed 🙂."},
         {"role": "user", "content": "Who is Bob?"},
         {"role": "assistant", "content": "Bob Lindqvist, born in Uppsala."},
         {"role": "user", "content": "And café, naïve, 東京?"},
         {"role": "assistant", "content": " Words with accents: café!\n  Indented line. 12345"}]
USER_ONLY = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"}]
CASES = {"single": SINGLE, "multi": MULTI, "user-only": USER_ONLY}


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer.save(folder)
    return AutoTokenizer.from_pretrained(folder)


def hf_chat_ids(hf_tokenizer, messages, add_generation_prompt):
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding here, 4.x a plain list
    return list(out if isinstance(out, list) else out["input_ids"])


def render_template(messages, add_generation_prompt):
    # the environment options transformers renders chat templates with
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_format_chat_is_the_template(name, gen, hf_tokenizer):
    messages = CASES[name]
    text = format_chat(messages, add_generation_prompt=gen)
    assert text == render_template(messages, gen)
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert text == expected + ("<|im_start|>assistant\n" if gen else "")


def test_saved_folder_carries_the_template(tokenizer, tmp_path):
    import json

    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_ids_match_transformers(name, gen, tokenizer, hf_tokenizer):
    messages = CASES[name]
    ids, mask = encode_chat(tokenizer, messages, add_generation_prompt=gen)
    assert ids == hf_chat_ids(hf_tokenizer, messages, gen)
    assert ids == tokenizer.encode(format_chat(messages, add_generation_prompt=gen))
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    assert tokenizer.decode(ids) == format_chat(messages, add_generation_prompt=gen)


def segment_mask(tokenizer, messages, add_generation_prompt):
    """Ids and mask built turn by turn: header tokens 0, content and <|im_end|> 1 for the assistant.

    Special tokens cut pre-tokenisation, and none of these contents starts with a newline that could merge
    with the header's, so the segments' ids concatenate to the whole text's ids (asserted by the caller).
    """
    ids, mask = [], []
    for m in messages:
        header = tokenizer.encode(f"{IM_START}{m['role']}\n")
        body = tokenizer.encode(m["content"]) + tokenizer.encode(IM_END)
        trained = int(m["role"] == "assistant")
        ids += header + body + tokenizer.encode("\n")
        mask += [0] * len(header) + [trained] * len(body) + [0]
    if add_generation_prompt:
        header = tokenizer.encode(f"{IM_START}assistant\n")
        ids += header
        mask += [0] * len(header)
    return ids, mask


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_mask_covers_exactly_the_assistant_replies(name, gen, tokenizer):
    messages = CASES[name]
    ids, mask = encode_chat(tokenizer, messages, add_generation_prompt=gen)
    expected_ids, expected_mask = segment_mask(tokenizer, messages, gen)
    assert ids == expected_ids
    assert mask == expected_mask
    masked = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert masked == "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")
    im_end = tokenizer.token_to_id(IM_END)
    assistant_turns = sum(m["role"] == "assistant" for m in messages)
    assert sum(1 for i, m in zip(ids, mask, strict=True) if m and i == im_end) == assistant_turns


def test_reply_opening_with_newlines_merged_into_the_header(tmp_path):
    # A tokenizer that has learnt merges of consecutive newlines: the header's newline and the reply's
    # leading newlines form one token, which does not lie inside the reply and so is not trained.
    tokenizer = train_bpe(["Title\n\n\nBody text here.\n\n\nMore text.\n\nEnd."] * 20, vocab_size=300)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nBody text."}]
    tokenizer.save(tmp_path)
    ids, mask = encode_chat(tokenizer, messages)
    assert ids == hf_chat_ids(AutoTokenizer.from_pretrained(tmp_path), messages, False)
    tokens = [tokenizer.decode([i]) for i in ids]
    straddling = tokens.index("\n\n\n")
    assert tokenizer.decode(ids[:straddling]).endswith(f"{IM_START}assistant") and mask[straddling] == 0
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Body text." + IM_END


@pytest.mark.parametrize(("messages", "problem"), [
    ({"role": "user", "content": "x"}, "non-empty list"),
    ([], "non-empty list"),
    (["hello"], "message 0: expected an object"),
    ([{"content": "x"}], "message 0: missing role"),
    ([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}], "message 1: unknown role 'robot'"),
    ([{"role": "user"}], "message 0: missing content"),
    ([{"role": "user", "content": None}], "message 0: missing content"),
    ([{"role": "user", "content": ""}], "message 0: empty content"),
    ([{"role": "user", "content": ["x"]}], "message 0: content must be a string, got list"),
])
def test_validation_names_the_problem_and_the_place(messages, problem, tokenizer):
    with pytest.raises(UserError) as err:
        validate_messages(messages, where="data.jsonl:7")
    assert str(err.value).startswith("data.jsonl:7: ") and problem in str(err.value)
    with pytest.raises(UserError, match="message|list"):
        encode_chat(tokenizer, messages)


def test_valid_messages_pass_unchanged():
    assert validate_messages(MULTI) == MULTI
    assert str(pytest.raises(UserError, validate_messages, []).value).startswith("messages must")
