"""The ``omnilm`` command: one entry point whose verbs live with their life-cycle stage.

Each stage module exposes ``register(subparsers)``; heavy imports (torch, ...) happen inside the
verb handlers so that ``omnilm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from omnilm import __version__
from omnilm.data import cli as data_cli
from omnilm.errors import UserError
from omnilm.eval import cli as eval_cli
from omnilm.export import cli as export_cli
from omnilm.infer import chat_cli, quantize_cli
from omnilm.infer import cli as infer_cli
from omnilm.lab import cli as lab_cli
from omnilm.model import cli as model_cli
from omnilm.omni import cli as omni_cli
from omnilm.rag import cli as rag_cli
from omnilm.recipe import cli as recipe_cli
from omnilm.scaling import cli as scaling_cli
from omnilm.serve import cli as serve_cli
from omnilm.tokenizer import cli as tokenizer_cli
from omnilm.train import cli as train_cli

STAGES = (recipe_cli, data_cli, tokenizer_cli, train_cli, model_cli, export_cli, quantize_cli, infer_cli, chat_cli,
          omni_cli, serve_cli, eval_cli, rag_cli, lab_cli, scaling_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnilm", description="Take a language model through its whole life, from raw text to serving.")
    parser.add_argument("--version", action="version", version=f"omnilm {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for stage in STAGES:
        stage.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"omnilm {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
