"""Passkey training documents: the key twice in the body, the answer at the end, the key at its depth."""

import json

from omnilm.data.synth.passkey import PasskeyConfig, passkey_text, write_passkey


def test_text_layout_and_depth():
    text = passkey_text(10, 0.0, "12345")
    assert text.startswith("The pass key is 12345.") and text.endswith("The pass key is 12345.")
    assert text.count("12345") == 3
    late = passkey_text(10, 1.0, "54321")
    assert late.index("54321") > late.index("There and back again.")
    assert passkey_text(0, 0.5, "11111").count("grass") == 0


def test_written_records_are_seeded_and_sized(tmp_path):
    config = PasskeyConfig(docs=50, min_sentences=3, max_sentences=9, seed=4)
    assert write_passkey(config, tmp_path / "a") == {"docs": 50}
    write_passkey(config, tmp_path / "b")
    a = (tmp_path / "a" / "train.jsonl").read_text()
    assert a == (tmp_path / "b" / "train.jsonl").read_text()
    records = [json.loads(line) for line in a.splitlines()]
    assert all(3 <= r["sentences"] <= 9 and r["text"].endswith(f"is {r['key']}.") for r in records)
