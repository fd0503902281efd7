import gzip
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from omnilm.cli import main
from omnilm.config import ConfigError
from omnilm.data.prepare import PrepareConfig, prepare
from omnilm.errors import UserError

BIOS = [
    "Alice Moreau was born on 3 March 1961 in Lyon. She studied physics at Grenoble.",
    "Bob Lindqvist was born in Uppsala. He studied economics at Stockholm University.",
    "Chen Wei grew up near the harbour and later taught history at a school in Ningbo.",
    "Dana Okafor trained as a nurse in Lagos before moving to Leeds to study medicine.",
]
QUIET = PrepareConfig(progress=False)


def long_doc(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice([f"term{i}" for i in range(2000)]) for _ in range(200)]


def write_jsonl(path: Path, lines: list[bytes | str | dict]) -> Path:
    raw = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        raw += (line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n"
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def read_shards(out: Path) -> list[dict]:
    rows = []
    for shard in sorted(out.glob("part-*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return rows


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """One jsonl file holding one example of everything prepare must handle."""
    near = long_doc(0)
    edited = list(near)
    for position in (30, 90, 150):
        edited[position] = "changed"
    return write_jsonl(tmp_path / "raw.jsonl", [
        {"text": BIOS[0]},                                               # 1 kept
        '{"text": "broken json',                                         # 2 malformed
        {"title": "no text field"},                                      # 3 malformed (missing field)
        {"text": "  ALICE MOREAU was born on 3 March 1961 in Lyon.  She studied physics at Grenoble. "},  # 4 exact
        {"text": "Too short."},                                          # 5 min_words
        {"text": "Write to bob@example.org or call +44 20 7946 0958 from 10.0.0.1 about it."},  # 6 PII, kept
        {"text": " \n\t "},                                              # 7 empty after cleaning
        b'{"text": "Caf\xe9 owner Marie Dupont opened her shop in Nantes in 1987."}',  # 8 bad byte, kept
        {"text": " ".join(near)},                                        # 9 kept
        {"text": " ".join(edited)},                                      # 10 near duplicate of 9
        {"text": BIOS[1]},                                               # 11 kept
    ])


def test_prepare_cleans_counts_and_writes_readable_shards(messy, tmp_path):
    out = tmp_path / "clean"
    stats = prepare([str(messy)], out, QUIET)

    assert stats["documents_in"] == 9 and stats["documents_out"] == 5
    assert stats["documents_in"] == stats["documents_out"] + sum(stats["removed"].values())
    assert stats["removed_total"] == 4
    removed = {reason: n for reason, n in stats["removed"].items() if n}
    assert removed == {"exact_duplicate": 1, "min_words": 1, "empty_after_cleaning": 1, "near_duplicate": 1}
    assert stats["malformed"]["count"] == 2
    assert stats["malformed"]["problems"][0].startswith(f"{messy}:2: invalid JSON")
    assert stats["malformed"]["problems"][1] == f"{messy}:3: no field 'text'"
    assert stats["replaced_utf8"] == 1
    assert stats["pii_replaced"] == {"email": 1, "phone": 1, "ip": 1}
    assert {"document": f"{messy}:4", "duplicate_of": f"{messy}:1", "kind": "exact_duplicate"} in stats["duplicates"]
    assert {"document": f"{messy}:10", "duplicate_of": f"{messy}:9", "kind": "near_duplicate"} in stats["duplicates"]
    assert stats["bytes_in"] == messy.stat().st_size  # every line read, malformed ones included

    rows = read_shards(out)
    assert [row["source"] for row in rows] == [f"{messy}:{n}" for n in (1, 6, 8, 9, 11)]
    assert rows[0]["text"] == BIOS[0]
    assert rows[1]["text"] == "Write to <EMAIL> or call <PHONE> from <IP> about it."
    assert rows[2]["text"] == "Caf\ufffd owner Marie Dupont opened her shop in Nantes in 1987."
    assert stats["bytes_out"] == sum(len(row["text"].encode("utf-8")) for row in rows)
    saved = json.loads((out / "stats.json").read_text())
    assert {k: v for k, v in saved.items() if k != "config"} == {k: v for k, v in stats.items() if k != "config"}
    assert saved["config"]["filters"]["min_words"] == 5


def test_switching_everything_off_keeps_every_readable_document(messy, tmp_path):
    config = PrepareConfig(normalize=False, filter=False, pii=False, exact_dedup=False, near_dedup=False,
                           progress=False)
    stats = prepare([str(messy)], tmp_path / "out", config)
    assert stats["documents_out"] == 8  # only the whitespace-only document goes
    assert stats["removed"] == {"empty_after_cleaning": 1}
    assert "<EMAIL>" not in " ".join(row["text"] for row in read_shards(tmp_path / "out"))


def test_shards_hold_at_most_shard_documents_and_stale_ones_are_removed(tmp_path):
    source = write_jsonl(tmp_path / "bios.jsonl", [{"text": bio} for bio in BIOS])
    out = tmp_path / "out"
    (out / "part-00007.parquet").parent.mkdir()
    (out / "part-00007.parquet").write_bytes(b"left from an earlier run")
    stats = prepare([str(source)], out, PrepareConfig(shard_documents=3, progress=False))
    assert stats["shards"] == ["part-00000.parquet", "part-00001.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet", "stats.json"]
    assert [pq.read_metadata(out / name).num_rows for name in stats["shards"]] == [3, 1]
    assert [row["text"] for row in read_shards(out)] == BIOS


def test_all_removed_still_writes_an_empty_shard(tmp_path):
    source = write_jsonl(tmp_path / "short.jsonl", [{"text": "Too short."}])
    stats = prepare([str(source)], tmp_path / "out", QUIET)
    assert stats["documents_out"] == 0
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.num_rows == 0 and table.column_names == ["text", "source"]


def test_empty_input_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match=r"input is empty.*empty\.jsonl"):
        prepare([str(empty)], tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(UserError, match=r"input is empty.*bad\.jsonl:1"):
        prepare([str(only_bad)], tmp_path / "out", QUIET)


def test_config_takes_nested_thresholds_and_refuses_bad_values():
    config = PrepareConfig(filters={"min_words": 2})
    assert config.filters.min_words == 2
    with pytest.raises(ConfigError, match="unknown"):
        PrepareConfig(filters={"min_wordz": 2})
    with pytest.raises(ConfigError, match="near_dedup_threshold"):
        PrepareConfig(near_dedup_threshold=0)
    with pytest.raises(ConfigError, match="shard_documents"):
        PrepareConfig(shard_documents=0)


def test_cli_end_to_end_on_mixed_inputs(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_jsonl(inputs / "a.jsonl", [{"body": BIOS[0]}, {"body": BIOS[1]}])
    write_jsonl(inputs / "b.jsonl.gz", [{"body": BIOS[2]}, {"body": BIOS[0].upper()}])
    (inputs / "c.txt").write_text(BIOS[3] + "\n\n\n\nShe now runs a clinic.   \n")
    config = tmp_path / "prepare.yaml"
    config.write_text("near_dedup: false\nfilters:\n  min_words: 3\n")
    out = tmp_path / "out"
    code = main(["data", "prepare", str(inputs), "--out", str(out), "--text-field", "body", "--config", str(config),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "documents in" in printed and "removed: exact_duplicate" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["config"]["near_dedup"] is False and stats["config"]["filters"]["min_words"] == 3
    assert (stats["documents_in"], stats["documents_out"], stats["removed"]["exact_duplicate"]) == (5, 4, 1)
    rows = read_shards(out)
    assert [Path(row["source"]).name for row in rows] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl.gz:1", "c.txt:1"]
    assert rows[-1]["text"] == BIOS[3] + "\n\nShe now runs a clinic."


def test_cli_strict_fails_naming_the_bad_line(messy, tmp_path, capsys):
    code = main(["data", "prepare", str(messy), "--out", str(tmp_path / "out"), "--strict", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{messy}:2" in err and "invalid JSON" in err
    assert not (tmp_path / "out" / "stats.json").exists()


def test_cli_reports_empty_input_and_bad_config(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    source = write_jsonl(tmp_path / "bios.jsonl", [{"text": bio} for bio in BIOS])
    assert main(["data", "prepare", str(source), str(empty), "--out", str(tmp_path / "out"), "--no-progress",
                 "--no-filter"]) == 0
    jsonl_empty = write_jsonl(tmp_path / "nothing.jsonl", [])
    assert main(["data", "prepare", str(jsonl_empty), "--out", str(tmp_path / "out2")]) == 2
    assert "input is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("near_dedup_treshold: 0.5\n")
    assert main(["data", "prepare", str(source), "--out", str(tmp_path / "out3"), "--config", str(bad)]) == 2
    assert "near_dedup_treshold" in capsys.readouterr().err
