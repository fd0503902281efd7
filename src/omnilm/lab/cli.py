"""CLI verb ``lab``: controlled experiments. ``omnilm lab knowledge --study NAME --out DIR``."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

# Study name -> (module under omnilm.lab.knowledge, config class, run function).
STUDIES: dict[str, tuple[str, str, str]] = {
    "dynamics": ("dynamics", "DynamicsConfig", "run_dynamics"),
    "plateau-scaling": ("plateau_scaling", "PlateauScalingConfig", "run_plateau_scaling"),
    "imbalance": ("imbalance", "ImbalanceConfig", "run_imbalance"),
    "forgetting": ("forgetting", "ForgettingConfig", "run_forgetting"),
    "hallucination": ("hallucination", "HallucinationConfig", "run_hallucination"),
    "attention-patching": ("patching", "PatchingConfig", "run_patching"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from omnilm.lab.knowledge.config import SCALES

    p = subparsers.add_parser("lab", help="controlled experiments (knowledge acquisition on synthetic biographies)")
    sub = p.add_subparsers(dest="lab", metavar="LAB", required=True)
    knowledge = sub.add_parser("knowledge", help="how language models learn facts, reproduced on biographies")
    knowledge.add_argument("--study", choices=list(STUDIES), default="dynamics")
    knowledge.add_argument("--config", default=None, help="YAML/JSON with the study's config keys")
    knowledge.add_argument("--out", required=True)
    knowledge.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the config)")
    knowledge.add_argument("--scale", choices=list(SCALES), default=None,
                           help="model scale (overrides the config); 'study' is the published 8-layer/44M model")
    knowledge.set_defaults(handler=run_knowledge)


def study(name: str) -> tuple[type, Any]:
    """The config class and run function of a study."""
    module_name, config_name, run_name = STUDIES[name]
    module = importlib.import_module(f"omnilm.lab.knowledge.{module_name}")
    return getattr(module, config_name), getattr(module, run_name)


def run_knowledge(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from omnilm.config import load_config
    from omnilm.utils.atomic import write_text_atomic

    config_cls, run = study(args.study)
    config = load_config(config_cls, args.config) if args.config else config_cls()
    if args.seeds is not None:
        config.seeds = args.seeds
    if args.scale is not None:
        config.scale = args.scale
    config.model_config()  # an unknown scale fails now, not after the corpus is written
    began = time.perf_counter()
    run(config, args.out)
    elapsed = time.perf_counter() - began
    report = Path(args.out) / "report.md"
    write_text_atomic(report, report.read_text(encoding="utf-8") + f"\nWall time: {elapsed:.0f} s.\n")
    print(report.read_text(encoding="utf-8"))
    return 0
