"""LoRA: low-rank adapters on frozen linear layers, with folders in PEFT's format.

``y = W x + (alpha / r) · B A dropout(x)``: ``A`` (r × in) starts Kaiming-uniform and ``B`` (out × r)
at zero, so a freshly adapted model computes exactly what the base model did. Adapter folders hold
``adapter_config.json`` and ``adapter_model.safetensors`` under the names PEFT uses, so they load
with ``peft.PeftModel.from_pretrained`` on the Hugging Face export of the base model, and adapters
trained with PEFT load here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.adapters.naming import hf_module_name, matches_target, peft_target_names
from omnilm.adapters.peft_files import ADAPTER_WEIGHTS, read_adapter_folder, write_adapter_folder
from omnilm.config import ConfigError

PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoraConfig:
    """Which linear layers get adapters and how large they are.

    ``target_modules`` name module paths by suffix: ``"q_proj"`` matches every ``...attn.q_proj``,
    ``"attn.o_proj"`` only the attention output projection (the rule PEFT uses).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ConfigError(f"LoraConfig.alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ConfigError(f"LoraConfig.target_modules must be a non-empty list of names, "
                              f"got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update, foldable into the weight and back."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.dropout_p = dropout
        weight = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default (PEFT's init too), B zero: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling · B A`` (out × in), computed in fp32 for low-precision weights."""
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        return (b @ a) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to the base weight; forward then costs one matmul."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (equal to the original weight up to float rounding)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------
# adapting a model


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _require_no_lora(model: nn.Module) -> None:
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ConfigError("model already has LoRA adapters; merge_lora it before adding new ones")


def _wrap(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float) -> None:
    """Replace the named linears by LoraLinear and freeze everything else."""
    shared = _shared_parameter_ids(model)
    for name in names:
        layer = model.get_submodule(name)
        if id(layer.weight) in shared:
            # Merging would also change the tied embedding, so such an adapter cannot be folded in.
            raise ConfigError(f"LoRA target {name!r} shares its weight with another parameter (tied embeddings)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, LoraLinear(model.get_submodule(name), r, alpha, dropout))


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Put LoRA adapters on the ``nn.Linear`` layers matching ``config.target_modules`` (in place).

    Every other parameter is frozen. A target that matches no module, or matches something other
    than an ``nn.Linear``, is an error, so a misspelt name never silently trains nothing.
    """
    _require_no_lora(model)
    modules = dict(model.named_modules())
    unknown = [t for t in config.target_modules if not any(matches_target(n, t) for n in modules)]
    if unknown:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
        raise ConfigError(f"LoRA target module(s) {unknown} match no module of the model; "
                          f"its linear layers are named {linears}")
    names = [n for n in modules if any(matches_target(n, t) for t in config.target_modules)]
    not_linear = [n for n in names if not isinstance(modules[n], nn.Linear)]
    if not_linear:
        raise ConfigError(f"LoRA targets must be nn.Linear layers; these are not: {not_linear}")
    _wrap(model, names, config.r, config.alpha, config.dropout)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (``<module>.lora_A.weight`` / ``.lora_B.weight``), detached."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_report(model: nn.Module) -> str:
    """One line such as ``trainable params: 8,192 || all params: 1,000,000 || trainable%: 0.8192``."""
    trainable, total = trainable_parameters(model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back (in place).

    The result has the base model's parameter names again, so ``save_pretrained`` writes an ordinary
    checkpoint. Parameters stay frozen as they were.
    """
    for name, layer in lora_layers(model).items():
        layer.merge()
        _set_submodule(model, name, layer.base_layer)
    return model


# ---------------------------------------------------------------------------------------------
# PEFT adapter folders


def _family(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    family = getattr(config, "family", None)
    if family is None:
        raise ConfigError("PEFT adapter folders need an omnilm Transformer (its config names the family)")
    return family


def _uniform(layers: dict[str, LoraLinear], attribute: str) -> Any:
    values = {getattr(layer, attribute) for layer in layers.values()}
    if len(values) != 1:
        raise ConfigError(f"save_adapter needs one LoRA {attribute} for all layers, found {sorted(values)}")
    return values.pop()


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a PEFT LoRA folder for the Hugging Face export of the base model.

    Adapters must be unmerged. For the gpt2 family only layers that exist on their own in Hugging
    Face's GPT-2 can be exported (``attn.o_proj``, ``mlp.up_proj``, ``mlp.down_proj``): q/k/v are
    fused there into one ``c_attn`` layer, whose single LoRA is not the same function as separate ones.
    """
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("model has no LoRA adapters to save")
    if any(layer.merged for layer in layers.values()):
        raise ConfigError("adapters are merged into the weights; unmerge them before save_adapter")
    family = _family(model)
    check_exportable(model)
    hf_names = {name: hf_module_name(family, name) for name in layers}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": _uniform(layers, "r"),
        "lora_alpha": _uniform(layers, "alpha"),
        "lora_dropout": _uniform(layers, "dropout_p"),
        "target_modules": peft_target_names(list(hf_names.values()), _all_linear_names(model)),
        # Hugging Face GPT-2 layers are Conv1D, whose weights are stored (in, out).
        "fan_in_fan_out": family == "gpt2",
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{hf_names[name]}.{part}.weight"] = getattr(layer, part).weight
    return write_adapter_folder(folder, config, tensors)


def check_exportable(model: nn.Module) -> None:
    """Refuse LoRA layers that :func:`save_adapter` cannot write, naming them and the target modules that would
    work. A training stage calls it before its first step, so the refusal does not wait for a checkpoint."""
    family = _family(model)
    unsupported = sorted(name for name in lora_layers(model) if hf_module_name(family, name) is None)
    if not unsupported:
        return
    shared = _shared_parameter_ids(model)  # a tied head cannot take an adapter at all: not worth suggesting
    exportable = sorted({_target_suffix(n) for n in _linear_names(model) if hf_module_name(family, n) is not None
                         and id(_base_weight(model.get_submodule(n))) not in shared})
    shown = ", ".join(unsupported[:3]) + (f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else "")
    raise ConfigError(f"PEFT export of LoRA on these {family} layers is not supported: {shown} (targets "
                      f"{sorted({_target_suffix(n) for n in unsupported})}). Hugging Face GPT-2 fuses q/k/v into "
                      f"one c_attn layer, whose single LoRA is not the same function as separate ones. Choose "
                      f"target_modules among {exportable}, or a llama/qwen2 model, where every linear layer exports")


def _base_weight(layer: nn.Module) -> torch.Tensor:
    return layer.base_layer.weight if isinstance(layer, LoraLinear) else layer.weight


def _target_suffix(name: str) -> str:
    """``blocks.3.attn.q_proj`` → ``attn.q_proj``: the target name that selects this layer in every block."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" and len(parts) > 2 else name


def _linear_names(model: nn.Module) -> list[str]:
    """Module paths of every linear layer, adapted or not (not the adapters' own A/B layers)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLinear))
            and not n.endswith((".lora_A", ".lora_B", ".base_layer"))]


def _all_linear_names(model: nn.Module) -> list[str]:
    """Hugging Face paths of every linear layer (wrapped or not) that has one of its own."""
    family = _family(model)
    return [hf for hf in (hf_module_name(family, n) for n in _linear_names(model)) if hf is not None]


_UNSUPPORTED_OPTIONS = {"use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False,
                        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                        "target_parameters": None, "trainable_token_indices": None, "layer_replication": None}


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the LoRA adapters of a PEFT folder on ``model`` (an omnilm Transformer) and load their weights.

    The adapted layers are the ones the file has weights for; every tensor must land on a layer of the
    model with the right shape.
    """
    _require_no_lora(model)
    config, tensors = read_adapter_folder(folder, "LORA")
    weights_path = Path(folder) / ADAPTER_WEIGHTS
    bad = {k: config[k] for k, default in _UNSUPPORTED_OPTIONS.items() if config.get(k) not in (None, default)}
    if bad:
        raise ConfigError(f"{folder}: unsupported LoRA option(s) {bad}")
    family = _family(model)
    ours_by_hf = {hf_module_name(family, n): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ours_by_hf.pop(None, None)
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in tensors.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        ours = ours_by_hf.get(module)
        if not key.startswith(PEFT_PREFIX) or ours is None or part not in ("A.weight", "B.weight"):
            unknown.append(key)
            continue
        state[f"{ours}.lora_{part}"] = tensor
    if unknown:
        raise ConfigError(f"{weights_path}: tensor(s) that match no LoRA layer of this {family} model: "
                          f"{sorted(unknown)}")
    names = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    if not names:
        raise ConfigError(f"{weights_path}: no LoRA weights found")
    r = int(config["r"])
    problems = []
    for name in names:
        base = model.get_submodule(name)
        for part, shape in (("A", (r, base.in_features)), ("B", (base.out_features, r))):
            key = f"{name}.lora_{part}.weight"
            if key not in state:
                problems.append(f"missing {key}")
            elif tuple(state[key].shape) != shape:
                problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {shape}")
    if problems:
        raise ConfigError(f"{weights_path}: " + "; ".join(problems))
    _wrap(model, names, r, float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0))
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(state[f"{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(state[f"{name}.lora_B.weight"])
    return model
