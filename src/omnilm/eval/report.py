"""``report.md`` for a recipe run: what ran, how long, the curves, samples and every evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omnilm.utils.atomic import write_text_atomic


def _last_sample(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / "samples.jsonl"
    if not path.is_file():
        return None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _model_line(final_dir: Path) -> str:
    import torch

    from omnilm.model.hf import read_config
    from omnilm.model.transformer import Transformer
    from omnilm.omni.thinker import is_thinker_folder

    def decoder(config: Any, params: int) -> str:
        return (f"{config.family}, {config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads "
                f"({config.kv_heads} KV), vocab {config.vocab_size}, {params / 1e6:.2f}M parameters")

    if is_thinker_folder(final_dir):
        from omnilm.omni.thinker import Thinker, read_thinker_config

        thinker_config = read_thinker_config(final_dir)
        with torch.device("meta"):
            thinker = Thinker(thinker_config)
        count = {name: sum(p.numel() for p in getattr(thinker, name).parameters())
                 for name in ("decoder", "audio_tower", "visual")}
        a, v = thinker_config.audio, thinker_config.vision
        return (f"Thinker: decoder {decoder(thinker_config.text, count['decoder'])}; audio encoder {a.encoder_layers}"
                f" layers, d_model {a.d_model}, {count['audio_tower'] / 1e6:.2f}M; vision encoder {v.depth} layers, "
                f"width {v.hidden_size}, {count['visual'] / 1e6:.2f}M")
    config = read_config(final_dir)
    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(config).parameters())
    return decoder(config, params)


def write_report(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``<run_dir>/report.md`` from a recipe summary (see ``omnilm.recipe.runner.run_recipe``)."""
    run_dir = Path(run_dir)
    out = [f"# omnilm run: {summary['recipe']}", "",
           f"Recipe: {summary['source']}. Wall time of this invocation: {summary.get('seconds', 0):.0f} s.", ""]
    if summary.get("jobs"):
        out += ["## Data", "", "| job | result |", "|---|---|"]
        for name, result in summary["jobs"].items():
            shown = ", ".join(f"{k}: {_fmt(v)}" for k, v in result.items() if not isinstance(v, (dict, list)))
            out.append(f"| {name} | {shown} |")
        out.append("")
    for name, stage in summary.get("stages", {}).items():
        stage_dir = run_dir / name
        model = _model_line(run_dir / stage["final"])
        out += [f"## Stage `{name}` ({stage['type']})", "",
                f"{stage['steps']} optimizer steps in {stage['seconds']:.0f} s. Model: {model}.", ""]
        last = stage.get("last_metrics") or {}
        shown = {k: v for k, v in last.items() if k in ("loss", "val_loss", "val_bpb", "tokens_per_s", "tokens")}
        if shown:
            out += ["| " + " | ".join(shown) + " |", "|" + "---:|" * len(shown),
                    "| " + " | ".join(_fmt(v) for v in shown.values()) + " |", ""]
        if (stage_dir / "loss.png").is_file():
            out += [f"![{name} loss curve]({name}/loss.png)", ""]
        sample = _last_sample(stage_dir)
        if sample:
            # Post-training stages sample a chat reply to the prompt; pre-training continues the text.
            shown = (f"{sample['prompt']}{sample['text']}" if stage["type"] in ("pretrain", "midtrain")
                     else f"user: {sample['prompt']}\nassistant: {sample['text']}")
            out += [f"Sample at step {sample['step']} (greedy):", "", "```", shown, "```", ""]
        for eval_name, metrics in stage.get("evals", {}).items():
            head = {k: v for k, v in metrics.items() if "/" not in k}
            out.append(f"- **{eval_name}**: " + ", ".join(f"{k} {_fmt(v)}" for k, v in head.items()))
            per = {k: v for k, v in metrics.items() if "/" in k}
            if per:
                groups: dict[str, dict[str, float]] = {}
                for key, value in per.items():
                    group, metric = key.rsplit("/", 1)
                    groups.setdefault(group, {})[metric] = value
                metric_names = sorted({m for g in groups.values() for m in g})
                out += ["", "  | " + eval_name + " | " + " | ".join(metric_names) + " |",
                        "  |---|" + "---:|" * len(metric_names)]
                out += [f"  | {g} | " + " | ".join(_fmt(vals.get(m, "")) for m in metric_names) + " |"
                        for g, vals in groups.items()]
                out.append("")
        out.append("")
    if summary.get("retention"):
        out += ["## Retention", "", "Each evaluation measured after every stage that followed its own "
                "(what later stages kept or forgot).", "", summary["retention"]]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(out) + "\n")
    return path
