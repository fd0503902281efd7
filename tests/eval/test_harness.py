"""lm-evaluation-harness through omnilm: the same local tasks give the same numbers as lm-eval's own ``hf`` model on
the exported folder, and single requests agree with a token-by-token brute force."""

from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # everything here is local; read when datasets is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from helpers import small_model  # noqa: E402
from omnilm.cli import main  # noqa: E402
from omnilm.data.synth.arithmetic import ArithmeticConfig, write_arithmetic  # noqa: E402
from omnilm.data.synth.bios import BiosConfig, write_bios  # noqa: E402
from omnilm.eval.harness import OmniLM, evaluate  # noqa: E402
from omnilm.model.hf import load_pretrained, save_pretrained  # noqa: E402

TASKS = ("omnilm_bios_mc", "omnilm_bios_cloze", "omnilm_arithmetic", "omnilm_bios_ppl")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny random Llama-style model folder (context 128) and small synthetic bios and arithmetic sets."""
    root = tmp_path_factory.mktemp("harness")
    model = small_model("llama", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id)
    model_dir = save_pretrained(model, root / "model", tokenizer=tokenizer)
    write_bios(BiosConfig(people=8, unseen_people=2, bios_per_person=1, cities=20, companies=20, universities=10),
               root / "bios")
    write_arithmetic(ArithmeticConfig(problems=24, test_fraction=0.25), root / "arith")
    return root, model_dir


def _metrics(results):
    return {(task, key): value for task, metrics in results["results"].items() for key, value in metrics.items()
            if isinstance(value, (int, float)) and "_stderr" not in key}


def _responses(samples):
    """Per document: the raw responses (log-likelihoods as floats, generations as text)."""
    out = {}
    for record in samples:
        responses = []
        for response in (r[0] for r in record["resps"]):  # one request after another, first repeat
            if isinstance(response, str):
                responses.append(response)
            else:
                responses.append(tuple(float(x) for x in (response if isinstance(response, (list, tuple))
                                                          else [response])))
        out[record["doc_id"]] = responses
    return out


def test_omnilm_eval_equals_lm_eval_hf_on_the_exported_folder(world, tmp_path, capsys):
    root, model_dir = world
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--tasks", "omnilm", "--bios", str(root / "bios"),
                 "--arithmetic", str(root / "arith"), "--num-fewshot", "1", "--batch-size", "5", "--out", str(out),
                 "--log-samples"]) == 0
    assert "omnilm_bios_mc" in capsys.readouterr().out  # lm-eval's table
    ours = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("omnilm_") >= 4
    assert ours["config"]["model"] == "omnilm" and ours["n-shot"]["omnilm_bios_mc"] == 1

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                             tasks=["omnilm"], num_fewshot=1, batch_size=8, device="cpu", log_samples=True,
                             task_manager=TaskManager(include_path=str(out / "tasks"), include_defaults=False),
                             random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    mine, hf = _metrics(ours), _metrics(theirs)
    assert set(mine) == set(hf) and {t for t, _ in mine} == set(TASKS)
    for key, value in hf.items():  # perplexities are exponentials: compared as logarithms
        a, b = (math.log(mine[key]), math.log(value)) if "perplexity" in key[1] else (mine[key], value)
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (key, mine[key], value)
    assert ours["results"]["omnilm_bios_ppl"]["bits_per_byte,none"] > 0
    # Request by request: the same log-likelihoods (to float rounding) and the very same generated text.
    for task in TASKS:
        lines = (out / f"samples_{task}.jsonl").read_text().splitlines()
        mine_resps = _responses(json.loads(line) for line in lines)
        hf_resps = _responses(theirs["samples"][task])
        assert mine_resps.keys() == hf_resps.keys()
        for doc_id, responses in hf_resps.items():
            for a, b in zip(mine_resps[doc_id], responses, strict=True):
                if isinstance(b, str):
                    assert a == b, (task, doc_id)
                else:
                    assert math.isclose(a[0], b[0], rel_tol=1e-5, abs_tol=1e-4) and a[1:] == b[1:], (task, a, b)


def _brute_logp(model, context, continuation):
    """Sum of log p(token | what precedes it) over the continuation and whether each token is the argmax, one
    full forward pass per token; a too long request keeps its last max_seq_len + 1 tokens (lm-eval's rule)."""
    total, greedy = 0.0, True
    sequence = (context + continuation)[-(model.config.max_seq_len + 1):]
    start = len(sequence) - len(continuation)
    for k, token in enumerate(continuation):
        prefix = sequence[:start + k]
        with torch.no_grad():
            logits = model(torch.tensor([prefix]))[0, -1].float()
        total += torch.log_softmax(logits, -1)[token].item()
        greedy &= int(logits.argmax()) == token
    return total, greedy


def test_requests_agree_with_a_token_by_token_brute_force(world, tokenizer):
    _, model_dir = world
    lm = OmniLM(pretrained=str(model_dir), batch_size=3)
    model = load_pretrained(model_dir).eval()
    eos = tokenizer.eos_id
    long_context = " ".join(["Alice Moreau was born in Lyon and works for Airbus."] * 6)  # beyond 128 tokens
    pairs = [("Alice was born in", " Lyon"), ("", "Bob studied economics"), ("The quick brown fox", " jumps over"),
             ("café", " 東京 🙂"), (long_context, " Again, she works for Airbus.")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logp, greedy) in zip(pairs, got, strict=True):
        if context:
            whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
            ctx_ids, cont_ids = ctx, whole[len(ctx):]
        else:
            ctx_ids, cont_ids = [eos], tokenizer.encode(continuation)
        expected, expected_greedy = _brute_logp(model, ctx_ids, cont_ids)
        assert math.isclose(logp, expected, rel_tol=1e-5, abs_tol=1e-4) and greedy == expected_greedy

    texts = ["Bob Lindqvist studied economics at Stockholm University.", long_context]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    short = tokenizer.encode(texts[0])
    assert len(short) < 128
    assert math.isclose(rolling[0], _brute_logp(model, [eos], short)[0], rel_tol=1e-5)
    # A text longer than the context: windows of 128 predicted tokens, each seeing only its own window.
    ids = tokenizer.encode(texts[1])
    assert len(ids) > 128
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = map(make_disjoint_window, get_rolling_token_windows(ids, eos, 128, 1))
    assert math.isclose(rolling[1], sum(_brute_logp(model, c, t)[0] for c, t in windows), rel_tol=1e-5)

    prompts = ["Alice", "The quick brown fox jumps", long_context]
    kwargs = {"until": ["e"], "max_gen_toks": 12, "do_sample": False}
    generated = lm.generate_until([Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(prompts)])
    for prompt, text in zip(prompts, generated, strict=True):
        ids = tokenizer.encode(prompt)[-(128 - 12):]
        new = []
        for _ in range(12):
            with torch.no_grad():
                token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            if "e" in tokenizer.decode(new, skip_special_tokens=True):
                break
        assert text == tokenizer.decode(new, skip_special_tokens=True).split("e")[0]


def test_a_quantized_folder_and_the_recipe_eval_type(world, tokenizer, tmp_path):
    from omnilm.eval.suite import run_evals
    from omnilm.infer.quantize import quantize_model
    from omnilm.infer.quantized_checkpoint import save_quantized

    root, model_dir = world
    quantized = save_quantized(quantize_model(load_pretrained(model_dir), bits=8, group_size=32),
                               tmp_path / "int8", tokenizer=tokenizer)
    results = run_evals(quantized, {"lm": {"type": "lm_eval", "tasks": ["omnilm_bios_mc", "omnilm_bios_ppl"],
                                           "data": str(root / "bios"), "limit": 6}})["lm"]
    assert 0 <= results["omnilm_bios_mc/acc"] <= 1 and results["acc"] == results["omnilm_bios_mc/acc"]
    assert results["omnilm_bios_ppl/bits_per_byte"] > 0
    with pytest.raises(ValueError, match="task_dir"):
        evaluate(OmniLM(pretrained=str(model_dir)), ["omnilm_bios_mc"])


def test_a_control_token_stop_string_ends_generation(tokenizer):
    """A chat model's reply ends at <|im_end|>: as a stop string it never appears in the decoded text, so it must
    end the sequence as a token. The head's rows are swapped so that the greedy first token is <|im_end|>."""
    from omnilm.tokenizer.chat import IM_END, format_chat

    model = small_model("llama", vocab_size=tokenizer.vocab_size).eval()  # untied head
    prompt = format_chat([{"role": "user", "content": "Alice"}], add_generation_prompt=True)
    ids, im_end = tokenizer.encode(prompt), tokenizer.token_to_id(IM_END)
    with torch.no_grad():
        first = int(model(torch.tensor([ids]))[0, -1].argmax())
        assert first != im_end  # the head is untied: swapping its rows leaves the hidden states as they are
        head = model.lm_head.weight
        head[[first, im_end]] = head[[im_end, first]]
    lm = OmniLM(model=model, tokenizer=tokenizer)
    kwargs = {"max_gen_toks": 8, "do_sample": False}
    ended = lm.generate_until([Instance("generate_until", {}, (prompt, {**kwargs, "until": [IM_END]}), 0)])
    free = lm.generate_until([Instance("generate_until", {}, (prompt, {**kwargs, "until": ["\x00"]}), 0)])
    assert ended == [""] and free[0] != ""
