import pytest

from omnilm.utils.atomic import atomic_path, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "weights.bin"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_successful_write_replaces(tmp_path):
    target = tmp_path / "sub" / "config.json"
    write_text_atomic(target, "v1")
    write_text_atomic(target, "v2")
    assert target.read_text() == "v2"
    assert [p.name for p in target.parent.iterdir()] == ["config.json"]
