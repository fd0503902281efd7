"""Native CPU kernels, compiled on first use with PyTorch's C++ extension tooling.

``qlinear()`` returns the compiled module of ``qlinear.cpp`` (int8 / int4 weight-only linear layers for small
batches) or None where it cannot be built (no C++ compiler, not a CPU build of the headers, ...); callers then
use their pure-PyTorch reference path, and one line on stderr says why. The build is cached by PyTorch
(``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache``) under a name that includes a digest of the source and of
this CPU's model and instruction-set flags (the code is compiled with ``-march=native``: a cache shared with
another machine is never loaded on the wrong CPU) and of the Python and PyTorch versions it was built against.
A build killed half-way leaves PyTorch's build lock behind, and PyTorch would wait on it forever; a lock older than
:data:`STALE_LOCK_SECONDS` is removed, with a line on stderr. ``OMNILM_KERNELS=0`` switches the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from functools import cache
from pathlib import Path
from types import ModuleType

SOURCE_DIR = Path(__file__).parent
# A build takes about a minute on a 2-core host; a lock this old was left by a build that was killed.
STALE_LOCK_SECONDS = 600.0


def _cpu_identity() -> str:
    identity = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return identity + platform.processor()
    return identity + "".join(line for line in lines if line.startswith(("model name", "flags")))[:4096]


def enabled() -> bool:
    """Whether native kernels may be used (``OMNILM_KERNELS=0`` says no)."""
    return os.environ.get("OMNILM_KERNELS", "1") != "0"


def build_directory(name: str) -> Path:
    """Where the kernels of ``name`` (``{name}.cpp``) are built and cached: under ``TORCH_EXTENSIONS_DIR`` or
    PyTorch's default build root, one folder per source, CPU, Python and PyTorch version."""
    import torch
    from torch.utils import cpp_extension

    source = SOURCE_DIR / f"{name}.cpp"
    built_for = f"{_cpu_identity()} {sys.version_info[:2]} {torch.__version__}".encode()
    digest = hashlib.blake2b(source.read_bytes() + built_for, digest_size=6).hexdigest()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"omnilm_{name}_{digest}"


def clear_stale_lock(folder: Path, now: float | None = None) -> bool:
    """Remove the build lock in ``folder`` if it is older than :data:`STALE_LOCK_SECONDS` (left by a killed
    build: PyTorch's lock has no staleness check); True when one was removed."""
    lock = folder / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    lock.unlink(missing_ok=True)
    print(f"omnilm: removed a stale kernel build lock ({lock}, {age / 60:.0f} min old)", file=sys.stderr)
    return True


@cache
def _build(name: str) -> ModuleType | None:
    try:
        from torch.utils import cpp_extension

        folder = build_directory(name)
        folder.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(folder)
        return cpp_extension.load(
            name=folder.name, sources=[str(SOURCE_DIR / f"{name}.cpp")], build_directory=str(folder),
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # any build failure leaves the reference path, which is always correct
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        print(f"omnilm: native {name} kernels unavailable ({reason[:200]}); using the PyTorch path", file=sys.stderr)
        return None


def qlinear() -> ModuleType | None:
    """The compiled int8/int4 linear kernels, or None (switched off, or they could not be built)."""
    return _build("qlinear") if enabled() else None
