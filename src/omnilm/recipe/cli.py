"""CLI verb ``run``: run a recipe; with no argument, the built-in demo recipe."""

from __future__ import annotations

import argparse

DEMO_PLAN = """\
omnilm run (demo recipe) will, offline, into {out}/:
  1. synthesise a biography corpus and QA data          (data pipeline)
  2. train a byte-level BPE tokenizer                     (tokenizer)
  3. pre-train a small decoder-only model                 (trainer)
  4. fine-tune (SFT) and align (DPO) it                   (post-training)
  5. evaluate and write report.md with plots              (eval)
Stages available in this build: model, checkpoints and generation (`omnilm init`, `omnilm generate`).
The training stages are not part of this build yet, so nothing was run."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a recipe (default: the built-in demo, end to end)")
    p.add_argument("recipe", nargs="?", default="demo", help="recipe YAML file or built-in name (default: demo)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe name>)")
    p.set_defaults(handler=run_recipe)


def run_recipe(args: argparse.Namespace) -> int:
    from omnilm.errors import UserError

    if args.recipe != "demo":
        raise UserError(f"recipe {args.recipe!r}: running recipes is not part of this build yet")
    print(DEMO_PLAN.format(out=args.out or "runs/demo"))
    return 0
