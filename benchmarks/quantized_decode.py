"""Batch-1 decoding of quantized models against fp32, and the bound set by reading fp32 weights.

What is measured
    For each shape a model with seeded random weights is built (as in ``decode.py``), laid out for decoding, and
    copies quantized to int8 (per channel) and int4 (group 128) with ``omnilm.infer.quantize.quantize_model``:
    with the LM head in fp32 (``omnilm quantize``'s default) and with the head quantized too
    (``--quantize-head``; in gpt2-124m the tied head is a third of all weights). Each greedily decodes
    ``--new-tokens`` tokens from the same ``--prompt-len``-token prompt; tokens/s = new tokens / wall time of the
    whole call (prefill included). One warm-up, then ``--repeats`` rounds interleaving fp32, int8, int4; median
    (min-max) reported.

    "matvec bound": tokens/s if a decode step did nothing but one batch-1 fp32 matrix-vector product with every
    linear weight of the model (the head included), timed on the same weights in the same layout: the memory
    bound fp32 decoding cannot pass. The fp32 row shows its share of that bound; the quantized rows their speed-up
    over fp32. ``OMNILM_KERNELS=0`` gives the dequantising path for comparison.

    llama.cpp (when ``llama-cpp-python`` is installed, ``--no-llama-cpp`` to skip): the same weights exported with
    ``omnilm export gguf`` as f32, q8_0 and q4_0, run with the same thread count, batch 1, the same prompt and the
    same number of greedy tokens, interleaved in the same rounds. Each llama.cpp row is paired with omnilm's
    precision peer (f32 ↔ fp32, q8_0 ↔ int8+head, q4_0 ↔ int4+head: llama.cpp quantizes its head too) and the
    ratio column gives omnilm / llama.cpp. The random models carry a placeholder vocabulary (a small trained
    tokenizer padded with unused entries), which changes nothing in the arithmetic.

How to run
    .venv/bin/python benchmarks/quantized_decode.py                      # gpt2-124m and qwen2.5-0.5b
    .venv/bin/python benchmarks/quantized_decode.py --shapes gpt2-124m --repeats 3
    .venv/bin/python benchmarks/quantized_decode.py --quick              # 2 layers, a smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decode import build_reference, model_config, omnilm_generate, random_prompts

from omnilm.infer.layout import prepare_for_decoding
from omnilm.infer.quantize import quantize_model
from omnilm.kernels import qlinear
from omnilm.model.transformer import Transformer

SHAPES = ("gpt2-124m", "qwen2.5-0.5b")
# name -> (bits, quantize the LM head too)
VARIANTS = {"fp32": (None, False), "int8": (8, False), "int4": (4, False), "int8+head": (8, True),
            "int4+head": (4, True)}
GROUP_SIZE = 128
# llama.cpp file type -> the omnilm variant of the same precision
LLAMA_CPP_PEERS = {"f32": "fp32", "q8_0": "int8+head", "q4_0": "int4+head"}


def llama_cpp_models(reference: Transformer, folder: Path, threads: int) -> dict[str, object]:
    """The reference exported as GGUF at each precision and loaded by llama.cpp (empty when it is not installed)."""
    try:
        import llama_cpp
    except ImportError:
        print("  llama-cpp-python not installed: no llama.cpp rows (pip install -e '.[bench]')", flush=True)
        return {}
    from omnilm.export.gguf import export_gguf
    from omnilm.tokenizer import train_bpe

    vocab = train_bpe(["placeholder vocabulary for a random model"] * 4, vocab_size=300)
    models = {}
    for kind in LLAMA_CPP_PEERS:
        path = export_gguf(reference, vocab, folder / f"model-{kind}.gguf", kind)  # type: ignore[arg-type]
        models[f"llama.cpp {kind}"] = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads,
                                                      n_threads_batch=threads, n_batch=512, verbose=False)
    return models


def llama_cpp_generate(llm: object, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of the single prompt, exactly ``new_tokens`` ids (EOS does not stop it)."""
    out = []
    for token in llm.generate(prompts[0].tolist(), temp=0.0, top_k=1, reset=True):  # type: ignore[attr-defined]
        out.append(token)
        if len(out) == new_tokens:
            break
    return torch.tensor([out])


@torch.inference_mode()
def matvec_tokens_per_second(model: Transformer, repeats: int) -> float:
    """1 / (time of one batch-1 product with every linear weight): the fp32 weight-reading bound."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    vectors = [torch.randn(1, w.shape[1]) for w in weights]

    def one_pass() -> float:
        start = time.perf_counter()
        for w, v in zip(weights, vectors, strict=True):
            F.linear(v, w)
        return time.perf_counter() - start

    one_pass()
    return 1.0 / statistics.median(one_pass() for _ in range(max(5, repeats * 5)))


def variants(reference: Transformer) -> dict[str, Transformer]:
    models = {}
    for name, (bits, head) in VARIANTS.items():
        model = copy.deepcopy(reference)
        if bits is not None:
            quantize_model(model, bits, GROUP_SIZE, skip=() if head else ("lm_head",))
        models[name] = prepare_for_decoding(model)
    return models


@torch.inference_mode()
def bench_shape(shape: str, args: argparse.Namespace) -> list[str]:
    config = model_config(shape, args.quick)
    with tempfile.TemporaryDirectory(prefix="omnilm-qbench-") as tmp:
        reference = build_reference(config, Path(tmp), args.seed)
        peers = llama_cpp_models(reference, Path(tmp), torch.get_num_threads()) if args.llama_cpp else {}
    models = variants(reference)
    bound = matvec_tokens_per_second(models["fp32"], args.repeats)
    prompts = random_prompts(config.vocab_size, 1, args.prompt_len, args.seed)
    runners = {name: (omnilm_generate, model) for name, model in models.items()}
    runners |= {name: (llama_cpp_generate, llm) for name, llm in peers.items()}
    tokens = {name: run(model, prompts, args.new_tokens) for name, (run, model) in runners.items()}  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, (run, model) in runners.items():
            start = time.perf_counter()
            run(model, prompts, args.new_tokens)
            speeds[name].append(args.new_tokens / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    rows = [f"| {shape} | matvec bound (fp32 weights) | {bound:.1f} | | | |"]
    for name, values in speeds.items():
        median = medians[name]
        if name in models:
            vs_fp32 = f"{median / medians['fp32']:.2f}×" if name != "fp32" else f"{median / bound:.0%} of bound"
            label, vs_peer = f"omnilm {name}", ""
        else:
            peer = LLAMA_CPP_PEERS[name.split()[-1]]
            label, vs_fp32 = name, f"{median / medians['fp32']:.2f}×"
            vs_peer = f"omnilm {peer} {medians[peer] / median:.2f}×"
        same = (tokens[name] == tokens["fp32"]).float().mean().item()
        rows.append(f"| {shape} | {label} | {median:.1f} ({min(values):.1f}–{max(values):.1f}) | {vs_fp32} "
                    f"| {vs_peer} | {same:.0%} |")
    print(f"  done: {shape}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 layers, 8 new tokens: a smoke run")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="omnilm rows only")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 8, 1
    kernels = qlinear()
    rows = [row for shape in args.shapes for row in bench_shape(shape, args)]
    print(f"\n# Batch-1 decoding, {torch.get_num_threads()} threads, kernels: "
          f"{kernels.vector_isa() if kernels else 'off (dequantising path)'}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median (min-max) of {args.repeats}\n")
    print("| shape | path | tokens/s | vs omnilm fp32 | omnilm / llama.cpp | tokens equal to omnilm fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
