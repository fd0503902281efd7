"""CLI verb ``data`` with sub-verbs ``prepare``, ``synth``, ``tokenize`` and ``local-text``, each defined beside its
code."""

from __future__ import annotations

import argparse

from omnilm.data import local_text_cli, prepare_cli, synth_cli, tokenize_cli


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="prepare, synthesise and tokenise training data")
    sub = p.add_subparsers(dest="data_verb", metavar="SUBVERB", required=True)
    for module in (prepare_cli, synth_cli, tokenize_cli, local_text_cli):
        module.register(sub)
