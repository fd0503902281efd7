"""Settings shared by every knowledge-acquisition study, and the model scales they can run at.

Each study's config subclasses :class:`KnowledgeConfig` and adds its own fields; every default below is sized
so that the study's default run finishes on a 2-core CPU (the README states each wall time). ``scale`` picks
the model from :data:`SCALES`; ``model`` overrides single fields of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Model scales (omnilm model-config mappings). "study" has the published study's shape, 8 layers (41M parameters
# with a 2k vocabulary; the study reports 44M); it needs a GPU to finish in hours rather than days.
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny", "max_seq_len": 256},  # 4 layers, d_model 128: ~1M parameters
    "small": {"preset": "tiny", "n_layer": 6, "d_model": 256, "n_head": 8, "n_kv_head": 4, "max_seq_len": 256},
    "medium": {"preset": "tiny", "n_layer": 8, "d_model": 384, "n_head": 6, "n_kv_head": 6, "max_seq_len": 256},
    "study": {"preset": "tiny", "n_layer": 8, "d_model": 640, "n_head": 10, "n_kv_head": 10, "max_seq_len": 256},
}

# The two probe sets of seen people, as named in metric keys (the first one's metrics carry no prefix).
PROBE_SETS = ("held_out", "train_templates")


@dataclass
class KnowledgeConfig:
    people: int = 200  # N: people in the training biographies
    bios_per_person: int = 40  # biographies per person (fresh template draws and sentence orders each)
    alpha: float = 0.0  # person i (1-based) gets biographies in proportion to i^-alpha
    warmup_people: int = 0  # warm-up curriculum: train on people 1..warmup_people first (0 = no curriculum) ...
    warmup_epochs: float = 0.0  # ... for this many passes over their biographies, then on everyone uniformly
    vocab_size: int = 2048  # BPE vocabulary trained on the biographies
    scale: str = "tiny"  # model scale, a key of SCALES
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the scale's model fields
    steps: int = 1500  # optimizer steps of pre-training
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 2e-3  # AdamW peak learning rate, cosine decay to 10% without warmup (as in the study)
    eval_every: int = 50  # steps between evaluations of the probes
    eval_examples: int = 600  # probes per probe set (seen people): a fixed random subset
    # Probes the phases are detected on: "train_templates" (each fact in a training wording) or "held_out"
    # (wordings never trained on). At small scale the held-out loss sits ~1 nat above the baseline through
    # the plateau (an unseen wording leaves the model unsure which attribute comes next), so the plateau
    # "at the baseline" is only visible in the training wording. Studies log both where they can.
    probe_wording: str = "train_templates"
    eps: float = 0.15  # phases: the initial drop ends when the attribute loss is within eps of the baseline
    delta: float = 0.3  # knowledge emerges when the loss is delta below the baseline ...
    patience: int = 2  # ... for this many evaluations in a row
    seeds: int = 2  # training seeds; every figure is reported as mean ± std over them

    def model_config(self) -> dict[str, Any]:
        """The model mapping: the scale's fields with ``model`` on top."""
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; available: {sorted(SCALES)}")
        return SCALES[self.scale] | dict(self.model)

    def phase_prefix(self) -> str:
        """Metric-key prefix of the probes the phases are detected on."""
        if self.probe_wording not in PROBE_SETS:
            raise ValueError(f"probe_wording must be one of {PROBE_SETS}, got {self.probe_wording!r}")
        return "" if self.probe_wording == PROBE_SETS[0] else self.probe_wording + "/"

    def describe_model(self) -> str:
        """The model's scale and size, e.g. "scale 'tiny' (4 layers, d_model 128, 1.05M parameters)"."""
        import torch

        from omnilm.model.config import load_model_config
        from omnilm.model.transformer import Transformer

        with torch.device("meta"):  # shapes only: nothing is allocated
            model = Transformer(load_model_config(self.model_config() | {"vocab_size": self.vocab_size}))
        shape = model.config
        return (f"scale {self.scale!r}{' ' + str(self.model) if self.model else ''} ({shape.n_layer} layers, "
                f"d_model {shape.d_model}, {model.num_params() / 1e6:.2f}M parameters)")

    def describe(self) -> str:
        """One line for reports: the experiment's size."""
        return (f"N = {self.people} people × {self.bios_per_person} biographies, {self.describe_model()}, "
                f"{self.steps} steps of {self.batch_size}×{self.seq_len} tokens, lr {self.lr} cosine without "
                f"warmup, {self.seeds} seed(s)")
