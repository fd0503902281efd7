"""Decode throughput of omnilm versus Hugging Face transformers ``generate``, identical weights (CPU or CUDA).

What is measured
    For each case (model shape x dtype x batch size) a model with random weights is built with omnilm
    (``torch.manual_seed``), written with ``omnilm.model.hf.save_pretrained`` and loaded back with
    ``transformers.AutoModelForCausalLM.from_pretrained``, so both implementations run the very same
    weights. Both get the same random prompts (``--prompt-len`` tokens per row, no padding) and greedily
    decode exactly ``--new-tokens`` tokens with no end-of-sequence stopping.

    tokens/s = batch x new_tokens / wall time of one whole generate call. The prefill of the prompt is
    included in that time (it is not a pure per-step decode figure). Each implementation gets one
    warm-up call, then ``--repeats`` timed calls (omnilm and transformers interleaved: A B A B ...); the table
    reports the median and the min-max range.

    "same tokens" says whether both produced identical token ids. In float32 they should; in bfloat16
    small numeric differences may legitimately flip a near-tie argmax, so there it is only reported.

How to run
    .venv/bin/python benchmarks/decode.py                       # full run: both shapes, batch 1 and 8, fp32 + bf16
    .venv/bin/python benchmarks/decode.py --quick --shapes gpt2-124m --batch-sizes 1 --dtypes float32
    .venv/bin/python benchmarks/decode.py --markdown-out decode.md
    .venv/bin/python benchmarks/decode.py --device cuda --dtypes bfloat16 --batch-sizes 1 8 32

``--quick`` keeps the shapes' widths and vocabularies but uses 2 layers and 8 new tokens (a smoke run,
not a meaningful number).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from omnilm.infer.generate import generate_ids
from omnilm.infer.layout import prepare_for_decoding
from omnilm.infer.sampling import SamplingParams
from omnilm.model.config import ModelConfig, get_preset
from omnilm.model.hf import save_pretrained
from omnilm.model.transformer import Transformer

SHAPES = ("gpt2-124m", "qwen2.5-0.5b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUICK_LAYERS = 2
QUICK_NEW_TOKENS = 8
PAD_ID = 0


@dataclass(frozen=True)
class Workload:
    """What every generate call does."""

    prompt_len: int
    new_tokens: int
    repeats: int


@dataclass(frozen=True)
class Result:
    """One row of the table."""

    shape: str
    dtype: str
    batch: int
    omnilm_tps: float
    hf_tps: float
    same_tokens: bool
    omnilm_range: tuple[float, float]
    hf_range: tuple[float, float]

    @property
    def ratio(self) -> float:
        return self.omnilm_tps / self.hf_tps


# ---------------------------------------------------------------------------------------------
# models


def model_config(shape: str, quick: bool) -> ModelConfig:
    """The preset's shape; with ``quick`` only a couple of layers."""
    return get_preset(shape, n_layer=QUICK_LAYERS) if quick else get_preset(shape)


def build_reference(config: ModelConfig, folder: Path, seed: int) -> Transformer:
    """A float32 omnilm model with seeded random weights, also saved to ``folder`` in the HF layout."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    save_pretrained(model, folder)
    return model


def omnilm_in_dtype(reference: Transformer, dtype: torch.dtype, device: str = "cpu") -> Transformer:
    """``reference`` cast to ``dtype`` on ``device`` and laid out for decoding, as ``omnilm generate`` does (a copy,
    so the float32 original stays intact for later dtypes)."""
    return prepare_for_decoding(copy.deepcopy(reference).to(device=device, dtype=dtype))


def load_hf(folder: Path, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """The same weights through transformers."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


# ---------------------------------------------------------------------------------------------
# generation


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """(batch, prompt_len) token ids, avoiding the pad id so nothing can be mistaken for padding."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch, prompt_len), generator=generator)


def omnilm_generate(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy, no EOS: (batch, new_tokens) generated ids."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    steps = list(generate_ids(model, prompts.tolist(), params, eos_ids=(), pad_id=PAD_ID))
    return torch.stack(steps, dim=1)


def hf_generate(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy, no EOS, exactly ``new_tokens``: (batch, new_tokens) generated ids."""
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=PAD_ID,
    )
    return out[:, prompts.shape[1]:]


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Wall time of one call and its result (waiting for queued GPU work to finish)."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - start, result


def check_length(name: str, tokens: torch.Tensor, batch: int, new_tokens: int) -> None:
    if tuple(tokens.shape) != (batch, new_tokens):
        raise RuntimeError(f"{name} produced {tuple(tokens.shape)} tokens, expected {(batch, new_tokens)}")


@torch.inference_mode()
def run_case(omni: Transformer, hf: torch.nn.Module, prompts: torch.Tensor,
             work: Workload) -> tuple[list[float], list[float], bool]:
    """Tokens/s of every timed call of each implementation and whether their tokens agree."""
    run_omni = partial(omnilm_generate, omni, prompts, work.new_tokens)
    run_hf = partial(hf_generate, hf, prompts, work.new_tokens)
    omni_tokens, hf_tokens = run_omni(), run_hf()  # warm-up
    batch = prompts.shape[0]
    check_length("omnilm", omni_tokens, batch, work.new_tokens)
    check_length("transformers", hf_tokens, batch, work.new_tokens)
    generated = batch * work.new_tokens
    omni_tps, hf_tps = [], []
    for _ in range(work.repeats):
        seconds, omni_tokens = timed(run_omni)
        omni_tps.append(generated / seconds)
        seconds, hf_tokens = timed(run_hf)
        hf_tps.append(generated / seconds)
    return omni_tps, hf_tps, torch.equal(omni_tokens, hf_tokens.to(omni_tokens))


def bench_shape(shape: str, dtypes: Sequence[str], batch_sizes: Sequence[int], work: Workload,
                quick: bool, seed: int, device: str = "cpu") -> list[Result]:
    """All dtype x batch cases of one shape, sharing one set of random weights."""
    config = model_config(shape, quick)
    if config.family == "gpt2" and work.prompt_len + work.new_tokens > config.max_seq_len:
        raise SystemExit(f"{shape}: prompt-len + new-tokens exceeds the context of {config.max_seq_len}")
    results = []
    with tempfile.TemporaryDirectory(prefix="omnilm-bench-") as tmp:
        reference = build_reference(config, Path(tmp), seed)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            omni, hf = omnilm_in_dtype(reference, dtype, device), load_hf(Path(tmp), dtype, device)
            for batch in batch_sizes:
                prompts = random_prompts(config.vocab_size, batch, work.prompt_len, seed + batch).to(device)
                omni_tps, hf_tps, same = run_case(omni, hf, prompts, work)
                results.append(Result(shape, dtype_name, batch, statistics.median(omni_tps), statistics.median(hf_tps),
                                      same, (min(omni_tps), max(omni_tps)), (min(hf_tps), max(hf_tps))))
                print(f"  done: {shape} {dtype_name} batch={batch}", flush=True)
            del omni, hf
    return results


# ---------------------------------------------------------------------------------------------
# report


def header(work: Workload, quick: bool) -> str:
    lines = [
        "# Decode throughput: omnilm vs transformers (same weights, greedy)",
        "",
        f"prompt {work.prompt_len} tokens, {work.new_tokens} new tokens; median (min-max) of {work.repeats} "
        "interleaved runs after 1 warm-up"
        + (f"; QUICK smoke run ({QUICK_LAYERS} layers)" if quick else ""),
        "tok/s = batch x new_tokens / wall time of the whole generate call (prompt prefill included).",
    ]
    return "\n".join(lines)


def table(results: Sequence[Result]) -> str:
    rows = [
        "| shape | dtype | batch | omnilm tok/s | transformers tok/s | ratio (omnilm/transformers) | same tokens |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    def cell(median: float, spread: tuple[float, float]) -> str:
        return f"{median:.1f} ({spread[0]:.1f}-{spread[1]:.1f})"

    rows += [f"| {r.shape} | {r.dtype} | {r.batch} | {cell(r.omnilm_tps, r.omnilm_range)} | "
             f"{cell(r.hf_tps, r.hf_range)} | {r.ratio:.2f}x | {'yes' if r.same_tokens else 'no'} |" for r in results]
    return "\n".join(rows)


def environment() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"torch.get_num_threads() = {torch.get_num_threads()}, {device}")


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--new-tokens", type=int, default=None,
                        help=f"tokens to generate (default 64, or {QUICK_NEW_TOKENS} with --quick)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_LAYERS} layers and {QUICK_NEW_TOKENS} new tokens")
    parser.add_argument("--markdown-out", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = QUICK_NEW_TOKENS if args.quick else 64
    for flag in ("new_tokens", "prompt_len", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batch_sizes):
        parser.error("--batch-sizes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    work = Workload(args.prompt_len, args.new_tokens, args.repeats)
    results: list[Result] = []
    for shape in args.shapes:
        results += bench_shape(shape, args.dtypes, args.batch_sizes, work, args.quick, args.seed, args.device)
    report = "\n\n".join([header(work, args.quick), table(results), environment()]) + "\n"
    print()
    print(report, end="")
    if args.markdown_out is not None:
        args.markdown_out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
