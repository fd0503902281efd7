"""Log-probabilities from the server: echo and logprobs of completions (every prompt form), chat logprobs, and
lm-eval's ``local-completions`` over HTTP against ``omnilm serve`` giving the numbers of lm-eval's own ``hf`` model
on the same folder. Every log-probability is checked against a forward pass of the model in this process."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest
import torch

from helpers import small_model, solo_tokens
from live_server import API_KEY
from omnilm.infer.sampling import SamplingParams
from omnilm.serve.engine import Engine, Request
from omnilm.serve.logprobs import TokenText
from omnilm.tokenizer import Tokenizer
from omnilm.tokenizer.chat import IM_END, encode_chat, validate_messages

TOLERANCE = 1e-4


def post(served: dict, body: dict, path: str = "/v1/completions") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
    conn.request("POST", path, body=json.dumps({"model": "tiny-chat"} | body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def forward_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Log-probabilities (T, V) of the model over ``ids`` in one plain forward pass: row p predicts token p + 1."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def byte_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` as one byte-level token per UTF-8 byte (so its characters are split between tokens)."""
    from omnilm.serve.logprobs import byte_level_table

    char_of = {byte: char for char, byte in byte_level_table().items()}
    return [tokenizer.token_to_id(char_of[b]) for b in text.encode()]


def check_choice(choice: dict, ids: list[int], model: torch.nn.Module, names: TokenText, k: int,
                 generated: int) -> None:
    """An echoed choice with ``logprobs: k``: the prompt ``ids`` then ``generated`` tokens, every number equal to a
    forward pass of the model, every offset pointing at its token's text."""
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + generated
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = forward_logprobs(model, ids)  # prompt tokens, and the first generated one from the last row
    for p in range(1, len(ids) + min(generated, 1)):
        row = expected[p - 1]
        token = ids[p] if p < len(ids) else int(row.argmax())  # greedy
        assert abs(logprobs["token_logprobs"][p] - float(row[token])) < TOLERANCE, p
        top = row.topk(k)
        assert list(logprobs["top_logprobs"][p].values()) == pytest.approx(top.values.tolist(), abs=TOLERANCE)
        assert list(logprobs["top_logprobs"][p]) == [names.text(t) for t in top.indices.tolist()]
    assert logprobs["tokens"][: len(ids)] == [names.text(t) for t in ids]
    check_offsets(choice["text"], logprobs["tokens"], logprobs["text_offset"])


def check_offsets(text: str, tokens: list[str], offsets: list[int]) -> None:
    """Offsets never go back; a token whose text is whole characters is found at its offset; one that is part
    of a character points at that character."""
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(text)
    for token, offset in zip(tokens, offsets, strict=True):
        if not token.startswith("bytes:"):
            assert text[offset: offset + len(token)] == token, (token, offset)


def test_echo_logprobs_equal_a_forward_pass_of_the_model(served: dict, tokenizer: Tokenizer) -> None:
    """Three prompts of different lengths in one request (scored in the same passes), each echoed with its
    log-probabilities and top 5, plus one greedy token."""
    prompts = ["Alice Moreau was born on 3 March 1961 in Lyon.", "The quick brown fox", "Emoji: café, 東京 🙂!"]
    status, body = post(served, {"prompt": prompts, "echo": True, "logprobs": 5, "max_tokens": 1, "temperature": 0})
    assert status == 200, body
    names = TokenText(tokenizer)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, body["choices"], strict=True):
        ids = tokenizer.encode(prompt)
        check_choice(choice, ids, served["model"], names, 5, 1)
        generated = int(forward_logprobs(served["model"], ids)[-1].argmax())
        assert choice["text"] == prompt + tokenizer.decode([generated], skip_special_tokens=True)
        assert choice["finish_reason"] == "length"
        last = choice["logprobs"]
        assert last["token_logprobs"][-1] == max(last["top_logprobs"][-1].values())  # greedy: exactly the top
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(p)) for p in prompts)
    assert body["usage"]["completion_tokens"] == 3


def test_token_id_prompts_and_lists_of_lists(served: dict, tokenizer: Tokenizer) -> None:
    names = TokenText(tokenizer)
    text = "Bob Lindqvist was born in Uppsala."
    ids = tokenizer.encode(text)
    asked = {"echo": True, "logprobs": 3, "max_tokens": 1, "temperature": 0}
    _, as_text = post(served, {"prompt": text} | asked)
    _, as_ids = post(served, {"prompt": ids} | asked)
    assert as_ids["choices"] == as_text["choices"]
    # Characters split over byte tokens: 東 and 🙂 are three and four tokens here.
    split = tokenizer.encode("Tokyo is ") + byte_tokens(tokenizer, "東京") + tokenizer.encode(" ok ") + \
        byte_tokens(tokenizer, "🙂")
    status, both = post(served, asked | {"prompt": [ids, split], "max_tokens": 0})
    assert status == 200, both
    first, second = both["choices"]
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(
        as_text["choices"][0]["logprobs"]["token_logprobs"][1:-1], abs=1e-6)
    assert first["text"] == text and first["finish_reason"] == "length"  # max_tokens 0: the prompt alone
    assert second["text"] == "Tokyo is 東京 ok 🙂" == tokenizer.decode(split)
    check_choice(second, split, served["model"], names, 3, 0)
    tokens, offsets = second["logprobs"]["tokens"], second["logprobs"]["text_offset"]
    start = len(tokenizer.encode("Tokyo is "))
    assert tokens[start: start + 3] == ["bytes:\\xe6", "bytes:\\x9d", "bytes:\\xb1"]
    assert offsets[start: start + 3] == [9, 9, 9] and offsets[start + 3] == 10  # 東 starts at 9, 京 at 10
    assert both["usage"]["completion_tokens"] == 0


def test_generated_tokens_logprobs_and_best_of(served: dict, tokenizer: Tokenizer) -> None:
    """Without echo the logprobs cover the generated tokens: equal to a forward pass over prompt + completion,
    and the text offsets point into the completion."""
    prompt = "Alice Moreau was born"
    status, body = post(served, {"prompt": prompt, "logprobs": 2, "max_tokens": 12, "temperature": 0})
    assert status == 200, body
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    ids = tokenizer.encode(prompt)
    generated = solo_tokens(served["model"], ids, SamplingParams(max_new_tokens=12, temperature=0),
                            {tokenizer.eos_id, tokenizer.token_to_id(IM_END)})
    assert [TokenText(tokenizer).text(t) for t in generated] == logprobs["tokens"][: len(generated)]
    expected = forward_logprobs(served["model"], ids + generated)
    for k, token in enumerate(generated):
        assert abs(logprobs["token_logprobs"][k] - float(expected[len(ids) - 1 + k, token])) < TOLERANCE
        assert logprobs["token_logprobs"][k] == max(logprobs["top_logprobs"][k].values())
    check_offsets(choice["text"], logprobs["tokens"], logprobs["text_offset"])
    # best_of: the n choices (of best_of sampled) with the highest mean log-probability per token, best first.
    sampled = {"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 3, "logprobs": 0}
    _, four = post(served, sampled | {"n": 4})
    _, best = post(served, sampled | {"n": 2, "best_of": 4})

    def mean(c: dict) -> float:
        return sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"])

    ranked = sorted(four["choices"], key=mean, reverse=True)[:2]
    assert [c["text"] for c in best["choices"]] == [c["text"] for c in ranked]
    assert [c["index"] for c in best["choices"]] == [0, 1]


def test_streamed_completion_logprobs_equal_the_whole_answer(served: dict) -> None:
    body = {"prompt": "The quick brown", "echo": True, "logprobs": 2, "max_tokens": 8, "temperature": 0}
    _, whole = post(served, body)
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    events = [json.loads(line[6:]) for line in conn.getresponse().read().decode().split("\n\n")
              if line.startswith("data: {")]
    text, joined = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for event in events:
        choice = event["choices"][0]
        text += choice["text"]
        for key in joined:
            joined[key] += choice["logprobs"][key] if choice["logprobs"] else []
    assert text == whole["choices"][0]["text"] and joined == whole["choices"][0]["logprobs"]


def test_bad_logprob_requests_are_400s_naming_the_field(served: dict) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    bad = [({"prompt": [1, 2, 400]}, "prompt", "outside the vocabulary"),
           ({"prompt": [[1, 2], [-1]]}, "prompt", "prompt 1: token id -1 is outside"),
           ({"prompt": [1, "a"]}, "prompt", "token ids must be integers"),
           ({"prompt": [[1], []]}, "prompt", "empty list"),
           ({"prompt": []}, "prompt", "list of lists of token ids"),
           ({"prompt": 5}, "prompt", "list of lists of token ids"),
           ({"prompt": [[1.5]]}, "prompt", "must be integers"),
           ({"prompt": "x", "logprobs": 21}, "logprobs", "between 0 and 20"),
           ({"prompt": "x", "logprobs": True}, "logprobs", "integer"),
           ({"prompt": "x", "echo": "yes"}, "echo", "true or false"),
           ({"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
           ({"prompt": "x", "n": 3, "best_of": 2}, "best_of", "between n"),
           ({"prompt": "x", "best_of": 3, "stream": True}, "best_of", "streamed"),
           ({"prompt": [[5] * 130]}, "prompt", "context"),
           ({"prompt": [[5]] * 300}, "prompt", "at most"),
           (chat | {"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
           (chat | {"logprobs": 1}, "logprobs", "true or false"),
           (chat | {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20")]
    for body, param, words in bad:
        status, answer = post(served, body, "/v1/chat/completions" if "messages" in body else "/v1/completions")
        assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], \
            (body, answer)
    status, answer = post(served, {"prompt": [3, 4, 5], "max_tokens": 2, "logprobs": 1})
    assert status == 200 and len(answer["choices"][0]["logprobs"]["tokens"]) >= 1


def test_chat_logprobs_through_the_openai_client(served: dict, tokenizer: Tokenizer) -> None:
    from openai import OpenAI

    api = OpenAI(base_url=f"http://127.0.0.1:{served['port']}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Where was Alice Moreau born?"}]
    reply = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    prompt, _ = encode_chat(tokenizer, validate_messages(messages), add_generation_prompt=True)
    eos = {tokenizer.eos_id, tokenizer.token_to_id(IM_END)}
    generated = solo_tokens(served["model"], prompt, SamplingParams(max_new_tokens=10, temperature=0), eos)
    assert len(content) == len(generated) == reply.usage.completion_tokens
    expected = forward_logprobs(served["model"], prompt + generated)
    names = TokenText(tokenizer)
    for k, (entry, token) in enumerate(zip(content, generated, strict=True)):
        row = expected[len(prompt) - 1 + k]
        assert entry.token == names.text(token) and bytes(entry.bytes) == names.bytes(token)
        assert abs(entry.logprob - float(row[token])) < TOLERANCE
        top = row.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=TOLERANCE)
        assert [t.token for t in entry.top_logprobs] == [names.text(t) for t in top.indices.tolist()]
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == reply.choices[0].message.content
    chunks = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_the_end_token_is_listed_so_continuations_keep_their_last_token(serve, tokenizer: Tokenizer) -> None:  # noqa: ANN001
    """lm-eval sums ``token_logprobs[ctxlen:-1]``, counting on one generated token after the prompt: when that
    token ends the sequence it is still listed (its text is not in ``text``)."""
    running = serve()
    ids = tokenizer.encode("Alice was born in")
    greedy = int(forward_logprobs(running.service.model, ids)[-1].argmax())
    running.service.engine.eos_ids.add(greedy)  # the model's next token now ends the sequence
    status, _, body = running.post({"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0})
    choice = body["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == len(ids) + 1
    assert choice["logprobs"]["tokens"][-1] == TokenText(tokenizer).text(greedy)
    assert choice["text"] == "Alice was born in" and choice["logprobs"]["text_offset"][-1] == len(choice["text"])


def test_engine_scores_prompts_beside_other_requests(tokenizer: Tokenizer) -> None:
    """Scored prompts prefilled in chunks beside generating requests, one repeating a cached prefix (which it must
    compute again: cached positions have no logits); sampled tokens report the model's distribution, not the
    temperature- and top-p-shaped one they were drawn from."""
    model = small_model("llama", vocab_size=tokenizer.vocab_size, max_seq_len=128)
    engine = Engine(model, tokenizer, block_size=4, prefill_chunk=16)
    torch.manual_seed(0)
    long = torch.randint(5, 300, (40,)).tolist()
    plain = engine.submit(Request(long[:30], SamplingParams(max_new_tokens=10, temperature=0)))
    engine.step()
    scored = engine.submit(Request(long, SamplingParams(max_new_tokens=1, temperature=0), prompt_logprobs=4,
                                   prompt_only=True))
    sampled = engine.submit(Request(long[:12], SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.5, seed=1),
                                    logprobs=2, prompt_logprobs=0))
    engine.run_until_idle()
    assert plain.output_ids == solo_tokens(model, long[:30], plain.params, engine.eos_ids)
    assert scored.finish_reason == "length" and scored.output_ids == [] and scored.token_logprobs == []
    expected = forward_logprobs(model, long)
    assert [r.token for r in scored.prompt_token_logprobs] == long[1:]
    for p, record in enumerate(scored.prompt_token_logprobs):
        assert abs(record.logprob - float(expected[p, long[p + 1]])) < TOLERANCE
        assert list(record.top_ids) == expected[p].topk(4).indices.tolist()
    ids = long[:12] + sampled.output_ids
    expected = forward_logprobs(model, ids)
    assert len(sampled.prompt_token_logprobs) == 11 and len(sampled.token_logprobs) >= len(sampled.output_ids)
    for p, record in enumerate(sampled.prompt_token_logprobs + sampled.token_logprobs):
        assert record.token == (ids + [record.token])[p + 1]
        assert abs(record.logprob - float(expected[p, record.token])) < TOLERANCE
    assert engine.pool.num_in_use == 0
    engine.pool.check()


MC_DOCS = [
    {"question": "Alice Moreau was born in", "choices": ["Lyon", "Uppsala", "Tokyo", "Paris"], "answer": 0},
    {"question": "Bob Lindqvist studied", "choices": ["physics", "economics", "emoji"], "answer": 1},
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog", "moon", "fence"], "answer": 0},
    {"question": "She works for", "choices": ["Airbus", "Stockholm University", "nobody at all"], "answer": 0},
    {"question": "Emoji and accents:", "choices": ["café", "naïve", "東京", "🙂🚀"], "answer": 2},
    {"question": "12345", "choices": ["times!", "again", "and again"], "answer": 0},
]
PPL_DOCS = [
    {"text": "Alice Moreau was born on 3 March 1961 in Lyon. She studied physics at Grenoble."},
    {"text": "Bob Lindqvist was born in Uppsala. He studied economics at Stockholm University."},
    {"text": "The lazy dog sleeps; the quick brown fox jumps 12345 times!"},
    {"text": "café, naïve, 東京 🙂"},
]


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task and a perplexity task over local JSON lines (nothing is downloaded)."""
    folder.mkdir()
    for name, docs in (("mc", MC_DOCS), ("ppl", PPL_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    common = f"dataset_path: json\ntest_split: train\ndataset_kwargs:\n  data_files: {{train: {folder}/"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}mc.jsonl}}\noutput_type: multiple_choice\ndoc_to_text: question\n"
        "doc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    (folder / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}ppl.jsonl}}\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        encoding="utf-8")
    return folder


def test_lm_eval_over_http_gives_the_numbers_of_its_hf_model(served: dict, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's ``local-completions`` (token-id prompts, several per request) against ``omnilm serve`` and
    lm-eval's ``hf`` model on the same folder: the same log-likelihood for every request, the same metrics."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what local-completions sends as its bearer token
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models (local-completions) need lm-eval[api]")
    from lm_eval.tasks import TaskManager

    tasks = write_tasks(tmp_path / "tasks")
    folder = str(served["folder"])

    def evaluate(model: str, model_args: dict) -> dict:
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc", "tiny_ppl"],
                                       task_manager=TaskManager(include_path=str(tasks)), bootstrap_iters=0,
                                       log_samples=True, random_seed=0)

    served_args = {"model": "tiny-chat", "base_url": f"http://127.0.0.1:{served['port']}/v1/completions",
                   "tokenizer_backend": "huggingface", "tokenizer": folder, "tokenized_requests": True,
                   "max_length": 128, "batch_size": 4}
    over_http = evaluate("local-completions", served_args)
    reference = evaluate("hf", {"pretrained": folder, "device": "cpu", "dtype": "float32"})
    for task in ("tiny_mc", "tiny_ppl"):
        ours, theirs = over_http["samples"][task], reference["samples"][task]
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            scores = [r[0] if isinstance(r, (list, tuple)) else r for r in a["filtered_resps"]]
            expected = [r[0] if isinstance(r, (list, tuple)) else r for r in b["filtered_resps"]]
            # A document's log-likelihood sums float32 terms (about -250 here): within 1e-4 or 1e-6 of it.
            assert scores == pytest.approx(expected, rel=1e-6, abs=TOLERANCE), task
            greedy = [r[1] for r in a["filtered_resps"] if isinstance(r, (list, tuple))]  # read from top_logprobs
            assert greedy == [r[1] for r in b["filtered_resps"] if isinstance(r, (list, tuple))]
    mc, mc_ref = over_http["results"]["tiny_mc"], reference["results"]["tiny_mc"]
    assert mc["acc,none"] == mc_ref["acc,none"] and mc["acc_norm,none"] == mc_ref["acc_norm,none"]
    ppl, ppl_ref = over_http["results"]["tiny_ppl"], reference["results"]["tiny_ppl"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ppl[metric] == pytest.approx(ppl_ref[metric], rel=TOLERANCE)
