"""Native CPU kernels, compiled on first use with PyTorch's C++ extension tooling.

``qlinear()`` returns the compiled module of ``qlinear.cpp`` (int8 / int4 weight-only linear layers for small
batches) or None where it cannot be built (no C++ compiler, not a CPU build of the headers, ...); callers then
use their pure-PyTorch reference path, and one line on stderr says why. The build is cached by PyTorch
(``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache``) under a name that includes a digest of the source and of
this CPU's model and instruction-set flags, since the code is compiled with ``-march=native``: a cache shared
with another machine is never loaded on the wrong CPU. ``OMNILM_KERNELS=0`` switches the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

SOURCE_DIR = Path(__file__).parent


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


@cache
def _build(name: str) -> ModuleType | None:
    source = SOURCE_DIR / f"{name}.cpp"
    digest = hashlib.blake2b(source.read_bytes() + _cpu_identity().encode(), digest_size=6).hexdigest()
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=f"omnilm_{name}_{digest}", sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # any build failure leaves the reference path, which is always correct
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        print(f"omnilm: native {name} kernels unavailable ({reason[:200]}); using the PyTorch path", file=sys.stderr)
        return None


def qlinear() -> ModuleType | None:
    """The compiled int8/int4 linear kernels, or None (switched off, or they could not be built)."""
    return _build("qlinear") if enabled() else None
