"""CLI verb ``chat``: talk to a chat model in the terminal, or answer user turns piped on stdin.

Each input line is one user turn; the assistant's reply is printed (streamed) followed by a newline, so
``printf 'Where was X born?\\n' | omnilm chat --model DIR`` prints one reply per line. The conversation keeps its
history (oldest turns are dropped when it no longer fits the context). Commands: ``/reset`` starts over,
``/system TEXT`` sets a system message (and starts over), ``/quit`` leaves. On start a one-line banner with the
model's name, its context and the commands goes to stderr, so that piped stdout carries only the replies.
With ``--rag DIR`` each user turn is sent with its ``--top-k`` retrieved passages (:mod:`omnilm.rag.prompt`).
``--cot`` appends the chain-of-thought trigger to each user turn; ``--self-consistency K`` samples K replies in one
batch and prints the one stating the majority answer (:mod:`omnilm.prompting`).
With ``--tools calculator`` the model may call the calculator: each call and its result go to stderr, the final
reply to stdout (:mod:`omnilm.tools.loop`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from omnilm.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="chat with a model (interactive, or one user turn per stdin line)")
    p.add_argument("--model", required=True, help="model folder with a chat tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rag", default=None, metavar="DIR",
                   help="a retrieval index (omnilm rag index): each question is sent with its top passages")
    p.add_argument("--top-k", type=int, default=3, help="passages retrieved per question with --rag")
    p.add_argument("--cot", action="store_true",
                   help="zero-shot chain of thought: every question is sent with \"Let's think step by step.\"")
    p.add_argument("--self-consistency", type=int, default=None, metavar="K",
                   help="sample K replies per question (needs --temperature > 0) and print the one whose final "
                        "answer (\"The answer is N\") the most replies agree on")
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help="tools the model may call, comma-separated (available: calculator): each call is run, "
                        "shown on stderr, and its result goes back to the model (omnilm.tools.loop)")
    p.set_defaults(handler=run_chat)


def fit_history(tokenizer: Any, system: list[dict[str, str]], turns: list[dict[str, str]], budget: int,
                ) -> list[dict[str, str]]:
    """System message plus the most recent whole user/assistant turns that fit ``budget`` tokens."""
    from omnilm.tokenizer.chat import encode_chat

    kept = list(turns)
    while len(kept) > 1 and len(encode_chat(tokenizer, system + kept, add_generation_prompt=True)[0]) > budget:
        kept = kept[2:] if len(kept) > 2 else kept[1:]
    return system + kept


def run_with_tools(generator: Any, params: Any, messages: list[dict[str, Any]], names: str) -> Any:
    """One user turn through the tool loop: each call and its result on stderr, the final reply on stdout."""
    from omnilm.tools.loop import run_tool_loop, toolbox

    tools, functions = toolbox([n.strip() for n in names.split(",") if n.strip()])
    turn = run_tool_loop(lambda prompts: generator.generate(prompts, params), generator.tokenizer, [messages],
                         tools, functions)[0]
    for name, arguments, result in turn.calls:
        print(f"[{name}] {arguments} -> {result}", file=sys.stderr, flush=True)
    print(turn.reply, flush=True)
    return turn


def banner(model_dir: str | Path, context: int) -> str:
    """The line ``omnilm chat`` starts with: the model's name (its folder's), its context and the commands."""
    return f"omnilm chat · {Path(model_dir).resolve().name} (context {context}) · /reset /system TEXT /quit"


def run_chat(args: argparse.Namespace) -> int:
    from omnilm.infer import SamplingParams, TextGenerator
    from omnilm.prompting import COT_TRIGGER, AnswerReader, majority_vote
    from omnilm.prompting.prompts import ask
    from omnilm.tokenizer.chat import IM_END, encode_chat

    retriever = None
    if args.rag:
        from omnilm.rag.index import RagIndex
        from omnilm.rag.prompt import with_context

        retriever = RagIndex.load(args.rag)
        if args.top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.self_consistency is not None and (args.self_consistency < 1 or args.temperature <= 0):
        raise UserError("--self-consistency K needs K >= 1 and --temperature > 0 (greedy replies would all agree)")
    generator = TextGenerator.from_pretrained(args.model, device=args.device)
    tokenizer = generator.tokenizer
    im_end = tokenizer.token_to_id(IM_END)
    if im_end is None:
        print(f"omnilm chat: {args.model}: the tokenizer has no {IM_END} token; it is not a chat model",
              file=sys.stderr)
        return 2
    generator.eos_ids = sorted(set(generator.eos_ids) | {im_end})
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    budget = generator.model.config.max_seq_len - args.max_new_tokens
    interactive = sys.stdin.isatty()
    print(banner(args.model, generator.model.config.max_seq_len), file=sys.stderr, flush=True)
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict[str, str]] = []
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if text == "/quit":
            return 0
        if text == "/reset" or text.startswith("/system"):
            turns = []
            if text.startswith("/system"):
                content = text.removeprefix("/system").strip()
                system = [{"role": "system", "content": content}] if content else []
            if interactive:
                print("(conversation reset)")
            continue
        if not text.strip():
            continue
        turns.append({"role": "user", "content": text})
        messages = fit_history(tokenizer, system, turns, budget)
        if retriever is not None:  # passages in this turn only: the history keeps the questions as typed
            messages = with_context(messages, [h.text for h in retriever.search([text], args.top_k)[0]])
        if args.cot:  # the trigger in this turn only, like the passages
            messages = [*messages[:-1], {"role": "user", "content": ask(messages[-1]["content"], COT_TRIGGER)}]
        if args.tools:  # the tool loop; the history keeps the final replies only
            turn = run_with_tools(generator, params, messages, args.tools)
            turns.append({"role": "assistant", "content": turn.reply or "..."})
            continue
        # Encoded as the server does: what the user types is text, never a control token.
        prompt = encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
        if args.self_consistency:  # K samples in one batch, the reply stating the majority answer
            seed = args.seed or 0
            replies = generator.generate([prompt] * args.self_consistency, params,
                                         seeds=[seed + i for i in range(args.self_consistency)])
            reply = replies[majority_vote([AnswerReader()(r) for r in replies]).first or 0].strip()
            print(reply, flush=True)
            turns.append({"role": "assistant", "content": reply or "..."})
            continue
        reply = ""
        for piece in generator.stream(prompt, params):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        turns.append({"role": "assistant", "content": reply.strip() or "..."})
