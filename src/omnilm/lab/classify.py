"""The labelled task of the ``objectives`` lab: which attribute does a biography sentence state?

Examples are the biography corpus's probe sentences (one sentence stating one attribute of one person; six
classes: birth date, birth city, university, major, employer, employer city). The model is fine-tuned on
sentences in *training* wordings of the first ``people`` people and tested on sentences of the other people,
in held-out wordings (never in any training text) and in training wordings.

One classifier per architecture, each the standard way to classify with it:
- encoder (BERT, ELECTRA's discriminator): ``[CLS] text [SEP]``, tanh pooler over [CLS], linear layer
  (``EncoderForSequenceClassification``, fresh pooler and classifier);
- decoder: ``text EOS``, the final-norm hidden state at EOS (the only position that has read the whole
  sentence), a fresh linear layer (the layout of transformers' ``*ForSequenceClassification`` decoders);
- T5: text to text. The target is the class name (``birth city``), trained with the seq2seq loss; the
  prediction is the class whose name (EOS included) has the highest log-likelihood (rank classification).
Every classifier's ``forward`` gives (B, classes) scores, ``loss`` the fine-tuning loss of a batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.data.examples import pad_right

Example = tuple[list[int], int]  # (token ids of the sentence, class index)


@dataclass
class AttributeTask:
    """Class names, the fine-tuning examples and the test sets (name -> examples) of the task."""

    classes: list[str]
    train: list[tuple[str, int]]
    tests: dict[str, list[tuple[str, int]]]


def attribute_task(bios: Path, people: int, test_examples: int, seed: int = 0) -> AttributeTask:
    """The task on a biography folder: fine-tune on the training-wording sentences of people 0..people−1, test on
    at most ``test_examples`` sentences of the others in held-out wordings and as many in training wordings."""
    from omnilm.data.synth.bios import ATTRIBUTES
    from omnilm.eval.attributes import read_jsonl

    classes = list(ATTRIBUTES)

    def examples(file: str, keep: Any) -> list[tuple[str, int]]:
        return [(r["text"], classes.index(r["attribute"])) for r in read_jsonl(bios / file)
                if keep(int(r["person_id"]))]

    def sample(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return random.Random(seed).sample(rows, min(test_examples, len(rows)))

    first = min(int(r["person_id"]) for r in read_jsonl(bios / "eval.jsonl"))
    tuned = lambda person: person - first < people  # noqa: E731
    return AttributeTask(classes, examples("eval_train_templates.jsonl", tuned),
                         {"held_out": sample(examples("eval.jsonl", lambda p: not tuned(p))),
                          "train_templates": sample(examples("eval_train_templates.jsonl", lambda p: not tuned(p)))})


class EncoderClassifier(nn.Module):
    """A BERT-layout encoder with the pooled-[CLS] classification head."""

    def __init__(self, model: nn.Module, ids: dict[str, int], max_len: int) -> None:
        super().__init__()
        self.model, self.ids, self.max_len = model, ids, max_len

    def collate(self, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        rows = [[self.ids["cls"], *row[:self.max_len - 2], self.ids["sep"]] for row in rows]
        return {"inputs": pad_right(rows, self.ids["pad"]), "mask": pad_right([[1] * len(r) for r in rows], 0)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["inputs"], batch["mask"])

    def loss(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(batch), labels)


class DecoderClassifier(nn.Module):
    """A causal decoder read at the appended EOS, then a linear layer."""

    def __init__(self, model: nn.Module, classes: int, eos: int, max_len: int) -> None:
        super().__init__()
        self.model, self.eos, self.max_len = model, eos, max_len
        self.head = nn.Linear(model.config.d_model, classes)
        nn.init.normal_(self.head.weight, std=model.config.init_std)
        nn.init.zeros_(self.head.bias)

    def collate(self, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        rows = [[*row[:self.max_len - 1], self.eos] for row in rows]
        return {"inputs": pad_right(rows, self.eos), "mask": pad_right([[1] * len(r) for r in rows], 0)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.model.hidden_states(batch["inputs"], batch["mask"])  # right padding: positions are unchanged
        last = batch["mask"].sum(-1) - 1
        return self.head(h[torch.arange(h.shape[0]), last])

    def loss(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(batch), labels)


class TextToTextClassifier(nn.Module):
    """An encoder–decoder that writes the class name; scores are the names' log-likelihoods."""

    def __init__(self, model: nn.Module, class_ids: Sequence[list[int]], max_len: int) -> None:
        super().__init__()
        from omnilm.objectives.lm import IGNORE_INDEX

        self.model, self.max_len = model, max_len
        eos = model.config.eos_token_id
        self.register_buffer("targets", pad_right([[*ids, eos] for ids in class_ids], IGNORE_INDEX), persistent=False)

    def collate(self, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        rows = [[*row[:self.max_len - 1], self.model.config.eos_token_id] for row in rows]
        pad = self.model.config.pad_token_id
        return {"input_ids": pad_right(rows, pad), "attention_mask": pad_right([[1] * len(r) for r in rows], 0)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from omnilm.objectives.lm import IGNORE_INDEX
        from omnilm.objectives.seq2seq import shift_right

        config = self.model.config
        B, C = batch["input_ids"].shape[0], self.targets.shape[0]
        memory = self.model.encode(batch["input_ids"], batch["attention_mask"])
        labels = self.targets.repeat(B, 1)  # (B·C, L): every class name after every sentence
        logits = self.model.decode(shift_right(labels, config.decoder_start_token_id, config.pad_token_id),
                                   memory.repeat_interleave(C, 0), batch["attention_mask"].repeat_interleave(C, 0))
        logprobs = torch.log_softmax(logits.float(), -1)
        real = labels != IGNORE_INDEX
        picked = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * real
        return picked.sum(-1).view(B, C)

    def loss(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        from omnilm.objectives.seq2seq import seq2seq_loss

        return seq2seq_loss(self.model, batch | {"labels": self.targets[labels]})[0]


@dataclass
class FinetuneConfig:
    """Fine-tuning settings, the same for every classifier."""

    #: Optimizer steps.
    steps: int = 100
    batch_size: int = 32
    #: AdamW peak learning rate (linear warmup over a tenth of the steps, then linear decay to 0).
    lr: float = 1e-3
    #: Longest input, in tokens (special tokens included).
    max_len: int = 48


def encode_examples(tokenizer: Any, rows: Sequence[tuple[str, int]]) -> list[Example]:
    return [(tokenizer.encode(text, special=False), label) for text, label in rows]


def finetune(classifier: nn.Module, examples: list[Example], config: FinetuneConfig, seed: int) -> None:
    """Train ``classifier`` in place: AdamW (weight decay 0.01), gradient clipping at 1, seeded batch order."""
    from omnilm.data.examples import ExampleLoader
    from omnilm.train.config import TrainConfig
    from omnilm.train.schedule import lr_multiplier

    torch.manual_seed(seed)
    loader = ExampleLoader(len(examples), config.batch_size,
                           lambda idx: (classifier.collate([examples[i][0] for i in idx]),
                                        torch.tensor([examples[i][1] for i in idx])), seed=seed)
    schedule = TrainConfig(max_steps=config.steps, schedule="linear", warmup_steps=max(1, config.steps // 10),
                           min_lr_ratio=0.0)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=0.01)
    classifier.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_multiplier(step, config.steps, schedule)
        batch, labels = loader.next_batch()
        classifier.loss(batch, labels).backward()
        nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def accuracy(classifier: nn.Module, examples: list[Example], batch_size: int = 128) -> float:
    """Share of ``examples`` whose highest-scoring class is the label."""
    classifier.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        scores = classifier(classifier.collate([e[0] for e in chunk]))
        correct += int((scores.argmax(-1) == torch.tensor([e[1] for e in chunk])).sum())
    return correct / max(len(examples), 1)
