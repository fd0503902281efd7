"""CLI verb ``eval``: lm-evaluation-harness tasks on a model folder, scored by omnilm's own model code."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from omnilm.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="run lm-evaluation-harness tasks on a model folder (needs the eval extra)",
        description="Score --model on lm-eval tasks (built-in, from --include-path, or omnilm's local tasks "
                    "omnilm_bios_mc, omnilm_bios_cloze, omnilm_arithmetic, omnilm_bios_ppl, tag: omnilm; long-context "
                    "retrieval omnilm_passkey and omnilm_needle, one task per length and depth) through "
                    "lm-eval's own machinery, with omnilm's batched inference. Prints lm-eval's table; --out "
                    "writes results.json, results.md, the local tasks (tasks/) and, with --log-samples, per-sample "
                    "logs. Needs `pip install -e \".[eval]\"`.")
    p.add_argument("--model", required=True, help="model folder (any folder omnilm loads, quantized ones too)")
    p.add_argument("--tasks", required=True, help="comma-separated task, group or tag names")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="extra folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, default=None,
                   help="at most this many examples per task (below 1: that fraction)")
    p.add_argument("--out", default=None, metavar="DIR", help="write results (and the local tasks) here")
    p.add_argument("--log-samples", action="store_true", help="write every request and response (needs --out)")
    p.add_argument("--bios", default=None, metavar="DIR",
                   help="synthetic biographies folder (people.jsonl) for the local bios tasks (default: the bios/ "
                        "folder of the run the model belongs to, else the demo recipe's people)")
    p.add_argument("--arithmetic", default=None, metavar="DIR",
                   help="synthetic arithmetic folder (train/test.jsonl) for omnilm_arithmetic (default: synthesised)")
    p.add_argument("--batch-size", type=int, default=32, help="requests per forward pass (default 32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute precision (default: as stored)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template")
    p.add_argument("--seed", type=int, default=0, help="seed of lm-eval's sampling and of the local task data")
    p.add_argument("--prompting", default=None,
                   choices=("greedy", "cot", "self-consistency", "few-shot", "auto-cot"),
                   help="score omnilm_arithmetic under a prompting strategy (omnilm.prompting.strategy); with "
                        "--apply-chat-template the prompts are chat-formatted")
    p.add_argument("--samples", type=int, default=None, help="replies per question for self-consistency (default 5)")
    p.add_argument("--shots", type=int, default=None, help="demonstrations for few-shot and auto-cot (default 4)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature of --prompting (default: "
                   "0, self-consistency 0.7)")
    p.add_argument("--retrieval-lengths", default="256,512,1024,2048,4096,8192", metavar="N,N,...",
                   help="context lengths (tokens) of the passkey / needle tasks omnilm_passkey and omnilm_needle")
    p.add_argument("--retrieval-depths", default="0,0.25,0.5,0.75,1", metavar="F,F,...",
                   help="needle depths (fraction of the filler before it) of the retrieval tasks")
    p.add_argument("--retrieval-samples", type=int, default=5, help="documents per (length, depth) cell")
    p.set_defaults(handler=run_eval)


def find_bios(model: Path) -> Path | None:
    """The ``bios/`` folder of the recipe run a model folder belongs to (``<run>/final``, ``<run>/<stage>/final``)."""
    for parent in list(model.resolve().parents)[:2]:
        if (parent / "bios" / "people.jsonl").is_file():
            return parent / "bios"
    return None


def run_eval(args: argparse.Namespace) -> int:
    from omnilm.eval.lm_tasks import offline_if_local

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks: no task names given")
    if args.log_samples and not args.out:
        raise UserError("--log-samples needs --out")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise UserError(f"--model {model}: not a model folder (no config.json)")
    offline_if_local(tasks)
    try:
        from omnilm.eval import harness
    except ImportError as err:
        raise UserError(f"omnilm eval needs lm-evaluation-harness: pip install -e \".[eval]\" ({err})") from err

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    bios = args.bios or find_bios(model)
    model_args = {"pretrained": str(model), "device": args.device, "batch_size": args.batch_size}
    if args.dtype:
        model_args["dtype"] = args.dtype
    with tempfile.TemporaryDirectory(prefix="omnilm-tasks-") as scratch:
        task_dir = Path(args.out) / "tasks" if args.out else Path(scratch)
        include_path = list(args.include_path) + write_retrieval(args, tasks, model, task_dir)
        lm, chat_template = harness.MODEL_NAME, args.apply_chat_template
        if args.prompting:  # the prompts are built (and chat-formatted) here; lm-eval samples, votes and scores
            from omnilm.eval.prompted import prepare
            from omnilm.prompting.strategy import make_strategy

            strategy = make_strategy(args.prompting, samples=args.samples, shots=args.shots,
                                     temperature=args.temperature)
            lm = harness.OmniLM(**model_args)
            tasks = prepare(task_dir, tasks, strategy, lm, bios=bios, arithmetic=args.arithmetic,
                            chat=args.apply_chat_template, seed=args.seed)
            chat_template = False
        results = harness.evaluate(lm, tasks, model_args=None if args.prompting else model_args, task_dir=task_dir,
                                   include_path=include_path, bios=bios, arithmetic=args.arithmetic,
                                   num_fewshot=args.num_fewshot, limit=limit, log_samples=args.log_samples,
                                   seed=args.seed, apply_chat_template=chat_template)
    if results is None:
        return 1
    print(harness.markdown_table(results))
    if args.out:
        written = harness.write_results(results, args.out)
        print(f"wrote {written['json']} and {written['markdown']}", file=sys.stderr)
        from omnilm.eval.long_context import cells_from_results, plot_heatmap

        for kind, cells in cells_from_results(harness.flat_metrics(results)).items():
            png = plot_heatmap(cells, Path(args.out) / f"{kind}_heatmap.png", title=f"{kind} retrieval")
            print(f"wrote {png}", file=sys.stderr)
    return 0


def write_retrieval(args: argparse.Namespace, tasks: list[str], model: Path, task_dir: Path) -> list[str]:
    """Write the passkey / needle tasks that ``tasks`` ask for, sized with the model's tokenizer; their folders."""
    from omnilm.eval.lm_tasks import is_retrieval
    from omnilm.eval.long_context import RetrievalConfig, write_retrieval_tasks
    from omnilm.tokenizer import Tokenizer

    kinds = sorted({"needle" if t.startswith("omnilm_needle") else "passkey" for t in tasks if is_retrieval(t)})
    if not kinds:
        return []
    try:
        lengths = tuple(int(x) for x in args.retrieval_lengths.split(","))
        depths = tuple(float(x) for x in args.retrieval_depths.split(","))
    except ValueError:
        raise UserError("--retrieval-lengths / --retrieval-depths: comma-separated numbers") from None
    tokenizer = Tokenizer.from_dir(model)
    folders = []
    for kind in kinds:
        config = RetrievalConfig(kind=kind, lengths=lengths, depths=depths, samples=args.retrieval_samples,
                                 seed=args.seed)
        folder = task_dir / f"retrieval_{kind}"
        names = write_retrieval_tasks(folder, tokenizer, config)
        missing = [t for t in tasks if is_retrieval(t) and t.startswith(f"omnilm_{kind}_") and t not in names]
        if missing:
            raise UserError(f"--tasks {missing}: not a cell of the written grid (lengths {list(lengths)}, depths "
                            f"{list(depths)})")
        folders.append(str(folder))
    return folders
