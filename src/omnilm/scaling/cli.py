"""CLI verb ``scaling``: ``sweep`` (train an IsoFLOP grid), ``fit`` (fit the laws to its runs), ``plan``
(compute-optimal size and tokens for a budget, or the tokens a size needs to reach a loss)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("scaling", help="scaling laws: sweep a grid of runs, fit the laws, plan a budget")
    verbs = p.add_subparsers(dest="scaling_verb", metavar="ACTION", required=True)

    s = verbs.add_parser("sweep", help="train several model sizes at several compute budgets (resumable)")
    s.add_argument("--recipe", "--config", dest="recipe", required=True,
                   help="pre-training stage config (YAML/JSON) used as the template of every run")
    s.add_argument("--sizes", nargs="+", required=True, help="model sizes WIDTHxLAYERS, e.g. 64x2 96x3 128x4")
    s.add_argument("--budgets", nargs="+", required=True, help="compute budgets in FLOPs, e.g. 1e13 3e13")
    s.add_argument("--head-width", type=int, default=32, help="per-head width; heads = WIDTH / this")
    s.add_argument("--min-steps", type=int, default=10, help="leave out cells with fewer optimiser steps")
    s.add_argument("--jobs", type=int, default=1, help="runs trained at once (each in its own process)")
    s.add_argument("--dry-run", action="store_true", help="print the grid without training")
    s.add_argument("--out", required=True, help="sweep folder: runs/<name>/ and runs.jsonl")
    s.set_defaults(handler=run_sweep_cli)

    f = verbs.add_parser("fit", help="fit Chinchilla (approaches 2 and 3) and Kaplan laws to a run table")
    f.add_argument("--runs", required=True, help="runs.jsonl (or the sweep folder holding it)")
    f.add_argument("--params", choices=("non_embedding", "total"), default="non_embedding",
                   help="parameter count used as N")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default=None, help="fit.json to write (default: next to the run table)")
    f.add_argument("--plot", default=None, help="PNG of IsoFLOP curves, frontier and loss vs compute "
                                                 "(default: scaling.png next to fit.json)")
    f.set_defaults(handler=run_fit_cli)

    q = verbs.add_parser("plan", help="compute-optimal N and D for a budget, or D for a target loss")
    q.add_argument("--fit", default=None, help="fit.json from `omnilm scaling fit` (default: Chinchilla's "
                                                "published law, without intervals)")
    budget = q.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="training compute in FLOPs")
    budget.add_argument("--gpu-hours", type=float, help="GPU hours (with --gpu and --mfu)")
    budget.add_argument("--params", type=float, help="model size N: report the tokens reaching --target-loss")
    q.add_argument("--gpu", default="h100", help="GPU model for --gpu-hours")
    q.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation for --gpu-hours")
    q.add_argument("--target-loss", type=float, help="with --params: the loss to reach")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.set_defaults(handler=run_plan_cli)


def run_sweep_cli(args: argparse.Namespace) -> int:
    from omnilm.config import read_mapping
    from omnilm.scaling.sweep import budgets_from_text, plan_sweep, run_sweep
    from omnilm.train.stage import StageConfig, load_tokenizer

    template = read_mapping(args.recipe)
    # The template has no budget of its own (each run gets max_steps); one step stands in while reading it.
    train = {k: v for k, v in (template.get("train") or {}).items() if k != "max_tokens"} | {"max_steps": 1}
    tokenizer = load_tokenizer(StageConfig.from_mapping(template | {"train": train}, source=args.recipe))
    runs, notes = plan_sweep(template, args.sizes, budgets_from_text(args.budgets), tokenizer.vocab_size,
                             args.head_width, args.min_steps)
    for note in notes:
        print(f"omnilm scaling sweep: {note}")
    for run in runs:
        print(f"{run.name}: N={run.n_params:,} (total {run.n_params_total:,}), {run.steps} steps, "
              f"D={run.tokens:,} tokens")
    if args.dry_run:
        return 0
    written = run_sweep(runs, args.out, args.jobs)
    print(f"omnilm scaling sweep: {len(written)} run(s) trained, {len(runs) - len(written)} already in the table; "
          f"table {args.out}/runs.jsonl")
    return 0


def run_fit_cli(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnilm.scaling.plots import plot_scaling
    from omnilm.scaling.report import fit_runs, read_fit, write_fit
    from omnilm.scaling.runs import read_runs, run_arrays

    records = read_runs(args.runs)
    report = fit_runs(records, args.params, args.bootstrap, args.seed)
    runs_path = Path(args.runs)
    out = Path(args.out) if args.out else (runs_path if runs_path.is_dir() else runs_path.parent) / "fit.json"
    write_fit(report, out)
    law, _, _ = read_fit(out)
    plot = plot_scaling(run_arrays(records, args.params), law, report, args.plot or out.with_name("scaling.png"))
    print(format_fit(report))
    print(f"wrote {out} and {plot}")
    return 0


def format_fit(report: dict) -> str:
    """A readable summary: each constant with its 95 % interval, beside Chinchilla's."""
    from omnilm.scaling.laws import ChinchillaLaw

    published = ChinchillaLaw().to_dict()
    fit, intervals = report["approach3"], report["bootstrap"]["intervals"]
    lines = [f"approach 3 on {report['n_runs']} runs (N = {report['params']} parameters):",
             f"{'':6} {'fit':>10} {'95% interval':>24} {'Chinchilla':>11}"]
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        low, high = intervals.get(key, (float("nan"), float("nan")))
        lines.append(f"{key:6} {fit[key]:>10.4g} {f'[{low:.4g}, {high:.4g}]':>24} {published[key]:>11.4g}")
    iso = report.get("approach2", {})
    lines.append(f"approach 2: N_opt ∝ C^{iso['a']:.3f}" if "a" in iso else f"approach 2: {iso.get('skipped')}")
    for key, label in (("L_N", "L(N)"), ("L_D", "L(D)")):
        law = report.get("kaplan", {}).get(key, {})
        lines.append(f"Kaplan {label} = (x_c/x)^{law['exponent']:.4f}, x_c = {law['x_c']:.3g}" if "exponent" in law
                     else f"Kaplan {label}: {law.get('skipped')}")
    return "\n".join(lines)


def run_plan_cli(args: argparse.Namespace) -> int:
    from omnilm.errors import UserError
    from omnilm.scaling.laws import TOKENS_PER_PARAM, ChinchillaLaw, flops_from_gpu_hours, rule_of_thumb_allocation
    from omnilm.scaling.report import plan_budget, plan_tokens, read_fit

    law, samples = (ChinchillaLaw(), []) if args.fit is None else read_fit(args.fit)[:2]
    if args.params is not None:
        if args.target_loss is None:
            raise UserError("--params needs --target-loss")
        plan = plan_tokens(law, samples, args.params, args.target_loss)
        text = (f"N = {plan['N']:.4g} reaches loss {plan['target_loss']} after D = {plan['D']:.4g} tokens "
                f"({plan['flops']:.4g} FLOPs)")
        if "D_interval" in plan:
            text += f"; 95% interval [{plan['D_interval'][0]:.4g}, {plan['D_interval'][1]:.4g}]"
    else:
        flops = args.flops if args.flops is not None else flops_from_gpu_hours(args.gpu_hours, args.gpu, args.mfu)
        plan = plan_budget(law, samples, flops)
        text = (f"C = {flops:.4g} FLOPs: N_opt = {plan['N_opt']:.4g}, D_opt = {plan['D_opt']:.4g} tokens "
                f"({plan['tokens_per_param']:.1f} tokens/parameter), predicted loss {plan['loss']:.4f}")
        if "N_opt_interval" in plan:
            (nl, nh), (dl, dh) = plan["N_opt_interval"], plan["D_opt_interval"]
            text += f"\n95% intervals: N_opt [{nl:.4g}, {nh:.4g}], D_opt [{dl:.4g}, {dh:.4g}]"
        n20, d20 = rule_of_thumb_allocation(flops)
        plan["rule_of_thumb"] = {"N": n20, "D": d20}
        text += (f"\nrule of thumb ({TOKENS_PER_PARAM:.0f} tokens/parameter, Chinchilla's approaches 1-2): "
                 f"N = {n20:.4g}, D = {d20:.4g}")
    print(json.dumps(plan) if args.json else text)
    return 0
