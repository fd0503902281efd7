"""CLI verb ``run``: run a recipe; with no argument, the built-in demo recipe."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a recipe (default: the built-in demo, end to end)")
    p.add_argument("recipe", nargs="?", default="demo", help="recipe YAML file or built-in name (default: demo)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--preset", default=None, help="a preset declared by the recipe, or several joined by commas "
                                                 "(demo: smoke, qa_pretrain, rag_sft)")
    p.set_defaults(handler=run_recipe_cli)


def run_recipe_cli(args: argparse.Namespace) -> int:
    from omnilm.eval.report import write_report
    from omnilm.recipe.recipe import load_recipe
    from omnilm.recipe.runner import run_recipe

    recipe = load_recipe(args.recipe, preset=args.preset)
    name = recipe.name + (f"-{args.preset}" if args.preset else "")
    out = args.out or f"runs/{name}"
    from omnilm.train.distributed import shutdown

    try:
        summary = run_recipe(recipe, out)
    finally:
        shutdown()
    if "interrupted" in summary:
        print(f"omnilm run: interrupted in stage {summary['interrupted']}; run the same command again to resume")
        return 130
    report = write_report(out, summary)
    print(f"omnilm run: done in {summary['seconds']:.0f} s; report: {report}; model: {out}/final")
    if summary.get("retention"):
        print(summary["retention"])
    return 0
