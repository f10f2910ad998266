"""The per-tensor pieces of an `AdamW4bit` step in PyTorch operations.

What each layout stores (`_init_state`), the statistics of the second moment (maxima for
"rank1", row and column means of g^2 for "factor"), the step constants, and the PyTorch
update path. The C++ and Triton kernels compute the same operations in the same order, so
every backend gives the bits these functions give.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from plasticity.optim import quant

SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SQUARES_CHUNK = 1 << 20  # elements of g^2 held at once on the CPU (4 MB)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (PyTorch's vectorized CPU sqrt is not always;
    the C++ kernel's is), so both paths round alike."""
    return v.double().sqrt().float() if v.device.type == "cpu" else v.sqrt()


def _pair_sums(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of `x` along `dim` (removed) as a pairwise tree: adjacent pairs added, an odd
    last element carried up unchanged, until one is left. For values >= +0 (squares) this
    is the perfect tree over the length rounded up to a power of two, zero-padded: the C++
    kernel's `factor_stats` sums in this order too, so both give the same bits."""
    dim = dim % x.dim()
    if x.shape[dim] == 1:
        return x.squeeze(dim).clone()  # (never a view of the caller's buffer)
    while x.shape[dim] > 1:
        n = x.shape[dim]
        h = n // 2
        pairs = x.narrow(dim, 0, 2 * h).unflatten(dim, (h, 2))
        s = pairs.select(dim + 1, 0) + pairs.select(dim + 1, 1)
        x = torch.cat([s, x.narrow(dim, n - 1, 1)], dim) if n & 1 else s
    return x.squeeze(dim)


def _mean_squares(g3: torch.Tensor, scratch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of g^2 over the last and the second-to-last dimension of (B, rows, cols) `g3`.

    On the CPU the sums are pairwise trees (`_pair_sums`, the order of the C++ kernel's
    `factor_stats`), with g^2 formed in `scratch` a chunk at a time (whole batches, or an
    aligned power-of-two number of rows of one batch: subtrees of the column tree) instead
    of as a new tensor the size of the parameter. On GPUs, PyTorch's reductions."""
    nb, rows, cols = g3.shape
    if g3.device.type != "cpu":
        sq = g3 * g3
        return sq.sum(dim=-1) / cols, sq.sum(dim=-2) / rows
    cap = scratch.numel() if scratch is not None else g3.numel()

    def square(gc: torch.Tensor) -> torch.Tensor:
        if scratch is None or gc.numel() > cap:  # (no buffer, or a row longer than it)
            return gc * gc
        return torch.mul(gc, gc, out=scratch[:gc.numel()].view(gc.shape))

    if rows * cols <= cap:
        row_sum = torch.empty(nb, rows)
        col_sum = torch.empty(nb, cols)
        step = max(1, cap // (rows * cols))
        for b0 in range(0, nb, step):
            sq = square(g3[b0:b0 + step])
            row_sum[b0:b0 + step] = _pair_sums(sq, -1)
            col_sum[b0:b0 + step] = _pair_sums(sq, -2)
    else:
        span = 1 << max(0, (cap // cols).bit_length() - 1)  # rows per chunk, a power of two
        row_parts, col_sums = [], []
        for b in range(nb):
            roots = []
            for r0 in range(0, rows, span):
                sq = square(g3[b, r0:r0 + span])
                row_parts.append(_pair_sums(sq, -1))
                roots.append(_pair_sums(sq, -2))
            col_sums.append(_pair_sums(torch.stack(roots), 0))
        row_sum = torch.cat(row_parts).view(nb, rows)
        col_sum = torch.stack(col_sums)
    return row_sum / cols, col_sum / rows


def _row_scale(maxes: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Per flat row of the (prod(shape[:-1]) x shape[-1]) view: min over the leading dims'
    max vectors."""
    lead = shape[:-1]
    if len(lead) == 1:
        return maxes[0]
    s: torch.Tensor | None = None
    for k in range(len(lead)):
        view = [1] * len(lead)
        view[k] = lead[k]
        t = maxes[k].view(view)
        s = t if s is None else torch.minimum(s, t)
    assert s is not None
    return s.expand(lead).reshape(-1).contiguous()


def _dim_maxes(row_max: torch.Tensor, col_max: torch.Tensor, shape: torch.Size) -> list[torch.Tensor]:
    lead = shape[:-1]
    if len(lead) == 1:
        return [row_max, col_max]
    rm = row_max.view(lead)
    out = []
    for k in range(len(lead)):
        others = [d for d in range(len(lead)) if d != k]
        out.append(rm.amax(dim=others).contiguous())
    return [*out, col_max]


def _old_rank1_scales(st: dict[str, Any] | None, shape: torch.Size, dev: torch.device):
    if st is None or st["step"] == 0:
        rows = math.prod(shape[:-1])
        z = torch.zeros(0, device=dev, dtype=torch.float32)
        return torch.zeros(rows, device=dev), torch.zeros(shape[-1], device=dev), z
    maxes = [st[f"exp_avg_sq_max{k}"] for k in range(len(shape))]
    return _row_scale(maxes[:-1], shape), maxes[-1], None


def _step_constants(group: dict[str, Any], t: int) -> tuple[float, float, float, float, float, float]:
    """decay, beta1, beta2, 1 / sqrt(1 - beta2^t), eps, lr / (1 - beta1^t) for step t."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    b1, b2 = group["betas"]
    return (1.0 - lr * wd, b1, b2, 1.0 / math.sqrt(1.0 - b2**t), eps, lr / (1.0 - b1**t))


def _factor_plan(r_old: torch.Tensor, c_old: torch.Tensor, row_msq: torch.Tensor,
                 col_msq: torch.Tensor, b2: float, cuda: bool) -> dict[str, Any]:
    """A factor step's new row and column statistics, row factor and finiteness."""
    r_new = r_old * b2 + row_msq * (1.0 - b2)
    c_new = c_old * b2 + col_msq * (1.0 - b2)
    r_mean = r_new.mean(dim=-1, keepdim=True)
    row_factor = torch.where(r_mean > 0, r_new / r_mean, torch.zeros_like(r_new))
    finite = torch.isfinite(r_new).all() & torch.isfinite(c_new).all()
    return {"finite": finite if cuda else bool(finite), "r_new": r_new, "c_new": c_new,
            "row_factor": row_factor.reshape(-1).contiguous()}


def _init_state(p: torch.Tensor, kind: str, block: int,
                scale_dtype: str = "float32") -> dict[str, Any]:
    n = p.numel()
    dev = p.device
    f32 = dict(device=dev, dtype=torch.float32)
    scales = dict(device=dev, dtype=SCALE_DTYPES[scale_dtype])
    st: dict[str, Any] = {"step": 0}
    if kind == "fp32":
        st["exp_avg"] = torch.zeros(p.shape, **f32)
        st["exp_avg_sq"] = torch.zeros(p.shape, **f32)
        return st
    nb = -(-n // block)
    st["exp_avg_codes"] = torch.zeros(quant.packed_bytes(n), device=dev, dtype=torch.uint8)
    st["exp_avg_scale"] = torch.zeros(nb, **scales)
    if kind == "rank1":
        st["exp_avg_sq_codes"] = torch.zeros(quant.packed_bytes(n), device=dev, dtype=torch.uint8)
        for k, size in enumerate(p.shape):
            st[f"exp_avg_sq_max{k}"] = torch.zeros(size, **f32)
    elif kind == "block":
        st["exp_avg_sq_codes"] = torch.zeros(quant.packed_bytes(n), device=dev, dtype=torch.uint8)
        st["exp_avg_sq_scale"] = torch.zeros(nb, **scales)
    else:  # factor
        st["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **f32)
        st["exp_avg_sq_col"] = torch.zeros((*p.shape[:-2], p.shape[-1]), **f32)
    return st


# ------------------------------------------------------------------ the PyTorch update path
# `v_map` and `v_quantize` are the optimizer's (a subclass may swap them for an ablation).

def _v_new_torch(v_map, gf, vcodes, row_old, col_old, cols, fresh, b2) -> torch.Tensor:
    n = gf.numel()
    if fresh:
        vo = torch.zeros_like(gf)
    else:
        s_old = torch.minimum(row_old[:, None], col_old[None, :]).reshape(-1)
        vo = v_map.to(gf.device)[quant.unpack_nibbles(vcodes, n)] * s_old
    return vo * b2 + (gf * gf) * (1.0 - b2)


def _update_fp32(p, g, st, sc) -> None:
    gf = g.float()
    m = st["exp_avg"] * sc["beta1"] + gf * (1.0 - sc["beta1"])
    v = st["exp_avg_sq"] * sc["beta2"] + (gf * gf) * (1.0 - sc["beta2"])
    den = _sqrt(v) * sc["inv_bc2_sqrt"] + sc["eps"]
    pf = p.float() * sc["decay"]
    pf = pf - (m / den) * sc["step_size"]
    st["exp_avg"].copy_(m)
    st["exp_avg_sq"].copy_(v)
    p.copy_(pf)


def _update_quantized_torch(p, g, st, kind, plan, sc, block, v_map, v_quantize) -> None:
    n = p.numel()
    dev = p.device
    fresh = st["step"] == 0
    gf = g.reshape(-1).float()
    smap, umap = quant.SIGNED_MAP.to(dev), v_map.to(dev)
    if fresh:
        mo = torch.zeros_like(gf)
    else:
        mo = smap[quant.unpack_nibbles(st["exp_avg_codes"], n)] * quant.expand_blocks(
            st["exp_avg_scale"].float(), block, n)
    m = mo * sc["beta1"] + gf * (1.0 - sc["beta1"])
    if kind == "factor":
        rows, cols = p.shape[-2], p.shape[-1]
        rf = plan["row_factor"].view(-1, rows)
        v = (rf[:, :, None] * plan["c_new"].view(-1, 1, cols)).reshape(-1)
    elif kind == "rank1":
        v = _v_new_torch(v_map, gf, st["exp_avg_sq_codes"], plan["row_old"], plan["col_old"],
                         p.shape[-1], fresh, sc["beta2"])
    else:
        if fresh:
            vo = torch.zeros_like(gf)
        else:
            vo = umap[quant.unpack_nibbles(st["exp_avg_sq_codes"], n)] * quant.expand_blocks(
                st["exp_avg_sq_scale"].float(), block, n)
        v = vo * sc["beta2"] + (gf * gf) * (1.0 - sc["beta2"])
    den = _sqrt(v) * sc["inv_bc2_sqrt"] + sc["eps"]
    pf = p.reshape(-1).float() * sc["decay"]
    pf = pf - (m / den) * sc["step_size"]
    # Requantize, against the scales as stored (float32, or rounded to bfloat16).
    m_scale = quant.block_absmax(m, block).clamp_min(quant.SCALE_FLOOR)
    m_scale = m_scale.to(st["exp_avg_scale"].dtype).float()
    inv_m = torch.ones_like(m_scale) / m_scale
    m_codes = quant.quantize_signed(m * quant.expand_blocks(inv_m, block, n))
    st["exp_avg_scale"].copy_(m_scale)
    st["exp_avg_codes"].copy_(quant.pack_nibbles(m_codes))
    if kind != "factor":
        # x = v * (1 / s); 1 / min(r, c) == max(1 / r, 1 / c) in floating point too.
        if kind == "rank1":
            inv = torch.maximum(
                quant.inv_or_zero(_row_scale(plan["maxes"][:-1], p.shape))[:, None],
                quant.inv_or_zero(plan["maxes"][-1])[None, :]).reshape(-1)
        else:
            v_scale = quant.block_absmax(v, block).to(st["exp_avg_sq_scale"].dtype).float()
            st["exp_avg_sq_scale"].copy_(v_scale)
            inv = quant.expand_blocks(quant.inv_or_zero(v_scale), block, n)
        x = v * inv
        st["exp_avg_sq_codes"].copy_(quant.pack_nibbles(v_quantize(x)))
    p.copy_(pf.view_as(p))
