"""CLI verb ``lab``: controlled experiments. ``omnilm lab knowledge --study dynamics --out DIR``."""

from __future__ import annotations

import argparse

STUDIES = ("dynamics",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("lab", help="controlled experiments (knowledge acquisition on synthetic biographies)")
    sub = p.add_subparsers(dest="lab", metavar="LAB", required=True)
    knowledge = sub.add_parser("knowledge", help="how language models learn facts, reproduced on biographies")
    knowledge.add_argument("--study", choices=STUDIES, default="dynamics")
    knowledge.add_argument("--config", default=None, help="YAML/JSON with DynamicsConfig keys")
    knowledge.add_argument("--out", required=True)
    knowledge.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the config)")
    knowledge.set_defaults(handler=run_knowledge)


def run_knowledge(args: argparse.Namespace) -> int:
    import time

    from omnilm.config import load_config
    from omnilm.lab.knowledge.dynamics import DynamicsConfig, run_dynamics

    config = load_config(DynamicsConfig, args.config) if args.config else DynamicsConfig()
    if args.seeds is not None:
        config.seeds = args.seeds
    began = time.perf_counter()
    results = run_dynamics(config, args.out)
    for seed, phases in enumerate(results["phases"]):
        print(f"seed {seed}: {phases}")
    print(f"baseline {results['baseline']:.3f}; report {args.out}/report.md ({time.perf_counter() - began:.0f} s)")
    return 0
