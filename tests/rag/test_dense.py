"""Dense retrieval: passages ranked by the cosine of a model's mean-pooled hidden states, computed here alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnilm.rag.index import IndexConfig, RagIndex

CORPUS = [{"text": "Megan Chang was born in Lake Annettebury.", "person_id": 0},
          {"text": "Thomas Ortiz works for Cummings LLC in Port Leslie.", "person_id": 1},
          {"text": "A harbour city of ships and a lighthouse.", "person_id": 2},
          {"text": "Dennis Meyer studied economics.", "person_id": 3}]


def test_dense_retrieval_ranks_by_the_cosine_of_mean_pooled_states(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    import numpy as np
    import torch

    from helpers import small_model
    from omnilm.model.hf import save_pretrained

    model = small_model("llama", vocab_size=tokenizer.vocab_size)
    folder = save_pretrained(model, tmp_path / "encoder", tokenizer=tokenizer)

    def vector(text: str) -> np.ndarray:  # one text alone: mean of the final hidden states, normalised
        with torch.no_grad():
            hidden = model.hidden_states(torch.tensor([tokenizer.encode(text, special=False)]))[0].double()
        mean = hidden.mean(dim=0).numpy()
        return mean / np.linalg.norm(mean)

    index = RagIndex.build(CORPUS, IndexConfig(dense_model=str(folder), min_score=-1.0))
    index.save(tmp_path / "idx")
    loaded = RagIndex.load(tmp_path / "idx")
    for query in ("Where was Megan Chang born?", "harbour city"):
        cosine = [float(vector(query) @ vector(r["text"])) for r in CORPUS]
        hits = loaded.search([query], 3)[0]
        assert [h.position for h in hits] == sorted(range(len(CORPUS)), key=lambda i: -cosine[i])[:3]
        assert [h.score for h in hits] == pytest.approx([cosine[h.position] for h in hits], abs=1e-5)
        assert hits == index.search([query], 3)[0]
    assert index.search(["harbour city"], 3, min_score=0.999) == [[]]
