"""Triton kernels of `AdamW4bit` for CUDA tensors (float32, bfloat16 or float16 params).

The same two passes as the C++ kernel: `rank1_stats` (row and column maxima of the new second
moment, tiles reduced in registers and merged with atomic max, plus a non-finite count) and
`fused_step` (per 128-element block: dequantize, update, requantize; several blocks per
program). Results agree with the CPU path to float32 rounding (the GPU may fuse multiply-adds),
not bit for bit; tests/unit/test_optim_gpu.py checks them against it. Under Triton's
interpreter (`TRITON_INTERPRET=1`, see `interpreted`) the same kernels run on CPU tensors.
"""

from __future__ import annotations

import functools
import os

import torch

from plasticity.optim import quant


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


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rank1_stats_kernel(g_ptr, vc_ptr, row_old_ptr, col_old_ptr, row_max_ptr, col_max_ptr,
                           bad_ptr, rows, cols, b2, omb2, FRESH: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_r = pid_r * BR + tl.arange(0, BR)
        offs_c = pid_c * BC + tl.arange(0, BC)
        rmask = offs_r < rows
        cmask = offs_c < cols
        mask = rmask[:, None] & cmask[None, :]
        e = offs_r.to(tl.int64)[:, None] * cols + offs_c[None, :]
        g = tl.load(g_ptr + e, mask=mask, other=0.0).to(tl.float32)
        if FRESH:
            vo = tl.zeros((BR, BC), dtype=tl.float32)
        else:
            byte = tl.load(vc_ptr + e // 2, mask=mask, other=0).to(tl.int32)
            code = (byte >> ((e & 1) * 4).to(tl.int32)) & 15
            ro = tl.load(row_old_ptr + offs_r, mask=rmask, other=0.0)
            co = tl.load(col_old_ptr + offs_c, mask=cmask, other=0.0)
            s = tl.minimum(ro[:, None], co[None, :])
            vo = ((code.to(tl.float32) + 1.0) * 0.0625) * s
        v = vo * b2 + (g * g) * omb2
        v = tl.where(mask, v, 0.0)
        nonfinite = (v != v) | (v == float("inf"))
        tl.atomic_add(bad_ptr, tl.sum(tl.sum(nonfinite.to(tl.int32), axis=1), axis=0))
        tl.atomic_max(row_max_ptr + offs_r, tl.max(v, axis=1), mask=rmask)
        tl.atomic_max(col_max_ptr + offs_c, tl.max(v, axis=0), mask=cmask)

    @triton.jit
    def step_kernel(p_ptr, g_ptr, mc_ptr, ms_ptr, vc_ptr, vs_ptr, row_old_ptr, col_old_ptr,
                    row_new_ptr, col_new_ptr, smap_ptr, smid_ptr, n, nbytes, nblocks, cols, rpb,
                    decay, b1, omb1, b2, omb2, ibc2, eps, ss,
                    MODE: tl.constexpr, FRESH: tl.constexpr, BLOCK: tl.constexpr,
                    NB: tl.constexpr):
        HALF: tl.constexpr = BLOCK // 2
        pid = tl.program_id(0)
        blk = pid * NB + tl.arange(0, NB)
        bvalid = blk < nblocks
        offs = blk.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offs < n
        boffs = blk.to(tl.int64)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        bmask = boffs < nbytes
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE != 1:
            i = offs // cols
            j = offs - i * cols
        if FRESH:
            mo = tl.zeros((NB, BLOCK), dtype=tl.float32)
        else:
            mb = tl.load(mc_ptr + boffs, mask=bmask, other=0).to(tl.int32)
            mcode = tl.interleave(mb & 15, mb >> 4)
            ms_old = tl.load(ms_ptr + blk, mask=bvalid, other=0.0)
            mo = tl.load(smap_ptr + mcode) * ms_old[:, None]
        m = mo * b1 + g * omb1
        if MODE == 2:
            rf = tl.load(row_new_ptr + i, mask=mask, other=0.0)
            cf = tl.load(col_new_ptr + (i // rpb) * cols + j, mask=mask, other=0.0)
            v = rf * cf
        else:
            if FRESH:
                vo = tl.zeros((NB, BLOCK), dtype=tl.float32)
            else:
                vb = tl.load(vc_ptr + boffs, mask=bmask, other=0).to(tl.int32)
                vcode = tl.interleave(vb & 15, vb >> 4).to(tl.float32)
                if MODE == 0:
                    so = tl.minimum(tl.load(row_old_ptr + i, mask=mask, other=0.0),
                                    tl.load(col_old_ptr + j, mask=mask, other=0.0))
                    vo = ((vcode + 1.0) * 0.0625) * so
                else:
                    vs_old = tl.load(vs_ptr + blk, mask=bvalid, other=0.0)
                    vo = ((vcode + 1.0) * 0.0625) * vs_old[:, None]
            v = vo * b2 + (g * g) * omb2
        den = tl.sqrt_rn(v) * ibc2 + eps
        p = p * decay
        p = p - tl.div_rn(m, den) * ss
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        # First moment: fresh block scales, nearest code by binary search on the boundaries.
        m = tl.where(mask, m, 0.0)
        ms_new = tl.maximum(tl.max(tl.abs(m), axis=1), 1e-12)
        tl.store(ms_ptr + blk, ms_new, mask=bvalid)
        x = m * (1.0 / ms_new)[:, None]
        idx = tl.zeros((NB, BLOCK), dtype=tl.int32)
        for step in tl.static_range(4):
            width = 8 >> step
            probe = tl.load(smid_ptr + idx + (width - 1))
            idx = tl.where(x > probe, idx + width, idx)
        idx = tl.where(mask, idx, 0)
        lo, hi = tl.split(tl.reshape(idx, (NB, HALF, 2)))
        tl.store(mc_ptr + boffs, (lo | (hi << 4)).to(tl.uint8), mask=bmask)
        if MODE != 2:
            v = tl.where(mask, v, 0.0)
            if MODE == 1:
                vs_new = tl.max(v, axis=1)
                tl.store(vs_ptr + blk, vs_new, mask=bvalid)
                # quant.inv_or_zero: the scale floored at the smallest normal float
                inv = tl.where(vs_new > 0, 1.0 / tl.maximum(vs_new, 1.1754943508222875e-38), 0.0)[:, None]
            else:
                inv = tl.maximum(tl.load(row_new_ptr + i, mask=mask, other=0.0),
                                 tl.load(col_new_ptr + j, mask=mask, other=0.0))
            xv = v * inv
            c = tl.ceil(xv * 16.0 - 0.5) - 1.0
            c = tl.minimum(tl.maximum(c, 0.0), 15.0).to(tl.int32)
            c = tl.where(mask, c, 0)
            lo, hi = tl.split(tl.reshape(c, (NB, HALF, 2)))
            tl.store(vc_ptr + boffs, (lo | (hi << 4)).to(tl.uint8), mask=bmask)

    return rank1_stats_kernel, step_kernel


def rank1_stats(grad, v_codes, row_scale, col_scale, cols: int, fresh: bool, beta2: float):
    kernel, _ = _kernels()
    n = grad.numel()
    rows = n // cols
    dev = grad.device
    row_max = torch.zeros(rows, device=dev, dtype=torch.float32)
    col_max = torch.zeros(cols, device=dev, dtype=torch.float32)
    bad = torch.zeros(1, device=dev, dtype=torch.int32)
    br, bc = 16, 128
    grid = (-(-rows // br), -(-cols // bc))
    dummy = torch.zeros(1, device=dev, dtype=torch.float32)
    kernel[grid](
        grad, v_codes if v_codes.numel() else torch.zeros(1, device=dev, dtype=torch.uint8),
        row_scale if row_scale.numel() else dummy, col_scale if col_scale.numel() else dummy,
        row_max, col_max, bad, rows, cols, float(beta2), float(1.0 - beta2),
        FRESH=bool(fresh), BR=br, BC=bc, num_warps=4,
    )
    return row_max, col_max, bad[0] == 0


def fused_step(param, grad, m_codes, m_scale, v_codes, v_scale, row_old, col_old, row_new,
               col_new, mode: int, cols: int, rows_per_batch: int, fresh: bool, decay: float,
               beta1: float, beta2: float, inv_bc2_sqrt: float, eps: float, step_size: float,
               block: int) -> None:
    _, kernel = _kernels()
    if not supports(block):
        raise ValueError(f"block_size: the Triton kernel needs a power of two >= 16, got {block}")
    dev = param.device
    n = param.numel()
    nblocks = -(-n // block)
    nb = max(1, min(8, 2048 // block))
    dummy = torch.zeros(1, device=dev, dtype=torch.float32)
    dummy_u8 = torch.zeros(1, device=dev, dtype=torch.uint8)
    if mode == 0:
        row_new, col_new = quant.inv_or_zero(row_new), quant.inv_or_zero(col_new)

    def nz(t, d):
        return t if t.numel() else d

    smap = quant.SIGNED_MAP.to(dev)
    smid = torch.cat([quant.SIGNED_MIDS, torch.tensor([float("inf")])]).to(dev)
    kernel[(-(-nblocks // nb),)](
        param, grad, m_codes, m_scale, nz(v_codes, dummy_u8), nz(v_scale, dummy),
        nz(row_old, dummy), nz(col_old, dummy), nz(row_new, dummy), nz(col_new, dummy),
        smap, smid, n, quant.packed_bytes(n), nblocks, max(cols, 1), max(rows_per_batch, 1),
        float(decay), float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
        float(inv_bc2_sqrt), float(eps), float(step_size),
        MODE=int(mode), FRESH=bool(fresh), BLOCK=block, NB=nb, num_warps=4,
    )
