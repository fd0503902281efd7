"""Every encoder and encoder-decoder pre-training stage type runs from a recipe on a fresh corpus."""

from pathlib import Path

import transformers

from omnilm.recipe.recipe import Recipe
from omnilm.recipe.runner import run_recipe

TRAIN = {"max_steps": 2, "batch_size": 4, "seq_len": 32, "log_every": 1, "progress": False, "device": "cpu",
         "eval_batches": 1}
SMALL = {"d_model": 32, "n_layer": 1, "max_seq_len": 64}


def test_encoder_and_seq2seq_stages_from_a_recipe(tmp_path: Path) -> None:
    prepare = {
        "bios": {"job": "synth_bios", "people": 6, "bios_per_person": 3, "seed": 0},
        "tokenizer": {"job": "tokenizer", "data": ["bios/train.jsonl"], "vocab_size": 300},
        "tokens": {"job": "tokenize", "data": ["bios/train.jsonl"], "tokenizer": "tokenizer", "val_fraction": 0.1,
                   "workers": 1},
    }
    common = {"tokenizer": "tokenizer", "data": {"bios": "tokens"}, "train": TRAIN}
    stages = {"bert": common | {"type": "mlm", "model": {"preset": "bert-tiny"} | SMALL},
              "electra": common | {"type": "electra", "model": {"preset": "electra-tiny", "embedding_size": 32}
                                   | SMALL},
              "t5": common | {"type": "span_corruption", "model": {"preset": "t5-tiny"} | SMALL},
              "bart": common | {"type": "denoise", "model": {"preset": "bart-tiny"} | SMALL}}
    run_recipe(Recipe(name="encoders", prepare=prepare, stages=stages, source="test"), tmp_path, log=lambda _: None)
    expected = {"bert": "BertForMaskedLM", "electra": "ElectraForPreTraining", "t5": "T5ForConditionalGeneration",
                "bart": "BartForConditionalGeneration"}
    for stage, arch in expected.items():
        finals = list((tmp_path / stage).rglob("final/config.json"))
        assert finals, stage
        assert transformers.AutoConfig.from_pretrained(finals[0].parent).architectures == [arch]
