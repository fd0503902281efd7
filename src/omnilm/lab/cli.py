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

    p = subparsers.add_parser("lab", help="controlled experiments on synthetic biographies (knowledge acquisition, "
                                          "mixture of experts, multi-token prediction, selective LM, "
                                          "pre-training objectives)")
    sub = p.add_subparsers(dest="lab", metavar="LAB", required=True)
    knowledge = sub.add_parser("knowledge", help="how language models learn facts, reproduced on biographies")
    knowledge.add_argument("--study", choices=list(STUDIES), default="dynamics")
    knowledge.add_argument("--config", default=None, help="YAML/JSON with the study's config keys")
    knowledge.add_argument("--out", required=True)
    knowledge.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the config)")
    knowledge.add_argument("--scale", choices=list(SCALES), default=None,
                           help="model scale (overrides the config); 'study' is the published study's 8-layer decoder "
                                "(41M parameters with a 2k vocabulary)")
    knowledge.add_argument("--report-only", action="store_true",
                           help="redraw the plots and report.md from OUT/results.json without training")
    knowledge.set_defaults(handler=run_knowledge)
    moe = sub.add_parser("moe", help="dense vs mixture of experts from scratch vs upcycled, at equal compute")
    moe.add_argument("--config", default=None, help="YAML/JSON with MoeLabConfig keys")
    moe.add_argument("--out", required=True)
    moe.add_argument("--report-only", action="store_true", help="redraw plots and report.md from OUT/results.json")
    moe.set_defaults(handler=run_moe)
    for name, what, handler in (("mtp", "next-token vs multi-token prediction at equal compute", run_mtp),
                                ("selective", "standard vs selective language modelling on biographies mixed "
                                              "with noise", run_selective),
                                ("objectives", "causal LM vs BERT MLM vs ELECTRA vs T5 span corruption at equal "
                                               "pre-training FLOPs, each fine-tuned on one classification task",
                                 run_objectives)):
        lab = sub.add_parser(name, help=what)
        lab.add_argument("--config", default=None, help="YAML/JSON with the lab config's keys")
        lab.add_argument("--out", required=True)
        lab.add_argument("--report-only", action="store_true",
                         help="redraw plots and report.md from OUT/results.json")
        lab.set_defaults(handler=handler)


def study(name: str) -> tuple[type, Any, Any]:
    """The config class, run function and output writer (plots + report from results) of a study."""
    module_name, config_name, run_name = STUDIES[name]
    module = importlib.import_module(f"omnilm.lab.knowledge.{module_name}")
    return getattr(module, config_name), getattr(module, run_name), module.write_outputs


def run_knowledge(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from omnilm.config import from_dict, load_config
    from omnilm.errors import UserError
    from omnilm.utils.atomic import write_json_atomic, write_text_atomic

    config_cls, run, write_outputs = study(args.study)
    out = Path(args.out)
    if args.report_only:
        saved = out / "results.json"
        if not saved.is_file():
            raise UserError(f"{saved} not found: run the study first")
        results = json.loads(saved.read_text(encoding="utf-8"))
        config = from_dict(config_cls, results["config"], source=str(saved))
        write_outputs(results, config, out)
    else:
        config = load_config(config_cls, args.config) if args.config else config_cls()
        if args.seeds is not None:
            config.seeds = args.seeds
        if args.scale is not None:
            config.scale = args.scale
        config.model_config()  # an unknown scale fails now, not after the corpus is written
        began = time.perf_counter()
        results = run(config, out)
        results["wall_time_s"] = time.perf_counter() - began
        write_json_atomic(out / "results.json", results)
    report = out / "report.md"
    if "wall_time_s" in results:
        text = report.read_text(encoding="utf-8") + f"\nWall time: {results['wall_time_s']:.0f} s.\n"
        write_text_atomic(report, text)
    print(report.read_text(encoding="utf-8"))
    return 0


def run_moe(args: argparse.Namespace) -> int:
    from omnilm.lab.moe import MoeLabConfig, run_moe_lab, write_outputs

    return _run_lab(args, MoeLabConfig, run_moe_lab, write_outputs)


def run_mtp(args: argparse.Namespace) -> int:
    from omnilm.lab.mtp import MtpLabConfig, run_mtp_lab, write_outputs

    return _run_lab(args, MtpLabConfig, run_mtp_lab, write_outputs)


def run_selective(args: argparse.Namespace) -> int:
    from omnilm.lab.selective import SelectiveLabConfig, run_selective_lab, write_outputs

    return _run_lab(args, SelectiveLabConfig, run_selective_lab, write_outputs)


def run_objectives(args: argparse.Namespace) -> int:
    from omnilm.lab.objectives import ObjectivesLabConfig, run_objectives_lab, write_outputs

    return _run_lab(args, ObjectivesLabConfig, run_objectives_lab, write_outputs)


def _run_lab(args: argparse.Namespace, config_cls: type, run: Any, write_outputs: Any) -> int:
    """Run a lab (or, with --report-only, redraw it from results.json) and print its report with the wall time."""
    import json
    import time
    from pathlib import Path

    from omnilm.config import from_dict, load_config
    from omnilm.errors import UserError
    from omnilm.utils.atomic import write_json_atomic

    out = Path(args.out)
    if args.report_only:
        saved = out / "results.json"
        if not saved.is_file():
            raise UserError(f"{saved} not found: run the lab first")
        results = json.loads(saved.read_text(encoding="utf-8"))
        config = from_dict(config_cls, results["config"], source=str(saved))
    else:
        config = load_config(config_cls, args.config) if args.config else config_cls()
        began = time.perf_counter()
        results = run(config, out)
        results["wall_time_s"] = time.perf_counter() - began
        write_json_atomic(out / "results.json", results)
    write_outputs(results, config, out)
    report = (out / "report.md").read_text(encoding="utf-8")
    if "wall_time_s" in results:
        report += f"\nWall time: {results['wall_time_s']:.0f} s.\n"
        (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    return 0
