"""Host side of `AdamW4bit`'s Triton kernels (CUDA tensors: float32, bfloat16 or float16).

A step takes a fixed number of launches however many tensors it updates: the kernels
(`_triton_kernels`) are multi-tensor, each program looking up its tensor in a table built here
once per step. Pass 1 (`stats`): the row and column maxima of every rank-1 tensor's new second
moment, and a count of non-finite entries per tensor; pass 2 (`fused_step`): dequantize,
update, requantize (or update float32 moments), grouped by second-moment mode, parameter and
gradient dtype, and block size. Launched without fused multiply-adds and with correctly
rounded division and square root, the kernels compute what the C++ kernel computes, operation
for operation; tests/unit/test_optim_gpu.py compares them bit for bit on CUDA, and
tests/unit/test_optim_triton_ptx.py checks the compiled code for fused or approximate
arithmetic without a GPU. Under Triton's interpreter (`TRITON_INTERPRET=1`, see
`interpreted`) the same kernels run on CPU tensors.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from plasticity.optim import quant

# Options of every launch: no fused multiply-adds, so results round as on the CPU.
LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_NUMEL = 2**31 - 1  # element indices are divided in int32 inside the kernels
STATS_TILE = (16, 128)  # rows x columns of a rank1_stats program
FLAT_BLOCK = 2048  # elements per program of the non-finite count
NI, NF = 16, 8  # int64 and float32 fields per tensor (see _triton_kernels)


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


def _addr(t: torch.Tensor | None, dummy: torch.Tensor) -> int:
    return (t if t is not None and t.numel() else dummy).data_ptr()


def _aligned(size: int, *tensors: torch.Tensor | None) -> bool:
    """Sizes a multiple of 32 and every given tensor 16-byte aligned: the kernels' vector path."""
    return size % 32 == 0 and all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


@dataclass
class Rank1Stats:
    """Pass 1 of one rank-1 tensor: its gradient, and its old second moment unless fresh."""

    grad: torch.Tensor
    cols: int
    beta2: float
    v_codes: torch.Tensor | None = None
    row_old: torch.Tensor | None = None
    col_old: torch.Tensor | None = None


def stats(rank1: Sequence[Rank1Stats], flat: Sequence[torch.Tensor], device: torch.device
          ) -> tuple[torch.Tensor, list[tuple[slice, slice]], torch.Tensor]:
    """Pass 1 for a step: (maxima, where, bad).

    `maxima` is one float32 buffer holding every rank-1 tensor's new row maxima then column
    maxima (`where[i]` = their slices); `bad` counts non-finite entries per tensor, rank-1
    tensors first (of the new second moment), then `flat` (of the gradient)."""
    k = kernels()
    dummy = torch.zeros(4, device=device)
    bad = torch.zeros(len(rank1) + len(flat), device=device, dtype=torch.int32)
    where, size = [], 0
    for it in rank1:
        rows = it.grad.numel() // it.cols
        where.append((slice(size, size + rows), slice(size + rows, size + rows + it.cols)))
        size += rows + it.cols
    maxima = torch.zeros(size, device=device, dtype=torch.float32)
    br, bc = STATS_TILE
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, it in enumerate(rank1):
        key = (KINDS[it.grad.dtype], _aligned(it.cols, it.grad, it.v_codes))
        groups.setdefault(key, []).append(i)
    for (gkind, aligned), idx in groups.items():
        counts = []
        for i in idx:
            rows = rank1[i].grad.numel() // rank1[i].cols
            counts.append(_ceil_div(rows, br) * _ceil_div(rank1[i].cols, bc))
        prog, first = _programs(device, tuple(counts))
        imeta, fmeta = [], []
        for i, pid0 in zip(idx, first, strict=True):
            it, (rs, cs) = rank1[i], where[i]
            row = [0] * NI
            row[1] = it.grad.data_ptr()
            row[4] = _addr(it.v_codes, dummy)
            row[6], row[7] = _addr(it.row_old, dummy), _addr(it.col_old, dummy)
            row[8], row[9] = maxima[rs].data_ptr(), maxima[cs].data_ptr()
            row[10], row[11] = it.grad.numel(), it.cols
            row[13], row[14], row[15] = int(it.v_codes is None), pid0, i
            imeta += row
            fmeta += [0.0, 0.0, 0.0, it.beta2, 1.0 - it.beta2, 0.0, 0.0, 0.0]
        _launch(k.rank1_stats_kernel, (prog.numel(),), _ints(imeta, device),
                _floats(fmeta, device), prog, bad, G_KIND=gkind, BR=br, BC=bc, ALIGNED=aligned)
    fgroups: dict[tuple[int, bool], list[int]] = {}
    for i, g in enumerate(flat):
        fgroups.setdefault((KINDS[g.dtype], _aligned(g.numel(), g)), []).append(i)
    for (gkind, aligned), idx in fgroups.items():
        prog, first = _programs(device, tuple(_ceil_div(flat[i].numel(), FLAT_BLOCK) for i in idx))
        imeta = []
        for i, pid0 in zip(idx, first, strict=True):
            row = [0] * NI
            row[1], row[10], row[14], row[15] = flat[i].data_ptr(), flat[i].numel(), pid0, len(rank1) + i
            imeta += row
        _launch(k.nonfinite_kernel, (prog.numel(),), _ints(imeta, device), prog, bad,
                G_KIND=gkind, BLOCK=FLAT_BLOCK, ALIGNED=aligned)
    return maxima, where, bad


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    # Rounded to float32 once, on the host, as the C++ kernel rounds its double arguments.
    return torch.tensor(values, dtype=torch.float32).to(device)


@dataclass
class Step:
    """Pass 2 of one tensor. `mode`: 0 rank1, 1 block, 2 factor, 3 float32 moments.

    m, v: codes (uint8) for modes 0-2 (no v for factor), the float32 moments for mode 3;
    rank1 takes 1 / new scale in row_new and col_new, factor its row factor and column
    statistics."""

    param: torch.Tensor
    grad: torch.Tensor
    mode: int
    fresh: bool
    consts: tuple[float, float, float, float, float, float]  # decay, b1, b2, 1/sqrt(bc2), eps, lr/bc1
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
    keep: list[torch.Tensor] = field(default_factory=list)


def fused_step(items: Sequence[Step], block: int, device: torch.device) -> None:
    """Pass 2 for a step: one launch per (mode, parameter dtype, gradient dtype, alignment)."""
    if not supports(block):
        raise ValueError(f"block_size: the Triton kernel needs a power of two >= 16, got {block}")
    k = kernels()
    nb = max(1, min(8, 2048 // block))
    dummy = torch.zeros(4, device=device)
    smap = quant.SIGNED_MAP.to(device)
    smid = torch.cat([quant.SIGNED_MIDS, torch.tensor([float("inf")])]).to(device)
    groups: dict[tuple[int, int, int, bool], list[Step]] = {}
    for it in items:
        aligned = _aligned(it.param.numel(), it.param, it.grad, it.m, it.v)
        groups.setdefault((it.mode, KINDS[it.param.dtype], KINDS[it.grad.dtype], aligned),
                          []).append(it)
    for (mode, pkind, gkind, aligned), group in groups.items():
        counts = [_ceil_div(_ceil_div(it.param.numel(), block), nb) for it in group]
        prog, first = _programs(device, tuple(counts))
        imeta, fmeta = [], []
        for it, pid0 in zip(group, first, strict=True):
            row = [0] * NI
            row[0], row[1] = it.param.data_ptr(), it.grad.data_ptr()
            row[2], row[3] = _addr(it.m, dummy), _addr(it.m_scale, dummy)
            row[4], row[5] = _addr(it.v, dummy), _addr(it.v_scale, dummy)
            row[6], row[7] = _addr(it.row_old, dummy), _addr(it.col_old, dummy)
            row[8], row[9] = _addr(it.row_new, dummy), _addr(it.col_new, dummy)
            row[10], row[11], row[12] = it.param.numel(), max(it.cols, 1), max(it.rows_per_matrix, 1)
            row[13], row[14] = int(it.fresh), pid0
            imeta += row
            decay, b1, b2, ibc2, eps, ss = it.consts
            fmeta += [decay, b1, 1.0 - b1, b2, 1.0 - b2, ibc2, eps, ss]
        _launch(k.step_kernel, (prog.numel(),), _ints(imeta, device), _floats(fmeta, device),
                prog, smap, smid, MODE=mode, P_KIND=pkind, G_KIND=gkind, BLOCK=block, NB=nb,
                ALIGNED=aligned)
