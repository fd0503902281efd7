"""Growing a model folder: upcycling to experts, depth up-scaling or width growth, read and written in the Hugging
Face layout (the tokenizer is copied along). Shared by ``omnilm upcycle`` / ``omnilm grow`` and the recipe job
``grow``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omnilm.errors import UserError

METHODS = ("upcycle", "depth", "width")


def grow_folder(model_dir: str | Path, out: str | Path, method: str, **options: Any) -> dict[str, Any]:
    """Load ``model_dir``, grow it by ``method`` with ``options`` and save it to ``out``; a summary.

    ``upcycle``: experts, top_k, granularity (1), seed (0) — see omnilm.model.upcycle.
    ``depth``: mode (interleave), overlap (0), preserve (True) — see omnilm.model.growth.grow_depth.
    ``width``: d_model, d_ff, seed (0) — see omnilm.model.growth.grow_width.
    The summary says whether the function was checked preserved (max |Δ logit| on a random batch).
    """
    from omnilm.model.growth import grow_depth, grow_width
    from omnilm.model.hf import load_pretrained, save_pretrained
    from omnilm.model.upcycle import upcycle
    from omnilm.tokenizer import Tokenizer

    model = load_pretrained(model_dir)
    if method == "upcycle":
        allowed, grow = {"experts", "top_k", "granularity", "seed"}, upcycle
        if "experts" not in options or "top_k" not in options:
            raise UserError("upcycle needs experts and top_k")
        args = dict(n_experts=int(options["experts"]), top_k=int(options["top_k"]),
                    granularity=int(options.get("granularity", 1)), seed=int(options.get("seed", 0)))
    elif method == "depth":
        allowed, grow = {"mode", "overlap", "preserve"}, grow_depth
        args = dict(mode=options.get("mode", "interleave"), overlap=int(options.get("overlap", 0)),
                    preserve=bool(options.get("preserve", True)))
    elif method == "width":
        allowed, grow = {"d_model", "d_ff", "seed"}, grow_width
        args = {k: (int(v) if v is not None else None) for k, v in options.items()}
    else:
        raise UserError(f"unknown growth method {method!r}; expected one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"{method}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    grown = grow(model, **args)
    ids = torch.randint(0, model.config.vocab_size, (1, min(32, model.config.max_seq_len)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        change = float((grown(ids) - model(ids)).abs().max())
    tokenizer = Tokenizer.from_dir(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None
    save_pretrained(grown, out, tokenizer=tokenizer)
    return {"method": method, "params_before": model.num_params(), "params_after": grown.num_params(),
            "n_layer": grown.config.n_layer, "d_model": grown.config.d_model, "n_experts": grown.config.n_experts,
            "max_logit_change": change}
