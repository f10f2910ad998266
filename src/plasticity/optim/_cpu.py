"""Build (on first use, cached) and load the fused C++/OpenMP kernel of `AdamW4bit`.

The extension is compiled by `torch.utils.cpp_extension` into
`$PLASTICITY_CACHE/optim-kernels/<hash>/` (default `~/.cache/plasticity`), the hash covering
the source, the flags, the torch version and the CPU's instruction-set flags, so a cache
shared by different machines never loads a kernel built for another CPU. When no compiler
is available the optimizer falls back to its pure-PyTorch path (identical results, slower)
and logs a warning once. `PLASTICITY_KERNEL_FLAGS` adds compiler flags (space-separated),
e.g. `-mno-avx512f` to build the portable loops only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_cpu_kernel.cpp")
# No fast-math, no FMA contraction: every operation rounds as the PyTorch path's does.
CFLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp",
] + os.environ.get("PLASTICITY_KERNEL_FLAGS", "").split()
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("PLASTICITY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "plasticity"
    )
    return Path(root) / "optim-kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_key() -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(),
                 torch.__version__.encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def load() -> ModuleType | None:
    """The compiled kernel module, building it on first use; None if it cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        key = _build_key()
        build_dir = cache_dir() / key
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.cpp_extension import load as load_extension

            _module = load_extension(
                name=f"plasticity_adamw4bit_{key}",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                build_directory=str(build_dir),
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, a failed build
            _failed = f"{type(exc).__name__}: {exc}"
            log.warning(
                "AdamW4bit: the fused C++ kernel could not be built (%s); using the "
                "pure-PyTorch path (same results, slower)", _failed.splitlines()[0][:300]
            )
    return _module


def available() -> bool:
    return load() is not None
