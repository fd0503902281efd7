"""Tool calls over the chat API: parsing the model's replies (property tests), and a server over a tiny model that
has learnt a handful of replies by heart (a call, a malformed call, text, text then a call), driven by the
official openai client, whole and streamed."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import small_model
from live_server import InProcess
from omnilm.model.hf import save_pretrained
from omnilm.serve.tools import ToolRequest, ToolStream, parse_reply, reply_message
from omnilm.tokenizer import encode_chat, format_chat, train_bpe
from omnilm.tokenizer.chat import format_tool_call

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
TOOLS = [CALCULATOR]
NAMES = frozenset({"calculator", "clock"})
MALFORMED = '<tool_call>\n{"name": "calculator", "arguments": {"expression": 12 *}\n</tool_call>'


def call(expression: str) -> dict:
    return {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}


ASK = [{"role": "user", "content": "What is 12 * 34?"}]
CALLED = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call("12 * 34")]}]
ANSWERED = [*CALLED, {"role": "tool", "content": "408"}, {"role": "assistant", "content": "The answer is 408."}]
BROKEN = [{"role": "user", "content": "Break it"}, {"role": "assistant", "content": MALFORMED}]
HELLO = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there."}]
MIXED = [{"role": "user", "content": "Compute 2 + 2"},
         {"role": "assistant", "content": "Let me compute.", "tool_calls": [call("2 + 2")]}]
LEARNT = [CALLED, ANSWERED, BROKEN, HELLO, MIXED]


# --- parsing ------------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3), max_leaves=10)
arguments = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@settings(max_examples=200, deadline=None)
@given(arguments, st.sampled_from(sorted(NAMES)), st.text(max_size=20), st.booleans())
def test_any_json_arguments_round_trip(args, name, content, as_text):
    text = (content + "\n" if content.strip() else "") + format_tool_call(name, json.dumps(args) if as_text else args)
    if "<tool_call>" in content:
        return
    parsed_content, calls = parse_reply(text, NAMES)
    assert parsed_content == (content.rstrip() or None)
    assert [c["function"]["name"] for c in calls] == [name]
    assert json.loads(calls[0]["function"]["arguments"]) == args


@settings(max_examples=200, deadline=None)
@given(arguments, st.data())
def test_a_cut_or_broken_call_is_text(args, data):
    whole = format_tool_call("calculator", args)
    cut = whole[: data.draw(st.integers(0, len(whole) - 1))]
    assert parse_reply(cut, NAMES) is None
    assert parse_reply(whole + " and more", NAMES) is None  # text after a call
    assert parse_reply(format_tool_call("unknown", args), NAMES) is None
    message, finish = reply_message(ToolRequest([], NAMES), cut, "stop")
    assert message == {"role": "assistant", "content": cut} and finish == "stop"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.one_of(st.none(), arguments), st.data())
def test_streaming_in_any_pieces_matches_the_whole_reply(content, args, data):
    text = content if args is None else (content + "\n" if content.strip() else "") + format_tool_call(
        "calculator", args)
    request = ToolRequest([], NAMES)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    stream, sent = ToolStream(request), ""
    for lo, hi in zip([0, *cuts], [*cuts, len(text)], strict=True):
        sent += stream.feed(text[lo:hi]) or ""
    deltas, finish = stream.finish("stop")
    sent += "".join(d.get("content", "") for d in deltas)
    arguments_text = "".join(c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", ()))
    message, whole_finish = reply_message(request, text, "stop")
    assert finish == whole_finish
    assert sent == (message["content"] or "")
    if "tool_calls" in message:
        assert arguments_text == message["tool_calls"][0]["function"]["arguments"]


# --- the server ---------------------------------------------------------------------------------------------

def memorise(model: torch.nn.Module, tokenizer, conversations: list[list[dict]], steps: int = 400) -> None:
    """Train ``model`` on the assistant tokens of ``conversations`` until it writes them back (greedy)."""
    encoded = [encode_chat(tokenizer, c, tools=TOOLS) for c in conversations]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for ids, mask in encoded:
            x = torch.tensor([ids])
            logits = model(x[:, :-1])[0]
            weights = torch.tensor(mask[1:], dtype=torch.float)
            losses = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
            loss = loss + (losses * weights).sum() / weights.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if loss.item() < 0.01 * len(encoded):
            break
    model.eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    texts = [format_chat(c, tools=TOOLS) for c in LEARNT] + [format_chat(c) for c in LEARNT]
    tokenizer = train_bpe(texts * 20, vocab_size=400)
    model = small_model("llama", vocab_size=tokenizer.vocab_size, max_seq_len=512,
                        eos_token_id=tokenizer.eos_id)
    memorise(model, tokenizer, LEARNT)
    folder = save_pretrained(model, tmp_path_factory.mktemp("tools") / "tool-model", tokenizer=tokenizer)
    running = InProcess(folder, engine_process=False)
    running.folder = folder
    yield running
    running.stop()


def client(server: InProcess):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def chat(server: InProcess, messages: list[dict], **extra) -> tuple:
    """The whole reply and the streamed one (accumulated as a client would), each as (content, calls, finish)."""
    whole = client(server).chat.completions.create(model="tool-model", messages=messages, tools=TOOLS,
                                                   temperature=0, max_tokens=64, **extra)
    choice = whole.choices[0]
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or ()]
    content, pieces, ids, finish = "", {}, {}, None
    for chunk in client(server).chat.completions.create(model="tool-model", messages=messages, tools=TOOLS,
                                                        temperature=0, max_tokens=64, stream=True, **extra):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or ():
            if piece.id is not None:
                ids[piece.index] = piece.id
                pieces[piece.index] = [piece.function.name, ""]
            pieces[piece.index][1] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    streamed = (content or None, [(name, json.loads(args)) for name, args in pieces.values()], finish)
    assert all(i.startswith("call_") for i in ids.values())
    return (choice.message.content, calls, choice.finish_reason), streamed, whole


def test_a_call_round_trips_through_the_openai_client(server):
    whole, streamed, response = chat(server, ASK)
    assert whole == streamed == (None, [("calculator", {"expression": "12 * 34"})], "tool_calls")
    # The client's own message goes back with the tool's result; the model answers from it.
    returned = response.choices[0].message.model_dump(exclude_none=True)
    follow = [*ASK, returned, {"role": "tool", "tool_call_id": returned["tool_calls"][0]["id"], "content": "408"}]
    whole, streamed, _ = chat(server, follow)
    assert whole == streamed == ("The answer is 408.", [], "stop")


def test_text_then_a_call_and_plain_text(server):
    mixed, streamed, _ = chat(server, MIXED[:1])
    assert mixed == streamed == ("Let me compute.", [("calculator", {"expression": "2 + 2"})], "tool_calls")
    hello, streamed, _ = chat(server, HELLO[:1])
    assert hello == streamed == ("Hi there.", [], "stop")


def test_malformed_call_is_a_text_reply(server):
    whole, streamed, _ = chat(server, BROKEN[:1])
    assert whole == streamed == (MALFORMED, [], "stop")


def test_tool_choice(server):
    auto = chat(server, HELLO[:1])[2]
    none = chat(server, HELLO[:1], tool_choice="none")[2]
    assert none.usage.prompt_tokens < auto.usage.prompt_tokens  # the definitions stay out of the prompt
    assert none.choices[0].message.tool_calls is None
    for choice in ("required", {"type": "function", "function": {"name": "calculator"}}):
        forced = chat(server, HELLO[:1], tool_choice=choice)[2]
        assert forced.usage.prompt_tokens > auto.usage.prompt_tokens  # the reply's forced opening
        message = forced.choices[0].message
        assert message.tool_calls or message.content.startswith('<tool_call>\n{"name": "calculator", "arguments": ')


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "clock"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": "{not json"}}]}]}, "messages"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "tool", "content": None}]}, "messages"),
])
def test_bad_tool_requests_are_400(server, body, param):
    status, _, answer = server.post({"messages": ASK, "max_tokens": 4} | body, "/v1/chat/completions")
    assert status == 400 and answer["error"]["param"] == param, answer
    assert server.post({"messages": ASK, "max_tokens": 2}, "/v1/chat/completions")[0] == 200


def test_the_tool_loop_runs_the_calculator_with_the_real_model(server):
    from omnilm.infer import SamplingParams, TextGenerator
    from omnilm.tokenizer.chat import IM_END
    from omnilm.tools.loop import run_tool_loop, toolbox

    generator = TextGenerator.from_pretrained(server.folder)
    generator.eos_ids = sorted(set(generator.eos_ids) | {generator.tokenizer.token_to_id(IM_END)})
    params = SamplingParams(max_new_tokens=64, temperature=0)
    tools, functions = toolbox(["calculator"])
    turns = run_tool_loop(lambda prompts: generator.generate(prompts, params), generator.tokenizer,
                          [ASK, HELLO[:1], BROKEN[:1]], tools, functions)
    assert turns[0].calls == [("calculator", '{"expression": "12 * 34"}', "408")]
    assert turns[0].reply == "The answer is 408." and turns[0].malformed == 0
    assert (turns[1].calls, turns[1].reply, turns[1].malformed) == ([], "Hi there.", 0)
    assert (turns[2].calls, turns[2].reply, turns[2].malformed) == ([], MALFORMED, 1)
