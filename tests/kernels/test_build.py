"""The kernels' build folder and the stale build lock a killed build leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from omnilm import kernels


def _lock(folder: Path, age: float, now: float) -> Path:
    lock = folder / "lock"
    lock.touch()
    os.utime(lock, (now - age, now - age))
    return lock


def test_a_lock_older_than_a_build_is_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = 1.0e9
    lock = _lock(tmp_path, kernels.STALE_LOCK_SECONDS + 1, now)
    assert kernels.clear_stale_lock(tmp_path, now=now)
    assert not lock.exists()
    assert "stale kernel build lock" in capsys.readouterr().err


def test_a_recent_lock_is_left_to_the_build_holding_it(tmp_path: Path) -> None:
    now = 1.0e9
    lock = _lock(tmp_path, kernels.STALE_LOCK_SECONDS - 1, now)
    assert not kernels.clear_stale_lock(tmp_path, now=now)
    assert lock.exists()
    assert not kernels.clear_stale_lock(tmp_path / "nothing-built-here", now=now)


def test_build_folder_depends_on_the_extensions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = kernels.build_directory("qlinear")
    assert folder.parent == tmp_path and folder.name.startswith("omnilm_qlinear_")


@pytest.mark.skipif(kernels.qlinear() is None, reason="native kernels could not be built here")
def test_the_built_module_lives_in_its_build_folder() -> None:
    module = kernels.qlinear()
    assert module is not None and Path(module.__file__).parent == kernels.build_directory("qlinear")
