"""Host side of `AdamW4bit`'s Triton kernels (CUDA tensors: float32, bfloat16 or float16).

A step takes a fixed number of launches however many tensors it updates: the kernels
(`_triton_kernels`) are multi-tensor, each program looking up its tensor in a table. A `Plan`
holds one device's tables, launches and buffers; the optimizer keeps it while the addresses it
holds stay the same (parameters, gradients, states), so a step in steady state costs the host
one copy of the step constants, a few launches and one transfer of the non-finite counts.
Pass 1 (`Plan.check`): the row and column maxima of every rank-1 tensor's new second moment,
and a count of non-finite entries per tensor; pass 2 (`Plan.step`): dequantize, update,
requantize (or update float32 moments), one launch per second-moment mode, parameter and
gradient dtype, block size, alignment and row layout. Launched without fused multiply-adds
and with correctly rounded division and square root, the kernels compute what the C++ kernel
computes, operation for operation; tests/unit/test_optim_gpu.py compares them bit for bit on CUDA, and
tests/unit/test_optim_triton_ptx.py checks the compiled code for fused or approximate
arithmetic without a GPU. Under Triton's interpreter (`TRITON_INTERPRET=1`, see
`interpreted`) the same kernels run on CPU tensors.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from plasticity.optim import quant

# Options of every launch: no fused multiply-adds, so results round as on the CPU.
LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_NUMEL = 2**31 - 1  # element indices are divided in int32 inside the kernels
STATS_TILE = (16, 128)  # rows x columns of a rank1_stats program
FLAT_BLOCK = 2048  # elements per program of the non-finite count
NI, NF = 18, 8  # int64 fields per tensor, float32 fields per constants row (_triton_kernels)


@functools.cache
def _importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def available() -> bool:
    """Triton kernels can run on CUDA tensors here."""
    return torch.cuda.is_available() and _importable()


def interpreted() -> bool:
    """`TRITON_INTERPRET=1` and Triton installed: the kernels run on CPU tensors, in NumPy.

    Slow (a debugging aid), but exact: without fused multiply-adds the interpreted kernels give
    the C++ kernel's results bit for bit, which tests/unit/test_optim_triton_interpret.py
    checks on machines without a GPU. Triton fixes the mode when `triton.language` is first
    imported, so set the variable before that (in practice, before the process starts).
    """
    flag = os.environ.get("TRITON_INTERPRET", "").strip().lower()
    return flag in ("1", "true", "yes", "on") and _importable()


def supports(block: int) -> bool:
    """Triton tiles need a power-of-two block of at least 16 elements."""
    return block >= 16 and block & (block - 1) == 0


def handles(p: torch.Tensor) -> bool:
    """Whether the kernels can update parameter `p` (dtype, layout, size)."""
    return p.dtype in KINDS and p.is_contiguous() and p.numel() <= MAX_NUMEL


@functools.cache
def kernels():
    from plasticity.optim import _triton_kernels

    return _triton_kernels


def _launch(kernel, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
    """Every launch goes through here (tests record the launches to compile them)."""
    kernel[grid](*args, **constexprs, **LAUNCH)


@functools.lru_cache(maxsize=32)
def _programs(device: torch.device, counts: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Tensor index of each program (int32, on `device`) and each tensor's first program."""
    first, total = [], 0
    for c in counts:
        first.append(total)
        total += c
    prog = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32),
                                   torch.tensor(counts, dtype=torch.int64))
    return prog.to(device), tuple(first)


def _aligned(size: int, *tensors: torch.Tensor | None) -> bool:
    """Sizes a multiple of 32 and every given tensor 16-byte aligned: the kernels' vector path."""
    return size % 32 == 0 and all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device)


def step_constants(decay: float, beta1: float, beta2: float, inv_bc2_sqrt: float, eps: float,
                   step_size: float) -> list[float]:
    """One fmeta row (the kernels' order). Rounded to float32 when copied to the device, as
    the C++ kernel rounds its double arguments."""
    return [decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, inv_bc2_sqrt, eps, step_size]


@dataclass
class Item:
    """One tensor of a step. `mode`: 0 rank1, 1 block, 2 factor, 3 float32 moments.

    m, v: codes (uint8) for modes 0-2 (no v for factor), exp_avg and exp_avg_sq for mode 3.
    rank1: row_old, col_old are the old scales (maxima); row_new, if given, is 1 / the new row
    scale (otherwise the plan takes it from its own maxima, as it always does for the columns).
    factor: row_new is the row factor, col_new the column statistics."""

    param: torch.Tensor
    grad: torch.Tensor
    mode: int
    fresh: bool
    block: int
    m: torch.Tensor
    m_scale: torch.Tensor | None = None
    v: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    row_old: torch.Tensor | None = None
    col_old: torch.Tensor | None = None
    row_new: torch.Tensor | None = None
    col_new: torch.Tensor | None = None
    cols: int = 1
    rows_per_matrix: int = 1


class Plan:
    """The tables, launches and buffers of one step of `items` on one device.

    Reusable for later steps while every address it holds stays valid and the same: the
    constants (`check`'s argument) are the only input that changes. fmeta row i belongs to
    items[i]; bad[i] counts items[i]'s non-finite entries (not for factor items, whose
    statistics the optimizer checks)."""

    def __init__(self, items: Sequence[Item], device: torch.device) -> None:
        if not items:
            raise ValueError("items: a plan needs at least one tensor")
        blocks = {it.block for it in items}
        bad_block = [b for b in blocks if not supports(b)]
        if bad_block:
            raise ValueError(f"block_size: the Triton kernel needs a power of two >= 16, got {bad_block[0]}")
        self.items = list(items)
        k = kernels()
        # Tables hold byte offsets from this buffer (see _triton_kernels); it also stands in
        # for absent tensors (never read: their loads are masked off).
        self._base = torch.zeros(16, device=device, dtype=torch.uint8)
        if self._base.data_ptr() % 16:
            raise RuntimeError("the allocator returned a buffer that is not 16-byte aligned")
        self.bad = torch.zeros(len(items), device=device, dtype=torch.int32)
        self.fmeta = torch.zeros(len(items) * NF, device=device, dtype=torch.float32)
        rank1 = [i for i, it in enumerate(items) if it.mode == 0]
        sizes = []
        for i in rank1:
            sizes += [items[i].param.numel() // items[i].cols, items[i].cols]
        self.maxima = torch.zeros(sum(sizes), device=device, dtype=torch.float32)
        self.inv = torch.zeros_like(self.maxima)
        mx, iv = self.maxima.split(sizes), self.inv.split(sizes)
        # rank-1 item index -> its new row and column maxima (views of one buffer)
        self.maxima_of = {i: (mx[2 * j], mx[2 * j + 1]) for j, i in enumerate(rank1)}
        inv_of = {i: (iv[2 * j], iv[2 * j + 1]) for j, i in enumerate(rank1)}
        self._stats: list[tuple] = []
        self._steps: list[tuple] = []
        br, bc = STATS_TILE
        groups: dict[tuple, list[int]] = {}
        for i in rank1:
            it = items[i]
            key = (KINDS[it.grad.dtype], _aligned(it.cols, it.grad, it.v))
            groups.setdefault(key, []).append(i)
        for (gkind, aligned), idx in groups.items():
            counts = [_ceil_div(items[i].param.numel() // items[i].cols, br)
                      * _ceil_div(items[i].cols, bc) for i in idx]
            prog, first = _programs(device, tuple(counts))
            rows = [self._row(i, pid0, maxima=self.maxima_of[i]) for i, pid0 in zip(idx, first, strict=True)]
            self._stats.append((k.rank1_stats_kernel, prog, _ints(sum(rows, []), device),
                                dict(G_KIND=gkind, BR=br, BC=bc, ALIGNED=aligned)))
        groups = {}
        for i, it in enumerate(items):
            if it.mode in (1, 3):
                groups.setdefault((KINDS[it.grad.dtype], _aligned(it.param.numel(), it.grad)), []).append(i)
        for (gkind, aligned), idx in groups.items():
            prog, first = _programs(device, tuple(_ceil_div(items[i].param.numel(), FLAT_BLOCK) for i in idx))
            rows = [self._row(i, pid0) for i, pid0 in zip(idx, first, strict=True)]
            self._stats.append((k.nonfinite_kernel, prog, _ints(sum(rows, []), device),
                                dict(G_KIND=gkind, BLOCK=FLAT_BLOCK, ALIGNED=aligned)))
        self._smap = quant.SIGNED_MAP.to(device)
        self._smid = quant.SIGNED_MIDS.to(device)
        groups = {}
        for i, it in enumerate(items):
            aligned = _aligned(it.param.numel(), it.param, it.grad, it.m, it.v)
            rowblk = it.mode in (0, 2) and it.cols % it.block == 0
            bf16 = it.m_scale is not None and it.m_scale.dtype == torch.bfloat16
            key = (it.block, it.mode, KINDS[it.param.dtype], KINDS[it.grad.dtype], aligned, rowblk, bf16)
            groups.setdefault(key, []).append(i)
        for (block, mode, pkind, gkind, aligned, rowblk, bf16), idx in groups.items():
            nb = max(1, min(8, 2048 // block))
            counts = [_ceil_div(_ceil_div(items[i].param.numel(), block), nb) for i in idx]
            prog, first = _programs(device, tuple(counts))
            rows = [self._row(i, pid0, inv=inv_of.get(i)) for i, pid0 in zip(idx, first, strict=True)]
            self._steps.append((k.step_kernel, prog, _ints(sum(rows, []), device),
                                dict(MODE=mode, P_KIND=pkind, G_KIND=gkind, BLOCK=block, NB=nb,
                                     ALIGNED=aligned, ROWBLK=rowblk, SCALE_BF16=bf16)))

    def _row(self, i: int, pid0: int, maxima: tuple | None = None, inv: tuple | None = None) -> list[int]:
        """items[i]'s imeta row: maxima (pass 1) or inverse scales (pass 2) for rank1."""
        it, base = self.items[i], self._base.data_ptr()

        def addr(t: torch.Tensor | None) -> int:
            return t.data_ptr() - base if t is not None and t.numel() else 0

        row = [0] * NI
        row[0], row[1] = addr(it.param), addr(it.grad)
        row[2], row[3], row[4], row[5] = addr(it.m), addr(it.m_scale), addr(it.v), addr(it.v_scale)
        row[6], row[7] = addr(it.row_old), addr(it.col_old)
        if maxima is not None:
            row[8], row[9] = addr(maxima[0]), addr(maxima[1])
        elif inv is not None:
            row[8] = addr(it.row_new) if it.row_new is not None else addr(inv[0])
            row[9] = addr(inv[1])
        else:
            row[8], row[9] = addr(it.row_new), addr(it.col_new)
        row[10], row[11], row[12] = it.param.numel(), max(it.cols, 1), max(it.rows_per_matrix, 1)
        row[13], row[14], row[15], row[16] = int(it.fresh), pid0, i, i
        return row

    def check(self, constants: list[float]) -> list[int]:
        """Pass 1 with these step constants (NF per item): non-finite entries per item."""
        self.fmeta.copy_(torch.tensor(constants, dtype=torch.float32))
        self.bad.zero_()
        self.maxima.zero_()
        for kernel, prog, imeta, consts in self._stats:
            _launch(kernel, (prog.numel(),), self._base, imeta, self.fmeta, prog, self.bad, **consts)
        return self.bad.tolist()

    def step(self) -> None:
        """Pass 2 (after `check`): updates parameters and moments."""
        self.inv.copy_(quant.inv_or_zero(self.maxima))
        for kernel, prog, imeta, consts in self._steps:
            _launch(kernel, (prog.numel(),), self._base, imeta, self.fmeta, prog, self._smap, self._smid,
                    **consts)
