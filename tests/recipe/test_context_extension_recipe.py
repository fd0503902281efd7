"""The context_extension recipe end to end (smoke preset): every method's stage, its model settings, its evals."""

import json

from omnilm.cli import main


def test_smoke_run_extends_with_each_method(tmp_path, capsys):
    assert main(["run", "context_extension", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    evals = json.loads((tmp_path / "evals.json").read_text())
    assert list(evals) == ["pretrain", "pi", "ntk_dynamic", "yarn", "pi_ft", "ntk_ft", "yarn_ft"]
    for results in evals.values():
        assert {"acc@256", "acc@512", "acc"} <= set(results["passkey"])
        assert results["ppl"]["ppl@512"] > 1
    config = {stage: json.loads((tmp_path / stage / "final" / "config.json").read_text())
              for stage in ("pretrain", "pi", "ntk_dynamic", "yarn_ft", "ntk_ft")}
    assert config["pretrain"]["max_position_embeddings"] == 256
    assert config["pi"]["rope_scaling"] == {"rope_type": "linear", "factor": 8}
    assert config["ntk_dynamic"]["rope_scaling"]["rope_type"] == "dynamic"
    assert config["yarn_ft"]["rope_parameters"]["original_max_position_embeddings"] == 256
    assert config["ntk_ft"]["rope_theta"] == 91838.0 and config["ntk_ft"]["max_position_embeddings"] == 2048
    # the zero-step stages keep the pre-trained weights; the fine-tunes change them
    from omnilm.model.hf import read_hf_tensors

    base, pi, tuned = (read_hf_tensors(tmp_path / s / "final") for s in ("pretrain", "pi", "pi_ft"))
    key = "model.embed_tokens.weight"
    assert (base[key] == pi[key]).all() and not (base[key] == tuned[key]).all()
