"""omnilm models in lm-evaluation-harness: the model class ``omnilm`` and running tasks with it.

``OmniLM`` scores requests with omnilm's own model code, so every folder ``omnilm.model.hf.load_pretrained``
reads (quantized ones included) can be evaluated on any lm-eval task. Requests are scored exactly as lm-eval's
``hf`` model scores them, so on an exported folder both give the same numbers:

- tokens: ``TemplateLM`` splits context and continuation (the whole text is encoded and cut at the context's
  length; trailing context spaces move to the continuation); an empty context becomes the prefix token (BOS, else
  EOS). ``tok_encode`` adds the tokenizer's own special tokens, as transformers' tokenizers do by default.
- ``loglikelihood``: the input is ``(context + continuation)[-(max_length + 1):][:-1]`` and its last
  ``len(continuation)`` positions are scored; log-softmax in float32; ``is_greedy`` when every continuation
  token is the argmax.
- ``loglikelihood_rolling``: lm-eval's ``get_rolling_token_windows`` (prefix token, ``max_length``, one token of
  context) made disjoint, each window one loglikelihood request, summed in window order.
- ``generate_until``: the context's last ``max_length - max_gen_toks`` tokens, KV-cache generation
  (``TextGenerator``: left-padded batches, EOS and stop strings), the text cut before the first stop string.

Batching: requests are sorted longest first and cut into right-padded batches of at most ``batch_size``
requests and ``max_batch_tokens`` tokens; attention is causal, so right padding never reaches a real token and
needs no mask. Only the scored positions go through the output head (a (N, vocab) matrix, not (B, T, vocab)).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval looks its own models up lazily only while its registry is empty)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import nn

from omnilm.tokenizer import Tokenizer

MODEL_NAME = "omnilm"
DTYPES = ("float32", "bfloat16", "float16")
SAMPLING_KEYS = ("top_k", "top_p", "min_p", "repetition_penalty")  # generation kwargs passed on to sampling


@register_model(MODEL_NAME)
class OmniLM(TemplateLM):
    """An omnilm model (a folder, or a loaded model and tokenizer) as an lm-eval language model."""

    def __init__(self, pretrained: str | None = None, model: nn.Module | None = None,
                 tokenizer: Tokenizer | None = None, dtype: str | torch.dtype | None = None, device: str = "cpu",
                 batch_size: int | str | None = 32, max_batch_tokens: int | str = 16384,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, **unused: Any) -> None:
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError("OmniLM: pass either pretrained (a model folder) or model and tokenizer")
        unused = {k: v for k, v in unused.items() if v is not None and k != "max_batch_size"}
        if unused:
            raise ValueError(f"OmniLM: unknown arguments {sorted(unused)}")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"OmniLM: dtype {dtype!r} not one of {', '.join(DTYPES)}")
            dtype = getattr(torch, dtype)
        if pretrained is not None:
            from omnilm.model.hf import load_pretrained

            model = load_pretrained(pretrained, dtype=dtype, device=device)
            tokenizer = Tokenizer.from_dir(pretrained)
        if tokenizer is None:
            raise ValueError("OmniLM: a loaded model needs its tokenizer")
        self.folder = str(pretrained) if pretrained is not None else None
        self.net = model.eval()
        self.omni_tokenizer = tokenizer
        self.batch_size = 32 if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self._max_length = int(max_length) if max_length else self.net.config.max_seq_len
        self._max_gen_toks = int(max_gen_toks)
        self._generator = None
        self._eos_ids: list[int] = []  # the generator's own end-of-sequence ids (stop strings add per request)

    # --- tokens ---------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.omni_tokenizer.eos_id
        return eos if eos is not None else self.net.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.omni_tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids; the tokenizer's own special tokens (a BOS template, if it has one) are added unless
        ``add_special_tokens`` is False or the text already starts with the BOS text."""
        add = True if add_special_tokens is None else add_special_tokens
        bos = self.omni_tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add = False
        return self.omni_tokenizer.backend.encode(string, add_special_tokens=add).ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.omni_tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # --- loglikelihood --------------------------------------------------------------------------------------
    def _scored_logits(self, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """Logits (N, vocab) at the ``scored`` (B, T bool) positions of ``ids`` (B, T)."""
        if hasattr(self.net, "hidden_states") and hasattr(self.net, "lm_head"):
            hidden = self.net.hidden_states(ids)  # (B, T, d_model)
            return self.net.lm_head(hidden[scored])  # (N, vocab)
        return self.net(ids)[scored]

    @torch.inference_mode()
    def _score_batch(self, sequences: list[list[int]], n_scored: list[int]) -> list[tuple[float, bool]]:
        """Sum of log p of the last ``n_scored[i]`` tokens of each sequence given what precedes them, and whether
        each of them is the argmax. The model sees ``sequence[:-1]`` and predicts ``sequence[1:]``."""
        device = self.device
        lengths = torch.tensor([len(s) - 1 for s in sequences], device=device)  # (B,) input lengths
        inputs = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(s[:-1]) for s in sequences], batch_first=True, padding_value=0).to(device)  # (B, T)
        targets = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(s[1:]) for s in sequences], batch_first=True, padding_value=0).to(device)  # (B, T)
        position = torch.arange(inputs.shape[1], device=device)[None]  # (1, T)
        first = lengths - torch.tensor(n_scored, device=device)  # (B,) first scored input position
        scored = (position >= first[:, None]) & (position < lengths[:, None])  # (B, T)
        logits = self._scored_logits(inputs, scored).float()  # (N, vocab), rows in (batch, position) order
        wanted = targets[scored]  # (N,)
        token_logp = torch.log_softmax(logits, dim=-1).gather(1, wanted[:, None]).squeeze(1)  # (N,)
        missed = (logits.argmax(dim=-1) != wanted).float()  # (N,) 1 where greedy decoding would differ
        row = scored.nonzero()[:, 0]  # (N,) batch row of each scored position
        totals = torch.zeros(len(sequences), device=device).index_add_(0, row, token_logp)
        misses = torch.zeros(len(sequences), device=device).index_add_(0, row, missed)
        return [(float(t), bool(m == 0)) for t, m in zip(totals.tolist(), misses.tolist(), strict=True)]

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``requests``: (cache key, context ids, continuation ids); results in the same order."""
        sequences, n_scored = [], []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError("OmniLM: every request needs a context and 1..max_length continuation tokens")
            sequences.append((context + continuation)[-(self.max_length + 1):])
            n_scored.append(len(continuation))
        order = sorted(range(len(requests)), key=lambda i: -len(sequences[i]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        start = 0
        while start < len(order):
            width = len(sequences[order[start]])  # the longest of this batch
            size = max(1, min(self.batch_size, self.max_batch_tokens // width))
            batch = order[start:start + size]
            scores = self._score_batch([sequences[i] for i in batch], [n_scored[i] for i in batch])
            for i, score in zip(batch, scores, strict=True):
                results[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
            start += size
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                       prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[index] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------------------------
    def _sampling(self, gen_kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
        """SamplingParams and stop strings for one request's generation kwargs (lm-eval's conventions)."""
        from omnilm.infer.sampling import SamplingParams

        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos not in until:
            until.append(eos)
        max_new = next((int(kwargs.pop(k)) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                        if kwargs.get(k) is not None), self.max_gen_toks)
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        extra = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
        seed = kwargs.pop("seed", None)
        if kwargs:
            warnings.warn(f"OmniLM: generation kwargs {sorted(kwargs)} are not supported and were ignored",
                          stacklevel=2)
        params = SamplingParams(max_new_tokens=max_new, temperature=temperature if do_sample else 0.0,
                                stop=tuple(s for s in until if s), seed=seed, **extra)
        return params, until

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from omnilm.infer.text import TextGenerator

        if self._generator is None:
            self._generator = TextGenerator(self.net, self.omni_tokenizer)
            self._eos_ids = list(self._generator.eos_ids)
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            params, until = self._sampling(requests[indices[0]].args[1])
            # a stop string that is a control token (a chat model's <|im_end|>) never appears in decoded text:
            # it ends the sequence as a token instead
            self._generator.eos_ids = sorted(set(self._eos_ids) | self._control_ids(until))
            room = self.max_length - params.max_new_tokens
            if room <= 0:
                raise ValueError(f"OmniLM: max_gen_toks {params.max_new_tokens} leaves no room for a context in "
                                 f"max_length {self.max_length}")
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                texts = self._generator.generate([prompts[i] for i in batch], params)
                for i, text in zip(batch, texts, strict=True):
                    for stop in until:  # already cut at the first stop; as lm-eval's own models do, once more
                        text = text.split(stop)[0] if stop else text
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]

    def _control_ids(self, strings: Sequence[str]) -> set[int]:
        """Ids of the ``strings`` that are single control tokens (decoding drops them)."""
        ids = (self.omni_tokenizer.token_to_id(s) for s in strings if s)
        return {i for i in ids if i is not None and self.omni_tokenizer.decode([i], skip_special_tokens=True) == ""}

    # --- chat and records -----------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"omnilm:{self.folder or 'model'}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        from omnilm.tokenizer.chat import CHAT_TEMPLATE

        return self.omni_tokenizer.extra_config.get("chat_template", CHAT_TEMPLATE)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from omnilm.tokenizer.chat import format_chat

        return format_chat(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.net.parameters())
        dtype = next(self.net.parameters()).dtype
        return {"model_folder": self.folder, "model_num_parameters": params, "model_dtype": str(dtype),
                "max_length": self.max_length}


# --- running tasks ----------------------------------------------------------------------------------------------
def evaluate(lm: OmniLM | str, tasks: Sequence[str], *, model_args: dict[str, Any] | None = None,
             task_dir: str | Path | None = None, include_path: Sequence[str | Path] = (),
             bios: str | Path | None = None, arithmetic: str | Path | None = None, num_fewshot: int | None = None,
             limit: int | float | None = None, log_samples: bool = False, seed: int = 0,
             bootstrap_iters: int = 100_000, apply_chat_template: bool = False) -> dict[str, Any]:
    """lm-eval's results for ``tasks`` (names, tags or groups) on ``lm`` (an ``OmniLM``, or a registered lm-eval
    model name with ``model_args``).

    omnilm's local tasks (``omnilm.eval.lm_tasks``) are written into ``task_dir`` first when a task asks for them;
    without local tasks only the ``include_path`` folders and lm-eval's built-in tasks are searched.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from omnilm.eval.lm_tasks import is_local, is_retrieval, write_tasks

    paths = [str(p) for p in include_path]
    local = [t for t in tasks if is_local(t)]
    if any(not is_retrieval(t) for t in local):  # retrieval tasks arrive in include_path, sized for the tokenizer
        if task_dir is None:
            raise ValueError(f"tasks {local} are written from synthetic data: pass a task_dir to write them into")
        paths.insert(0, str(write_tasks(task_dir, bios=bios, arithmetic=arithmetic, seed=seed)))
    manager = TaskManager(include_path=paths or None, include_defaults=len(local) < len(tasks))
    return simple_evaluate(model=lm, model_args=model_args, tasks=list(tasks), num_fewshot=num_fewshot,
                           limit=limit, log_samples=log_samples, task_manager=manager, random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                           bootstrap_iters=bootstrap_iters, apply_chat_template=apply_chat_template)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` for every numeric metric (``<metric>_<filter>`` unless the filter is none;
    ``examples``: how many were scored), standard errors left out; plus ``acc``, the mean accuracy of the tasks that
    report one."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, flt = key.partition(",")
            if name == "alias" or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if name == "sample_len":
                name = "examples"
            out[f"{task}/{name if flt in ('', 'none') else f'{name}_{flt}'}"] = float(value)
    accs = [v for k, v in out.items() if k.endswith("/acc") and math.isfinite(v)]
    return ({"acc": sum(accs) / len(accs)} if accs else {}) | out


def write_results(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``results.json`` (lm-eval's results, without per-sample logs), ``results.md`` (lm-eval's markdown tables)
    and, when samples were logged, ``samples_<task>.jsonl``; returns the paths written."""
    from omnilm.utils.atomic import write_text_atomic

    out = Path(out)
    results = dict(results)
    samples = results.pop("samples", None) or {}
    written = {"json": out / "results.json", "markdown": out / "results.md"}
    write_text_atomic(written["json"], json.dumps(results, indent=2, default=lm_utils.handle_non_serializable,
                                                  ensure_ascii=False) + "\n")
    write_text_atomic(written["markdown"], markdown_table(results))
    for task, records in samples.items():
        lines = (json.dumps(r, default=lm_utils.handle_non_serializable, ensure_ascii=False) for r in records)
        written[f"samples:{task}"] = out / f"samples_{task}.jsonl"
        write_text_atomic(written[f"samples:{task}"], "".join(line + "\n" for line in lines))
    return written


def markdown_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown results table (and its groups table when there are groups)."""
    text = lm_utils.make_table(results)
    if results.get("groups"):
        text += "\n" + lm_utils.make_table(results, "groups")
    return text
