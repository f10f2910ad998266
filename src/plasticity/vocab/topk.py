"""Exact top-k entries of a product A @ B.T without building it.

A vocabulary-space circuit such as OV = (E W_V)(E W_O^T)^T is V x V (50,257^2 entries
for GPT-2: 10 GB in float32), but it is the product of two thin factors (V x 64). Its
largest and smallest entries are found by streaming blocks of the product:

1. rows of A and of B are sorted by norm, largest first, so blocks early in the order
   hold the entries most likely to be large, and the running k-th best value (the
   threshold) rises quickly;
2. a block (rows R, columns C) is skipped when the Cauchy-Schwarz bound
   max|a_i| * max|b_j| cannot reach the threshold; as norms decrease along both orders,
   a failed bound also ends the row block (remaining column blocks) or the whole search
   (remaining row blocks);
3. a block that passes the bound is screened with a bfloat16 product, whose error is
   bounded per block (input rounding of each row, measured exactly, plus the rounding
   of the fp32 accumulator to bfloat16); only blocks whose screened maximum (minimum)
   plus that error reaches the threshold are computed again in float32 and their
   entries above the threshold kept;
4. the kept candidates are rescored in float64 and the top k taken.

Row blocks are searched by several threads at once (each running single-threaded
products, which scale better here than torch's intra-op threads), sharing the running
thresholds. The factors are first rebalanced (`balanced_factors`) through the Cholesky
factor of their small Gram matrices, or Householder QR where those are ill-conditioned.

Every skip uses a rigorous upper bound, so the result equals the brute-force top-k of
the product computed in float64 from the float32 factors (up to ties at the k-th value).
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_U32 = 2.0**-24  # unit roundoff of float32
_U16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


@dataclass
class ProductTopK:
    """The k largest (`sign` +1) and k smallest (`sign` -1) entries of A @ B.T.

    `values` are float64, best first (descending for +1, ascending for -1)."""

    top_values: torch.Tensor
    top_rows: torch.Tensor
    top_cols: torch.Tensor
    bottom_values: torch.Tensor
    bottom_rows: torch.Tensor
    bottom_cols: torch.Tensor
    blocks_total: int = 0
    blocks_screened: int = 0
    blocks_exact: int = 0

    def entries(self) -> list[tuple[int, int, int, int, float]]:
        """(sign, rank, row, col, value) for both signs."""
        out = []
        for sign, vals, rows, cols in (
            (1, self.top_values, self.top_rows, self.top_cols),
            (-1, self.bottom_values, self.bottom_rows, self.bottom_cols),
        ):
            for rank, (v, r, c) in enumerate(
                zip(vals.tolist(), rows.tolist(), cols.tolist(), strict=True)
            ):
                out.append((sign, rank, int(r), int(c), float(v)))
        return out


def _check(a: torch.Tensor, b: torch.Tensor, k: int) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"a and b: expected 2-D factors, got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b: inner dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("a and b: need at least one row each")


def _final(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int, sign: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rescore candidate entries in float64 and keep the best k of one sign."""
    vals = (a[rows].double() * b[cols].double()).sum(-1) * sign
    k = min(k, vals.numel())
    best, idx = torch.topk(vals, k)
    # Deterministic order among equal values: by (value desc, row, col).
    order = sorted(range(k), key=lambda i: (-float(best[i]), int(rows[idx[i]]), int(cols[idx[i]])))
    idx = idx[order]
    return vals[idx] * sign, rows[idx], cols[idx]


class _Pool:
    """Candidate entries of one sign with a running threshold (the k-th best fp32 value)."""

    def __init__(self, k: int, slack: float):
        self.k, self.slack = k, slack
        self.vals = torch.empty(0)
        self.rows = torch.empty(0, dtype=torch.long)
        self.cols = torch.empty(0, dtype=torch.long)
        self.t = -math.inf  # k-th best value seen (fp32), -inf until k are held

    def add(self, vals: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        if vals.numel() == 0:
            return
        self.vals = torch.cat([self.vals, vals.float()])
        self.rows = torch.cat([self.rows, rows])
        self.cols = torch.cat([self.cols, cols])
        if self.vals.numel() >= self.k:
            self.t = float(torch.topk(self.vals, self.k).values[-1])
            # Keep everything that can still belong to the exact top k (see module doc).
            keep = self.vals >= self.t - 2 * self.slack
            if not bool(keep.all()):
                self.vals, self.rows, self.cols = self.vals[keep], self.rows[keep], self.cols[keep]

    @property
    def cutoff(self) -> float:
        """Entries whose exact value is below this cannot be in the top k."""
        return self.t - self.slack


def _take(
    pool: _Pool, block: torch.Tensor, r0: int, c0: int, sign: int,
    rows_map: torch.Tensor | None = None,
) -> None:
    """Move the block's entries (times `sign`) that can still beat the pool into it."""
    flat = (block if sign > 0 else -block).reshape(-1)
    floor = pool.t
    if floor == -math.inf or int((flat >= floor - 2 * pool.slack).sum()) > 4 * pool.k:
        if flat.numel() >= pool.k:
            floor = max(floor, float(torch.topk(flat, pool.k).values[-1]))
    idx = (flat >= floor - 2 * pool.slack).nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    width = block.shape[1]
    rows = idx // width
    rows = rows + r0 if rows_map is None else rows_map[rows]
    pool.add(flat[idx], rows, idx % width + c0)


def _triangular_factor(x: torch.Tensor) -> torch.Tensor | None:
    """Upper-triangular R with x = Q R (Q's columns orthonormal), from the Cholesky factor
    of the small Gram matrix x^T x (float64): a tall-skinny QR without forming Q. None when
    the Gram matrix is singular or too ill-conditioned for it."""
    chol, info = torch.linalg.cholesky_ex(x.t() @ x)
    if int(info) != 0:
        return None
    diag = chol.diagonal()
    if float(diag.min()) <= 1e-6 * float(diag.max()):  # cond(x) beyond ~1e6: use Householder
        return None
    return chol.t()


def _times_core(x: torch.Tensor, core: torch.Tensor, r: torch.Tensor | None,
                q: torch.Tensor | None) -> torch.Tensor:
    """Q @ core, as x @ (R^-1 core) when only R is known."""
    if q is not None:
        return q @ core
    return x @ torch.linalg.solve_triangular(r, core, upper=True)


def balanced_factors(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a', b') of the same product, a' b'^T = a b^T, with orthogonal columns of
    equal weight on both sides (a' = Q_a U S^1/2, b' = Q_b V S^1/2 from the QR of each
    factor and the SVD of the small core R_a R_b^T), computed in float64; directions
    with singular value below `rtol` times the largest are dropped (exact-rank
    reduction), and the result is cast to float32."""
    a64, b64 = a.detach().double(), b.detach().double()
    ra, rb = _triangular_factor(a64), _triangular_factor(b64)
    qa = qb = None
    if ra is None:
        qa, ra = torch.linalg.qr(a64)
    if rb is None:
        qb, rb = torch.linalg.qr(b64)
    u, s, vh = torch.linalg.svd(ra @ rb.t(), full_matrices=False)
    keep = s > rtol * s[0] if s.numel() and s[0] > 0 else s > 0
    if not bool(keep.any()):
        keep[0] = True
    root = s[keep].sqrt()
    return (_times_core(a64, u[:, keep] * root, ra, qa).float(),
            _times_core(b64, vh[keep].t() * root, rb, qb).float())


def product_topk(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int,
    *,
    screen: str = "bfloat16",
    row_block: int = 512,
    col_block: int = 2048,
    balance: bool = True,
    workers: int | None = None,
) -> ProductTopK:
    """Exact k largest and k smallest entries of ``a @ b.T`` (a: n x r, b: m x r).

    `screen`: "bfloat16" (screen blocks with a bf16 product and a rigorous error bound,
    then recompute survivors in float32) or "float32" (compute every unpruned block in
    float32). `workers`: threads that search row blocks in parallel (default: torch's
    intra-op thread count, at most 4; torch runs single-threaded meanwhile and its thread
    count is restored afterwards). Returns float64 values and the (row, col) of each entry.
    """
    _check(a, b, k)
    a_in, b_in = a.detach().float(), b.detach().float()
    if balance:
        a, b = balanced_factors(a, b)
    if screen not in ("bfloat16", "float32"):
        raise ValueError(f"screen: expected 'bfloat16' or 'float32', got {screen!r}")
    if row_block <= 0 or col_block <= 0:
        raise ValueError(f"row_block/col_block: expected positive sizes, got {row_block}, {col_block}")
    a32, b32 = a.detach().float().contiguous(), b.detach().float().contiguous()
    n, m, r = a32.shape[0], b32.shape[0], a32.shape[1]
    na, nb = a32.double().norm(dim=1), b32.double().norm(dim=1)
    ra, cb = torch.argsort(na, descending=True), torch.argsort(nb, descending=True)
    a_s, b_s = a32[ra], b32[cb]
    na_s, nb_s = na[ra], nb[cb]
    # float32 error of one entry (accumulation over r terms), bounded for every entry.
    u32 = _U32
    if a32.is_cuda and torch.backends.cuda.matmul.allow_tf32:  # pragma: no cover
        u32 = 2.0**-11
    slack = 2.0 * (r + 2) * u32 * float(na_s[0] * nb_s[0]) + 1e-30
    k_eff = min(k, n * m)
    pos, neg = _Pool(k_eff, slack), _Pool(k_eff, slack)
    use_bf16 = screen == "bfloat16"
    if use_bf16:
        a_h, b_h = a_s.bfloat16(), b_s.bfloat16()
        da = (a_s.double() - a_h.double()).norm(dim=1)  # input rounding, per row
        db = (b_s.double() - b_h.double()).norm(dim=1)
        nah, nbh = a_h.double().norm(dim=1), b_h.double().norm(dim=1)
    row_starts = list(range(0, n, row_block))
    col_starts = list(range(0, m, col_block))
    if use_bf16:
        def _bmax(x: torch.Tensor, starts: list[int], size: int) -> list[float]:
            return [float(x[s : s + size].max()) for s in starts]

        da_blk, nah_blk = _bmax(da, row_starts, row_block), _bmax(nah, row_starts, row_block)
        db_blk, nbh_blk = _bmax(db, col_starts, col_block), _bmax(nbh, col_starts, col_block)
    grow = 1.0 + 1e-9  # the float64 norm products themselves round
    na_at, nb_at = na_s.tolist(), nb_s.tolist()  # Python floats: no tensor indexing per block
    res = ProductTopK(*(torch.empty(0) for _ in range(6)))
    res.blocks_total = len(row_starts) * len(col_starts)
    c16 = 2 * _U16 + 2 * (r + 2) * _U32  # float32 accumulation, then rounding to bfloat16
    lock = threading.Lock()

    def search(block_ids: list[int]) -> tuple[int, int]:
        screened = exact = 0
        for bi in block_ids:
            r0 = row_starts[bi]
            r1 = min(r0 + row_block, n)
            amax = na_at[r0] * grow
            if amax * nb_at[0] < min(pos.cutoff, neg.cutoff):
                break  # later rows have smaller norms: nothing left can enter either top k
            for bj, c0 in enumerate(col_starts):
                c1 = min(c0 + col_block, m)
                bound = amax * nb_at[c0]
                need_pos, need_neg = bound >= pos.cutoff, bound >= neg.cutoff
                if not (need_pos or need_neg):
                    break  # later columns have smaller norms
                sel = None  # rows of the block to compute exactly (None: all)
                if use_bf16 and pos.t > -math.inf and neg.t > -math.inf:
                    screened += 1
                    q = torch.mm(a_h[r0:r1], b_h[c0:c1].t())
                    lo, hi = torch.aminmax(q)
                    err = (
                        da_blk[bi] * nb_at[c0] + nah_blk[bi] * db_blk[bj]
                        + c16 * nah_blk[bi] * nbh_blk[bj]
                    ) * grow
                    need_pos = need_pos and float(hi) + err >= pos.cutoff
                    need_neg = need_neg and -float(lo) + err >= neg.cutoff
                    if not (need_pos or need_neg):
                        continue
                    # Narrow to the rows whose own screened extreme plus error can reach.
                    row_err = (
                        da[r0:r1] * nb_at[c0] + nah[r0:r1] * db_blk[bj]
                        + c16 * nah[r0:r1] * nbh_blk[bj]
                    ) * grow
                    hit = torch.zeros(r1 - r0, dtype=torch.bool)
                    if need_pos:
                        hit |= q.amax(1).double() + row_err >= pos.cutoff
                    if need_neg:
                        hit |= -q.amin(1).double() + row_err >= neg.cutoff
                    sel = hit.nonzero().squeeze(1)
                exact += 1
                if sel is None:
                    p = torch.mm(a_s[r0:r1], b_s[c0:c1].t())
                    rows_map = None
                else:
                    p = torch.mm(a_s[r0 + sel], b_s[c0:c1].t())
                    rows_map = sel + r0
                with lock:
                    if need_pos:
                        _take(pos, p, r0, c0, 1, rows_map)
                    if need_neg:
                        _take(neg, p, r0, c0, -1, rows_map)
        return screened, exact

    # Row blocks are dealt round-robin to `workers` threads, each running single-threaded
    # products (small bf16 products scale better this way than with intra-op threads);
    # the pools and their thresholds are shared, so pruning is as tight as in one thread.
    if workers is None:
        workers = min(torch.get_num_threads(), 4) if a32.device.type == "cpu" else 1
    workers = max(1, min(int(workers), len(row_starts)))
    if workers == 1:
        counts = [search(list(range(len(row_starts))))]
    else:
        intra = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool_ex:
                futures = [pool_ex.submit(search, list(range(w, len(row_starts), workers)))
                           for w in range(workers)]
                counts = [f.result() for f in futures]
        finally:
            torch.set_num_threads(intra)
    res.blocks_screened = sum(c[0] for c in counts)
    res.blocks_exact = sum(c[1] for c in counts)
    out = []
    for sign, pool in ((1, pos), (-1, neg)):
        rows, cols = ra[pool.rows], cb[pool.cols]
        out.append(_final(a_in, b_in, rows, cols, k_eff, sign))
    (res.top_values, res.top_rows, res.top_cols) = out[0]
    (res.bottom_values, res.bottom_rows, res.bottom_cols) = out[1]
    log.debug(
        "product_topk %dx%d r=%d: %d/%d blocks screened, %d exact",
        n, m, r, res.blocks_screened, res.blocks_total, res.blocks_exact,
    )
    return res


def product_topk_dense(a: torch.Tensor, b: torch.Tensor, k: int, row_block: int = 256) -> ProductTopK:
    """The baseline: stream row blocks of the full product, keeping a running top-k of
    each sign (no pruning). Exact in the same sense as `product_topk`."""
    _check(a, b, k)
    a32, b32 = a.detach().float().contiguous(), b.detach().float().contiguous()
    n, m = a32.shape[0], b32.shape[0]
    k_eff = min(k, n * m)
    best = {1: (torch.empty(0), torch.empty(0, dtype=torch.long)), -1: (torch.empty(0), torch.empty(0, dtype=torch.long))}
    for r0 in range(0, n, row_block):
        p = torch.mm(a32[r0 : r0 + row_block], b32.t()).reshape(-1)
        for sign in (1, -1):
            vals, idx = torch.topk(p * sign, min(2 * k_eff, p.numel()))
            old_v, old_i = best[sign]
            v = torch.cat([old_v, vals])
            i = torch.cat([old_i, idx + r0 * m])
            top, sel = torch.topk(v, min(2 * k_eff, v.numel()))
            best[sign] = (top, i[sel])
    res = ProductTopK(*(torch.empty(0) for _ in range(6)))
    out = []
    for sign in (1, -1):
        flat = best[sign][1]
        out.append(_final(a32, b32, flat // m, flat % m, k_eff, sign))
    (res.top_values, res.top_rows, res.top_cols) = out[0]
    (res.bottom_values, res.bottom_rows, res.bottom_cols) = out[1]
    return res
