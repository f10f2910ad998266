"""The Triton kernels of `AdamW4bit` (imported by `_triton` only when Triton is present).

Every kernel is multi-tensor: one launch covers many parameter tensors. Each program reads
which tensor it works on from `prog` (tensor index per program) and that tensor's row of two
tables built on the host (`_triton.Plan`; the constants anew each step):

- `imeta` (int64, `NI` per tensor): where the tensors it reads and writes are (byte offsets
  from the `base` argument, a 16-byte aligned buffer, so that the compiler can prove 16-byte
  alignment from the offset alone: hints on a raw address do not survive in Triton 3.6), sizes,
  whether its moments are fresh (step 0), and the first program of the tensor;
- `fmeta` (float32, `NF` per row; a tensor's row is its FROW field): the step's constants
  (they differ between parameter groups, and between tensors whose step counts differ).

The arithmetic is the C++ kernel's, operation for operation: launched with
`enable_fp_fusion=False`, correctly rounded division and square root, so on a GPU the
results equal the CPU path's bit for bit (bf16 parameters: the float32 update rounded once;
`factor`'s statistics come from PyTorch's reductions on CUDA, which sum in another order
than the CPU's pairwise trees).
"""

from __future__ import annotations

import triton
import triton.language as tl

# imeta fields
P = tl.constexpr(0)  # parameter (P_KIND)
G = tl.constexpr(1)  # gradient (G_KIND)
MC = tl.constexpr(2)  # first-moment codes (uint8) | exp_avg (float32, mode 3)
MS = tl.constexpr(3)  # first-moment block scales | (unused)
VC = tl.constexpr(4)  # second-moment codes (uint8) | exp_avg_sq (float32, mode 3)
VS = tl.constexpr(5)  # second-moment block scales (mode 1)
RO = tl.constexpr(6)  # rank1: old row scale
CO = tl.constexpr(7)  # rank1: old column scale
RN = tl.constexpr(8)  # rank1: 1 / new row scale (step), new row maxima (stats); factor: row factor
CN = tl.constexpr(9)  # rank1: 1 / new column scale (step), new column maxima (stats); factor: C
N = tl.constexpr(10)  # elements
COLS = tl.constexpr(11)  # last dimension (rank1, factor)
RPB = tl.constexpr(12)  # rows per matrix (factor)
FRESH = tl.constexpr(13)  # 1 at the first step: both moments start at exactly zero
PID0 = tl.constexpr(14)  # first program of this tensor in the launch
BAD = tl.constexpr(15)  # its slot in the non-finite counts (pass 1)
FROW = tl.constexpr(16)  # its row of fmeta
NI_ = 18
NI = tl.constexpr(NI_)
# fmeta fields
DECAY, B1, OMB1, B2, OMB2, IBC2, EPS, SS = (tl.constexpr(i) for i in range(8))
NF_ = 8
NF = tl.constexpr(NF_)
TINY = tl.constexpr(1.1754943508222875e-38)  # quant.TINY, the smallest normal float


@triton.jit
def _at(base, row, FIELD: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor at imeta field FIELD (a byte offset from `base`) as a typed pointer: KIND 0
    float32, 1 bfloat16, 2 float16, 3 uint8, 4 uint16 (bfloat16 bit patterns). ALIGNED: the host checked that the offset is a
    multiple of 16 (`base` is 16-byte aligned), which lets the compiler use 16-byte accesses."""
    off = tl.load(row + FIELD)
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    ptr = base + off
    if KIND == 0:
        return ptr.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        return ptr.to(tl.pointer_type(tl.bfloat16))
    elif KIND == 2:
        return ptr.to(tl.pointer_type(tl.float16))
    elif KIND == 4:
        return ptr.to(tl.pointer_type(tl.uint16))
    else:
        return ptr


@triton.jit
def _load_scales(ptr, offs, mask, BF16: tl.constexpr):
    """Block scales as float32, stored as float32 or (BF16) as bfloat16 bit patterns."""
    if BF16:
        u = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint32)
        out = (u << 16).to(tl.float32, bitcast=True)
    else:
        out = tl.load(ptr + offs, mask=mask, other=0.0)
    return out


@triton.jit
def _store_scales(ptr, offs, x, mask, BF16: tl.constexpr):
    """Stores block scales `x` (finite, >= 0) and returns the values stored, which the codes
    are quantized against: BF16 rounds to nearest even in integer operations, as the C++
    kernel's Scales::put and PyTorch's .to(torch.bfloat16) do."""
    if BF16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        tl.store(ptr + offs, r.to(tl.uint16), mask=mask)
        out = (r << 16).to(tl.float32, bitcast=True)
    else:
        tl.store(ptr + offs, x, mask=mask)
        out = x
    return out


@triton.jit
def rank1_stats_kernel(base, imeta, fmeta, prog, bad_ptr, G_KIND: tl.constexpr, BR: tl.constexpr,
                       BC: tl.constexpr, ALIGNED: tl.constexpr):
    """Row and column maxima of the new second moment (atomic max into RN, CN, which start at
    zero) and the count of its non-finite entries (into bad_ptr[BAD]); writes nothing else.

    ALIGNED (the host checked: gradient and codes 16-byte aligned, columns a multiple of 32)
    lets the compiler use 16-byte loads and reads each code byte once."""
    pid = tl.program_id(0)
    t = tl.load(prog + pid).to(tl.int64)
    row = imeta + t * NI
    n = tl.load(row + N)
    cols = tl.load(row + COLS)
    if ALIGNED:
        cols = tl.multiple_of(cols, 32)
    fresh = tl.load(row + FRESH)
    b2 = tl.load(fmeta + tl.load(row + FROW) * NF + B2)
    omb2 = tl.load(fmeta + tl.load(row + FROW) * NF + OMB2)
    rows = n // cols
    tiles_c = (cols + BC - 1) // BC
    local = pid - tl.load(row + PID0)
    tr = local // tiles_c
    tc = local - tr * tiles_c
    offs_r = tr * BR + tl.arange(0, BR)
    offs_c = tc * BC + tl.arange(0, BC)
    rmask = offs_r < rows
    cmask = offs_c < cols
    mask = rmask[:, None] & cmask[None, :]
    e = offs_r[:, None] * cols + offs_c[None, :]
    g_ptr = _at(base, row, G, G_KIND, ALIGNED)
    vc_ptr = _at(base, row, VC, 3, ALIGNED)
    # (x * 0 + fresh) == 0: "not fresh" as a tensor of x's shape (the interpreter needs one)
    old = (e * 0 + fresh) == 0
    if ALIGNED:
        HALF: tl.constexpr = BC // 2
        half_c = tc * HALF + tl.arange(0, HALF)
        bmask = rmask[:, None] & (half_c < cols // 2)[None, :] & ((half_c * 0 + fresh) == 0)[None, :]
        vb = tl.load(vc_ptr + offs_r[:, None] * (cols // 2) + half_c[None, :], mask=bmask,
                     other=0).to(tl.int32)
        code = tl.interleave(vb & 15, vb >> 4)  # columns 2c and 2c + 1 of byte c
    else:
        byte = tl.load(vc_ptr + e // 2, mask=mask & old, other=0).to(tl.int32)
        code = (byte >> ((e & 1) * 4).to(tl.int32)) & 15
    g = tl.load(g_ptr + e, mask=mask, other=0.0).to(tl.float32)
    ro = tl.load(_at(base, row, RO, 0, False) + offs_r, mask=rmask & ((offs_r * 0 + fresh) == 0), other=0.0)
    co = tl.load(_at(base, row, CO, 0, False) + offs_c, mask=cmask & ((offs_c * 0 + fresh) == 0), other=0.0)
    s = tl.minimum(ro[:, None], co[None, :])
    vo = tl.where(old, ((code.to(tl.float32) + 1.0) * 0.0625) * s, 0.0)
    v = vo * b2 + (g * g) * omb2
    v = tl.where(mask, v, 0.0)
    nonfinite = (v != v) | (v == float("inf"))
    tl.atomic_add(bad_ptr + tl.load(row + BAD), tl.sum(tl.sum(nonfinite.to(tl.int32), axis=1), axis=0))
    tl.atomic_max(_at(base, row, RN, 0, False) + offs_r, tl.max(v, axis=1), mask=rmask)
    tl.atomic_max(_at(base, row, CN, 0, False) + offs_c, tl.max(v, axis=0), mask=cmask)


@triton.jit
def nonfinite_kernel(base, imeta, fmeta, prog, bad_ptr, G_KIND: tl.constexpr, BLOCK: tl.constexpr,
                     ALIGNED: tl.constexpr):
    """Counts the non-finite gradient entries of each tensor (into bad_ptr[BAD]; fmeta unused:
    the launch passes pass 1's arguments)."""
    pid = tl.program_id(0)
    t = tl.load(prog + pid).to(tl.int64)
    row = imeta + t * NI
    n = tl.load(row + N)
    g_ptr = _at(base, row, G, G_KIND, ALIGNED)
    if ALIGNED:
        n = tl.multiple_of(n, 32)
    offs = (pid - tl.load(row + PID0)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad = (g != g) | (tl.abs(g) == float("inf"))
    tl.atomic_add(bad_ptr + tl.load(row + BAD), tl.sum(bad.to(tl.int32), axis=0))


@triton.jit
def step_kernel(base, imeta, fmeta, prog, smap_ptr, smid_ptr, MODE: tl.constexpr,
                P_KIND: tl.constexpr, G_KIND: tl.constexpr, BLOCK: tl.constexpr,
                NB: tl.constexpr, ALIGNED: tl.constexpr, ROWBLK: tl.constexpr,
                SCALE_BF16: tl.constexpr):
    """One AdamW step on NB blocks of BLOCK elements of one tensor.

    MODE 0 rank1, 1 block, 2 factor (4-bit moments: dequantize, update, requantize with fresh
    scales), 3 float32 moments. ALIGNED (the host checked: every streamed tensor 16-byte
    aligned, size a multiple of 32) lets the compiler use 16-byte loads and stores. ROWBLK
    (modes 0 and 2, the host checked: rows a multiple of BLOCK long) takes each block's row
    scale once and its column scales as one contiguous run, without per-element division.
    SCALE_BF16: block scales (the first moment's; MODE 1 the second moment's too) are stored
    as bfloat16."""
    HALF: tl.constexpr = BLOCK // 2
    pid = tl.program_id(0)
    t = tl.load(prog + pid).to(tl.int64)
    row = imeta + t * NI
    fr = fmeta + tl.load(row + FROW) * NF
    n = tl.load(row + N)
    if ALIGNED:
        n = tl.multiple_of(n, 32)
        nbytes = tl.multiple_of(n // 2, 16)
    else:
        nbytes = (n + 1) // 2
    fresh = tl.load(row + FRESH)
    nblocks = (n + BLOCK - 1) // BLOCK
    blk = (pid - tl.load(row + PID0)) * NB + tl.arange(0, NB)
    bvalid = blk < nblocks
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    boffs = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
    bmask = boffs < nbytes
    # (x * 0 + fresh) == 0: "not fresh" as a tensor of x's shape (the interpreter needs one)
    old = (offs * 0 + fresh) == 0
    decay = tl.load(fr + DECAY)
    b1 = tl.load(fr + B1)
    omb1 = tl.load(fr + OMB1)
    b2 = tl.load(fr + B2)
    omb2 = tl.load(fr + OMB2)
    ibc2 = tl.load(fr + IBC2)
    eps = tl.load(fr + EPS)
    ss = tl.load(fr + SS)
    p_ptr = _at(base, row, P, P_KIND, ALIGNED)
    g_ptr = _at(base, row, G, G_KIND, ALIGNED)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 3:
        m_ptr = _at(base, row, MC, 0, ALIGNED)
        v_ptr = _at(base, row, VC, 0, ALIGNED)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0) * b1 + g * omb1
        v = tl.load(v_ptr + offs, mask=mask, other=0.0) * b2 + (g * g) * omb2
        den = tl.sqrt_rn(v) * ibc2 + eps
        p = p * decay - tl.div_rn(m, den) * ss
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    else:
        mc_ptr = _at(base, row, MC, 3, ALIGNED)
        ms_ptr = _at(base, row, MS, 4 if SCALE_BF16 else 0, False)
        vc_ptr = _at(base, row, VC, 3, ALIGNED)
        if MODE != 1:
            cols = tl.load(row + COLS).to(tl.int32)
            if ROWBLK:
                cols = tl.multiple_of(cols, BLOCK)
                start = blk.to(tl.int32) * BLOCK
                bi = start // cols  # each block's row
                j = (start - bi * cols)[:, None] + tl.arange(0, BLOCK)[None, :]
            else:
                o32 = offs.to(tl.int32)  # tensors on this path have fewer than 2**31 elements
                i = o32 // cols
                j = o32 - i * cols
        mb = tl.load(mc_ptr + boffs, mask=bmask & ((boffs * 0 + fresh) == 0), other=0).to(tl.int32)
        mcode = tl.interleave(mb & 15, mb >> 4)
        ms_old = _load_scales(ms_ptr, blk, bvalid & ((blk * 0 + fresh) == 0), SCALE_BF16)
        mo = tl.where(old, tl.load(smap_ptr + mcode) * ms_old[:, None], 0.0)
        m = mo * b1 + g * omb1
        if MODE == 2:
            rpb = tl.load(row + RPB).to(tl.int32)
            if ROWBLK:
                rf = tl.load(_at(base, row, RN, 0, False) + bi, mask=bvalid, other=0.0)[:, None]
                cf = tl.load(_at(base, row, CN, 0, False) + ((bi // rpb) * cols)[:, None] + j,
                             mask=mask, other=0.0)
            else:
                rf = tl.load(_at(base, row, RN, 0, False) + i, mask=mask, other=0.0)
                cf = tl.load(_at(base, row, CN, 0, False) + (i // rpb) * cols + j, mask=mask,
                             other=0.0)
            v = rf * cf
        else:
            vb = tl.load(vc_ptr + boffs, mask=bmask & ((boffs * 0 + fresh) == 0), other=0).to(tl.int32)
            vcode = tl.interleave(vb & 15, vb >> 4).to(tl.float32)
            if MODE == 0:
                if ROWBLK:
                    ro = tl.load(_at(base, row, RO, 0, False) + bi,
                                 mask=bvalid & ((blk * 0 + fresh) == 0), other=0.0)[:, None]
                else:
                    ro = tl.load(_at(base, row, RO, 0, False) + i, mask=mask & old, other=0.0)
                so = tl.minimum(ro, tl.load(_at(base, row, CO, 0, False) + j, mask=mask & old,
                                            other=0.0))
            else:
                vs_old = _load_scales(_at(base, row, VS, 4 if SCALE_BF16 else 0, False), blk,
                                      bvalid & ((blk * 0 + fresh) == 0), SCALE_BF16)
                so = vs_old[:, None]
            vo = tl.where(old, ((vcode + 1.0) * 0.0625) * so, 0.0)
            v = vo * b2 + (g * g) * omb2
        den = tl.sqrt_rn(v) * ibc2 + eps
        p = p * decay
        p = p - tl.div_rn(m, den) * ss
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        # First moment: fresh block scales, nearest code by binary search on the boundaries.
        m = tl.where(mask, m, 0.0)
        ms_new = _store_scales(ms_ptr, blk, tl.maximum(tl.max(tl.abs(m), axis=1), 1e-12), bvalid,
                               SCALE_BF16)
        x = m * tl.div_rn(tl.full((NB,), 1.0, tl.float32), ms_new)[:, None]
        # The nearest code is the number of the 15 sorted boundaries below x (what a binary
        # search finds; NaN is below none): compares against 15 scalars, no per-element loads.
        idx = tl.zeros((NB, BLOCK), dtype=tl.int32)
        for k in tl.static_range(15):
            idx += (x > tl.load(smid_ptr + k)).to(tl.int32)
        idx = tl.where(mask, idx, 0)
        lo, hi = tl.split(tl.reshape(idx, (NB, HALF, 2)))
        tl.store(mc_ptr + boffs, (lo | (hi << 4)).to(tl.uint8), mask=bmask)
        if MODE != 2:
            v = tl.where(mask, v, 0.0)
            if MODE == 1:
                vs_new = _store_scales(_at(base, row, VS, 4 if SCALE_BF16 else 0, False), blk,
                                       tl.max(v, axis=1), bvalid, SCALE_BF16)
                # quant.inv_or_zero: the scale floored at the smallest normal float
                inv = tl.where(vs_new > 0,
                               tl.div_rn(tl.full((NB,), 1.0, tl.float32),
                                         tl.maximum(vs_new, TINY)), 0.0)[:, None]
            else:
                if ROWBLK:
                    ri = tl.load(_at(base, row, RN, 0, False) + bi, mask=bvalid, other=0.0)[:, None]
                else:
                    ri = tl.load(_at(base, row, RN, 0, False) + i, mask=mask, other=0.0)
                inv = tl.maximum(ri, tl.load(_at(base, row, CN, 0, False) + j, mask=mask, other=0.0))
            xv = v * inv
            c = tl.ceil(xv * 16.0 - 0.5) - 1.0
            c = tl.minimum(tl.maximum(c, 0.0), 15.0).to(tl.int32)
            c = tl.where(mask, c, 0)
            lo, hi = tl.split(tl.reshape(c, (NB, HALF, 2)))
            tl.store(vc_ptr + boffs, (lo | (hi << 4)).to(tl.uint8), mask=bmask)
