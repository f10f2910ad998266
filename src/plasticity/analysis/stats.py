"""Statistics of the plasticity grid: per-item slopes, bootstrap CIs, Kruskal-Wallis,
Dunn's post-hoc test with Bonferroni correction, and critical windows.

A stage's *plasticity* for one item is the least-squares slope of the item's effect
(steered metric minus unsteered metric) against `alpha_rel`. Stages are compared on
those per-item slopes: Kruskal-Wallis across all stages, then Dunn's pairwise z-tests
on the pooled ranks (Dunn 1964, with the tie correction), Bonferroni-adjusted over the
k(k-1)/2 pairs. A stage is a *critical window* when its mean slope is above both of
its neighbours' on the timeline and both differences are significant after adjustment;
the first and last stages have one neighbour and are never flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def item_slopes(alphas: np.ndarray, effects: np.ndarray) -> np.ndarray:
    """Least-squares slope of each item's effect against alpha.

    `alphas` is (A,), `effects` (A, N): one column per item. Returns (N,).
    """
    x = np.asarray(alphas, dtype=np.float64)
    y = np.asarray(effects, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"item_slopes: alphas (A,) and effects (A, N), got {x.shape} and {y.shape}")
    xc = x - x.mean()
    denom = float((xc**2).sum())
    if denom == 0:
        raise ValueError("item_slopes: need at least two distinct alphas")
    return (xc[:, None] * (y - y.mean(0, keepdims=True))).sum(0) / denom


def bootstrap_mean_ci(
    values: np.ndarray, n_resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        m = float(v.mean()) if len(v) else float("nan")
        return m, m
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_resamples, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def kruskal(groups: list[np.ndarray]) -> tuple[float, float]:
    """Kruskal-Wallis H and its p-value; (nan, 1.0) when every value is the same."""
    from scipy import stats

    if len(groups) < 2:
        raise ValueError("kruskal: need at least two groups")
    pooled = np.concatenate([np.asarray(g, dtype=np.float64) for g in groups])
    if np.all(pooled == pooled[0]):
        return float("nan"), 1.0
    res = stats.kruskal(*groups)
    return float(res.statistic), float(res.pvalue)


@dataclass(frozen=True)
class DunnResult:
    z: np.ndarray  # (k, k): (mean rank i - mean rank j) / sigma_ij
    p: np.ndarray  # two-sided, unadjusted
    p_adjusted: np.ndarray  # Bonferroni over k(k-1)/2 pairs, capped at 1


def dunn(groups: list[np.ndarray]) -> DunnResult:
    """Dunn's test of every pair of groups on the pooled ranks, with the tie correction."""
    from scipy import stats

    k = len(groups)
    if k < 2:
        raise ValueError("dunn: need at least two groups")
    sizes = np.array([len(g) for g in groups])
    if (sizes == 0).any():
        raise ValueError("dunn: every group needs at least one value")
    pooled = np.concatenate([np.asarray(g, dtype=np.float64) for g in groups])
    n = len(pooled)
    ranks = stats.rankdata(pooled)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    mean_rank = np.array([ranks[bounds[i] : bounds[i + 1]].mean() for i in range(k)])
    _, ties = np.unique(pooled, return_counts=True)
    tie_term = float((ties**3 - ties).sum()) / (12.0 * (n - 1)) if n > 1 else 0.0
    var = n * (n + 1) / 12.0 - tie_term
    z = np.zeros((k, k))
    p = np.ones((k, k))
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            sigma = np.sqrt(max(var, 0.0) * (1.0 / sizes[i] + 1.0 / sizes[j]))
            if sigma == 0:
                continue
            z[i, j] = (mean_rank[i] - mean_rank[j]) / sigma
            p[i, j] = 2.0 * stats.norm.sf(abs(z[i, j]))
    m = k * (k - 1) / 2
    p_adj = np.minimum(1.0, p * m)
    np.fill_diagonal(p_adj, 1.0)
    return DunnResult(z=z, p=p, p_adjusted=p_adj)


def critical_windows(means: np.ndarray, p_adjusted: np.ndarray, level: float = 0.05) -> list[bool]:
    """Stages whose mean is above both neighbours', each difference significant."""
    k = len(means)
    flags = []
    for s in range(k):
        if s == 0 or s == k - 1:
            flags.append(False)
            continue
        above = means[s] > means[s - 1] and means[s] > means[s + 1]
        significant = p_adjusted[s, s - 1] < level and p_adjusted[s, s + 1] < level
        flags.append(bool(above and significant))
    return flags


def compare_stages(
    stages: list[int], slopes: list[np.ndarray], level: float = 0.05
) -> list[dict]:
    """Rows of `plasticity_stats` (without scope/concept/metric keys) for one comparison:
    one Kruskal-Wallis row, a Dunn row per ordered pair a < b, a window row per stage."""
    order = np.argsort(stages)
    stages = [stages[i] for i in order]
    slopes = [np.asarray(slopes[i], dtype=np.float64) for i in order]
    h, p = kruskal(slopes)
    rows = [dict(test="kruskal", stage_a=None, stage_b=None, statistic=h, p_value=p,
                 p_adjusted=p, critical_window=None)]
    d = dunn(slopes)
    for i in range(len(stages)):
        for j in range(i + 1, len(stages)):
            rows.append(dict(test="dunn", stage_a=stages[i], stage_b=stages[j],
                             statistic=float(d.z[i, j]), p_value=float(d.p[i, j]),
                             p_adjusted=float(d.p_adjusted[i, j]), critical_window=None))
    means = np.array([s.mean() for s in slopes])
    flags = critical_windows(means, d.p_adjusted, level)
    for i, stage in enumerate(stages):
        neighbours = [d.p_adjusted[i, j] for j in (i - 1, i + 1) if 0 <= j < len(stages)]
        rows.append(dict(test="window", stage_a=stage, stage_b=None, statistic=float(means[i]),
                         p_value=float(max(neighbours)) if neighbours else 1.0,
                         p_adjusted=float(max(neighbours)) if neighbours else 1.0,
                         critical_window=flags[i]))
    return rows
