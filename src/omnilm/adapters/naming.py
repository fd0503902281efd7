"""Module paths of omnilm layers in the Hugging Face models that checkpoints are exported to."""

from __future__ import annotations

from omnilm.model.hf import _llama_name

# GPT-2 layers that exist on their own in Hugging Face's GPT2LMHeadModel; q/k/v are fused into c_attn.
_GPT2_LAYERS = {"attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}


def hf_module_name(family: str, name: str) -> str | None:
    """The Hugging Face path of omnilm module ``name``, or None when it has no module of its own there."""
    if family != "gpt2":
        return _llama_name(name + ".weight").removesuffix(".weight")
    if name == "lm_head":
        return name
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and ".".join(parts[2:]) in _GPT2_LAYERS:
        return f"transformer.h.{parts[1]}.{_GPT2_LAYERS['.'.join(parts[2:])]}"
    return None


def matches_target(name: str, target: str) -> bool:
    """PEFT's rule: ``target`` is the whole module path or a dot-separated suffix of it."""
    return name == target or name.endswith("." + target)


def peft_target_names(chosen: list[str], candidates: list[str]) -> list[str]:
    """The shortest suffixes that select exactly ``chosen`` among ``candidates`` under PEFT's matching rule.

    ``["q_proj", "v_proj"]`` when every layer's q/v projection is chosen; longer paths when only some are.
    """
    targets = set()
    chosen_set = set(chosen)
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(c in chosen_set for c in candidates if matches_target(c, suffix)):
                targets.add(suffix)
                break
    return sorted(targets)
