"""Host work of one AdamW4bit step on the Triton (CUDA) path, counted on the CPU.

On a GPU, every PyTorch operation and kernel launch costs the host a few microseconds whatever
its size, and an optimizer step over a few hundred tensors can be bound by that rather than by
memory bandwidth. This runs the Triton path's host code on CPU tensors with the tensors of
GPT-2 medium (292: 98 matrices with 4-bit moments, 194 vectors with float32 ones), the kernel
launches recorded instead of run, and counts the PyTorch operations (a dispatch mode sees every
one, views included) and launches of one step, and times a step without its kernels. The
matrices are narrowed to `--width` columns (1024 in GPT-2 medium; the layout of every tensor
stays the same) so that the CPU's own arithmetic on the few small tensors the host code touches
does not count as host time; operation counts do not depend on it.
`torch.optim.AdamW(fused=True)`'s operation count, measured the same way, is the reference.

    python -m bench.optim_host [--layers 24] [--width 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.optim import VOCAB, make_params
from plasticity.optim import AdamW4bit, _triton


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def gpt2_structure(layers: int, d: int) -> list[tuple[int, ...]]:
    """GPT-2 medium's tensors with width d (d = 1024: bench.optim.gpt2_medium_shapes)."""
    shapes: list[tuple[int, ...]] = [(VOCAB, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def count(make, params, launches: list[str], repeats: int) -> tuple[Counter[str], int, list[float]]:
    opt = make(params)
    opt.step()  # states allocated
    opt.step()  # (the Triton path builds its plan again once the moments are not fresh)
    launches.clear()
    with _Ops() as mode:
        opt.step()
    n_launches = len(launches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return mode.ops, n_launches, times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    launches: list[str] = []
    # The Triton path on CPU tensors, its launches recorded instead of run.
    saved = _triton.interpreted, _triton._launch
    _triton.interpreted = lambda: True  # type: ignore[assignment]
    _triton._launch = lambda kernel, grid, *a, **k: launches.append(kernel.fn.__name__)  # type: ignore[assignment]
    try:
        shapes = gpt2_structure(args.layers, args.width)
        params = make_params(shapes, "cpu", torch.float32, 0)
        # min_quantized_numel scaled with the width keeps GPT-2 medium's layout at any width
        hp = dict(lr=1e-4, weight_decay=0.01)
        q = dict(min_quantized_numel=4 * args.width)
        print(f"Host work of a step on the Triton path: {len(shapes)} tensors, "
              f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters (width {args.width})")
        rows = {
            "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **hp),
            "AdamW4bit rank1 (Triton path)": lambda ps: AdamW4bit(ps, backend="triton", **q, **hp),
            "AdamW4bit rank1, bf16 scales (Triton)": lambda ps: AdamW4bit(
                ps, backend="triton", scale_dtype="bfloat16", **q, **hp),
            "AdamW4bit block (Triton path)": lambda ps: AdamW4bit(
                ps, backend="triton", second_moment="block", **q, **hp),
            "AdamW4bit factor (Triton path)": lambda ps: AdamW4bit(
                ps, backend="triton", second_moment="factor", **q, **hp),
        }
        print(f"{'optimizer':34s} {'torch ops':>9s} {'launches':>8s} {'host ms/step':>12s}  most frequent ops")
        for name, make in rows.items():
            ops, n_launches, times = count(make, params, launches, args.repeats)
            host = f"{statistics.median(times) * 1e3:.1f}" if "AdamW4bit" in name else "(computes)"
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(4))
            print(f"{name:34s} {sum(ops.values()):9d} {n_launches:8d} {host:>12s}  {top}")
    finally:
        _triton.interpreted, _triton._launch = saved


if __name__ == "__main__":
    main()
