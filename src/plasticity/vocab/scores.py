"""Scores of vocabulary projections: concept word lists, drift between checkpoints,
circuit similarity through d x d Gram matrices, and parameter alignment between models."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# -- concept scores ---------------------------------------------------------------------


class RankedScores:
    """A (V x n) score matrix sorted once per column, to score many token sets against
    it, for either sign, without sorting again."""

    def __init__(self, scores: torch.Tensor, k: int):
        v = scores.shape[0]
        if not 0 < k <= v:
            raise ValueError(f"k: expected 1..{v}, got {k}")
        self.v, self.k = v, k
        self.scores = scores.float()
        self.sorted_t = torch.sort(self.scores, dim=0).values.t().contiguous()  # (n x V) asc
        self.top = torch.topk(self.scores, k, dim=0).indices
        self.bottom = torch.topk(-self.scores, k, dim=0).indices

    def _ascending_ranks(self, ids: torch.Tensor) -> torch.Tensor:
        """Average ascending rank (1 = lowest, ties share their mean) of tokens `ids`."""
        cs = self.scores[ids].t().contiguous()  # (n x m)
        lo = torch.searchsorted(self.sorted_t, cs, right=False) + 1
        hi = torch.searchsorted(self.sorted_t, cs, right=True)
        return ((lo + hi).double() / 2).t()  # (m x n)

    def concept(self, concept_ids: torch.Tensor, sign: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """precision@k, AUROC and mean rank (1 = top) of the concept tokens for
        `sign` * scores, per column (float64)."""
        ids = torch.unique(concept_ids.long())
        if ids.numel() == 0:
            raise ValueError("concept_ids: the concept has no token in this vocabulary")
        if int(ids.max()) >= self.v or int(ids.min()) < 0:
            raise ValueError(f"concept_ids: ids outside the vocabulary of {self.v} tokens")
        if sign not in (1, -1):
            raise ValueError(f"sign: expected +1 or -1, got {sign!r}")
        m, v = ids.numel(), self.v
        asc = self._ascending_ranks(ids)
        if sign < 0:
            asc = v + 1 - asc  # ranks of the negated scores
        u = asc.sum(0) - m * (m + 1) / 2
        auroc = u / (m * (v - m)) if v > m else torch.full_like(u, float("nan"))
        mean_rank = (v + 1 - asc).mean(0)
        member = torch.zeros(v, dtype=torch.bool)
        member[ids] = True
        top = self.top if sign > 0 else self.bottom
        return member[top].double().mean(0), auroc, mean_rank


def concept_scores(
    scores: torch.Tensor, concept_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each column of `scores` (V x n): precision@k of the concept tokens among the
    top k, AUROC of concept tokens against the rest (the probability that a concept
    token outscores another token, ties counted half) and the mean rank (1 = top) of the
    concept tokens. Returns three tensors of n values (float64)."""
    return RankedScores(scores, k).concept(concept_ids, 1)


def null_percentile(observed: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Percentile (0-100) of each observed value within the null sample (ties half)."""
    obs = observed.double().unsqueeze(1)
    nul = null.double().unsqueeze(0)
    below = (nul < obs).double().sum(1) + 0.5 * (nul == obs).double().sum(1)
    return 100.0 * below / null.numel()


# -- drift -------------------------------------------------------------------------------


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else float("nan")


def average_ranks(s: torch.Tensor) -> torch.Tensor:
    """Ascending ranks (1 = lowest) of each column of `s` (V x n), ties sharing their mean.

    Returned as float32, which holds every rank and half-rank exactly up to 2**23 rows;
    the ranks of a checkpoint's projections can then be computed once and reused for
    every pair of checkpoints."""
    sv, order = torch.sort(s, dim=0)
    # In sorted order, each value's run of equal values spans [first, last]; its rank is
    # their mean plus one. Runs are found in one pass (cumulative max/min), so ties cost
    # no more than distinct values. NaNs, sorted last, rank as distinct values.
    v = s.shape[0]
    pos = torch.arange(v).unsqueeze(1).expand_as(s)
    starts = torch.ones(s.shape, dtype=torch.bool)
    starts[1:] = sv[1:] != sv[:-1]
    ends = torch.ones(s.shape, dtype=torch.bool)
    ends[:-1] = starts[1:]
    first = torch.where(starts, pos, 0).cummax(0).values
    last = torch.where(ends, pos, v).flip(0).cummin(0).values.flip(0)
    return torch.empty(s.shape, dtype=torch.float32).scatter_(0, order, (first + last).float() / 2 + 1)


def spearman_from_ranks(rx: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each column pair of two rank matrices (V x n)."""
    rx, ry = rx.double(), ry.double()
    rx, ry = rx - rx.mean(0), ry - ry.mean(0)
    return (rx * ry).sum(0) / (rx.norm(dim=0) * ry.norm(dim=0))


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each column pair (V x n), average ranks for ties."""
    return spearman_from_ranks(average_ranks(x), average_ranks(y))


def cosine_columns(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double(), y.double()
    return (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0))


# -- circuits ------------------------------------------------------------------------------


def circuit_inner(
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
    cross_left: torch.Tensor, cross_right: torch.Tensor,
) -> float:
    """<L1 a1 b1^T R1^T, L2 a2 b2^T R2^T> (Frobenius) without building the V x V matrices.

    a_i, b_i: d x r factors of the d x d middle matrix M_i = a_i b_i^T; cross_left =
    L1^T L2 and cross_right = R1^T R2 (d x d). Equals tr(M1^T CL M2 CR^T)."""
    a1, b1, a2, b2 = (t.double() for t in (a1, b1, a2, b2))
    cl, cr = cross_left.double(), cross_right.double()
    # tr(b1 a1^T CL a2 b2^T CR^T) = tr((a1^T CL a2)(b2^T CR^T b1))
    return float(torch.trace((a1.t() @ cl @ a2) @ (b2.t() @ cr.t() @ b1)))


def gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x^T y in float64 (d x d for V x d embeddings)."""
    return x.double().t() @ y.double()


def circuit_cosine(
    factors_1: tuple[torch.Tensor, torch.Tensor], factors_2: tuple[torch.Tensor, torch.Tensor],
    left_1: torch.Tensor, right_1: torch.Tensor, left_2: torch.Tensor, right_2: torch.Tensor,
    gram_fn=gram,
) -> float:
    """Cosine between L1 M1 R1^T and L2 M2 R2^T (vocab x vocab), M_i = a_i b_i^T, via
    d x d Gram matrices of the embeddings L_i, R_i (V x d). `gram_fn(x, y)` computes
    x^T y; pass a caching one when many circuits share embeddings."""
    l1, r1, l2, r2 = left_1, right_1, left_2, right_2
    g_l11, g_r11 = gram_fn(l1, l1), gram_fn(r1, r1)
    g_l22, g_r22 = gram_fn(l2, l2), gram_fn(r2, r2)
    g_l12, g_r12 = gram_fn(l1, l2), gram_fn(r1, r2)
    (a1, b1), (a2, b2) = factors_1, factors_2
    n1 = circuit_inner(a1, b1, a1, b1, g_l11, g_r11)
    n2 = circuit_inner(a2, b2, a2, b2, g_l22, g_r22)
    return circuit_inner(a1, b1, a2, b2, g_l12, g_r12) / (n1 * n2) ** 0.5


# -- parameter alignment -----------------------------------------------------------------


def vocab_correlation(x: torch.Tensor, y: torch.Tensor, e_x: torch.Tensor, e_y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the vocabulary between E_x x_i and E_y y_j for every pair
    of rows (x: n x d, y: m x d; E: V x d sharing the vocabulary), through d x d Gram
    matrices of the centred embeddings: never a length-V vector per parameter."""
    if e_x.shape[0] != e_y.shape[0]:
        raise ValueError(f"e_x, e_y: vocabularies differ ({e_x.shape[0]} vs {e_y.shape[0]} tokens)")
    ex, ey = e_x.double(), e_y.double()
    ex, ey = ex - ex.mean(0), ey - ey.mean(0)
    c_xy, c_xx, c_yy = ex.t() @ ey, ex.t() @ ex, ey.t() @ ey
    xd, yd = x.double(), y.double()
    cov = xd @ c_xy @ yd.t()
    sx = ((xd @ c_xx) * xd).sum(1).clamp_min(0).sqrt()
    sy = ((yd @ c_yy) * yd).sum(1).clamp_min(0).sqrt()
    return cov / (sx.unsqueeze(1) * sy.unsqueeze(0))


def matched_correlation(corr: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean correlation of the one-to-one matching of rows to columns that maximises it
    (Hungarian algorithm); returns the mean and the matched column of each row."""
    from scipy.optimize import linear_sum_assignment

    c = torch.nan_to_num(corr.double(), nan=-1.0).numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].mean()), torch.as_tensor(cols)


@dataclass
class Alignment:
    """Per layer pair (i of model x, j of model y): mean Hungarian-matched correlation of
    the layers' parameter vectors in vocabulary space; `layer_match[i]` is the layer of y
    the Hungarian matching of layers assigns to layer i of x."""

    layers_x: list[int]
    layers_y: list[int]
    score: torch.Tensor  # (len(layers_x), len(layers_y))
    layer_match: dict[int, int]


def centred_gram(x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(x - mean x)^T (y - mean y) in float64 for (V x d) matrices, a block of rows at a
    time: no float64 copy of either matrix is made (over Gemma's 262,144 tokens each
    would take 1.3 GB)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y: expected the same rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    v = x.shape[0]

    def mean(m: torch.Tensor) -> torch.Tensor:
        return sum(m[i : i + chunk].double().sum(0) for i in range(0, v, chunk)) / v

    mx = mean(x)
    my = mx if y is x else mean(y)
    out = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    for i in range(0, v, chunk):
        bx = x[i : i + chunk].double() - mx
        by = bx if y is x else y[i : i + chunk].double() - my
        out += bx.t() @ by
    return out


class CentredGrams:
    """`centred_gram(x, y)` computed once per pair of tensors within a stage (keyed by
    the tensors' identity, so the tensors must stay alive while it is used)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (id(x), id(y))
        if key not in self._cache:
            back = self._cache.get((id(y), id(x)))
            self._cache[key] = back.t() if back is not None else centred_gram(x, y)
        return self._cache[key]


def align_layers(
    vectors_x: dict[int, torch.Tensor], vectors_y: dict[int, torch.Tensor],
    e_x: torch.Tensor, e_y: torch.Tensor, grams: CentredGrams | None = None,
) -> Alignment:
    """Align two models' layers by their parameter vectors (e.g. FF keys) in vocabulary
    space: vectors_* map a layer to its (n x d) vectors. Pass `grams` to reuse the
    embeddings' Gram matrices across calls (every pair of checkpoints and object)."""
    from scipy.optimize import linear_sum_assignment

    lx, ly = sorted(vectors_x), sorted(vectors_y)
    if not lx or not ly:
        raise ValueError("vectors_x, vectors_y: need at least one layer each")
    grams = grams or CentredGrams()
    c_xy, c_xx, c_yy = grams(e_x, e_y), grams(e_x, e_x), grams(e_y, e_y)
    norm_x = {i: ((vectors_x[i].double() @ c_xx) * vectors_x[i].double()).sum(1).sqrt() for i in lx}
    norm_y = {j: ((vectors_y[j].double() @ c_yy) * vectors_y[j].double()).sum(1).sqrt() for j in ly}
    proj_x = {i: vectors_x[i].double() @ c_xy for i in lx}
    score = torch.empty(len(lx), len(ly), dtype=torch.float64)
    for a, i in enumerate(lx):
        for b, j in enumerate(ly):
            corr = (proj_x[i] @ vectors_y[j].double().t()) / (
                norm_x[i].unsqueeze(1) * norm_y[j].unsqueeze(0)
            )
            score[a, b] = matched_correlation(corr)[0]
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    return Alignment(lx, ly, score, {lx[r]: ly[c] for r, c in zip(rows, cols, strict=True)})
