"""The Triton kernels of AdamW4bit, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

The interpreter evaluates each program in NumPy float32 without fused multiply-adds, so the
kernels must give the C++ kernel's results bit for bit: parameters, codes and scales. This
checks the kernels' indexing, masking, nibble packing and rounding on machines without a GPU
(tests/unit/test_optim_gpu.py checks the compiled kernels on CUDA). Triton fixes the mode
when `triton.language` is first imported, so the cases (triton_interpret_cases.py) run in a
child process that sets it. Skipped where Triton is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("triton_interpret_cases.py")


def test_triton_kernels_under_the_interpreter_equal_the_cpu_paths(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2],
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, report
