"""Statistics with runs as the unit: a study's replicates are its seeds.

Within one run, a cell of the plasticity matrix is a vector of per-item slopes. Across
the runs of a group (the same model and settings, different seeds) a cell's value is the
mean over runs of each run's mean item slope. Its CI is a hierarchical (two-stage)
bootstrap: resample the runs with replacement, then within each drawn run its items with
replacement, and average (Davison & Hinkley 1997, section 3.8; Ren et al. 2010), so
both the seed-to-seed and the item-to-item variation widen it. With one run it reduces
to the item bootstrap.

Across checkpoints, self-plasticity is compared with the runs as blocks: Friedman's test
over all checkpoints (a repeated-measures rank test: every run is measured at every
checkpoint), and for each pair of neighbouring checkpoints and for the base against
every later one, the paired difference: its mean over runs, a hierarchical bootstrap CI
(items paired too, since every checkpoint of a run is scored on the same items), a
paired t-test across runs with Holm's adjustment, and how many runs agree in sign.

A checkpoint is called a critical window only when it holds across seeds: its mean is
above both neighbours', both differences' CIs lie above 0, and every run is above both
neighbours. The first and last checkpoints have one neighbour and are never called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def hierarchical_bootstrap(
    runs: list[np.ndarray], n_resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean of run means, CI low, CI high) of per-item values grouped by run."""
    runs = [np.asarray(r, dtype=np.float64) for r in runs if len(r)]
    if not runs:
        return float("nan"), float("nan"), float("nan")
    point = float(np.mean([r.mean() for r in runs]))
    rng = np.random.default_rng(seed)
    n = len(runs)
    picks = rng.integers(0, n, size=(n_resamples, n))
    # Each of the n draws of a resample resamples the items of its run afresh (a run
    # drawn twice gets two item resamples): means[k, b, j] is slot (b, j) filled by run k.
    means = np.stack(
        [r[rng.integers(0, len(r), size=(n_resamples, n, len(r)))].mean(-1) for r in runs]
    )
    stats = means[picks, np.arange(n_resamples)[:, None], np.arange(n)[None, :]].mean(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)


def friedman(blocks: np.ndarray) -> tuple[float, float]:
    """Friedman's chi-square and p over (runs, checkpoints); (nan, nan) when it cannot
    be computed (fewer than 2 runs or 3 checkpoints, or every value tied within runs)."""
    from scipy import stats

    x = np.asarray(blocks, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 3:
        return float("nan"), float("nan")
    if np.all(x == x[:, :1]):
        return float("nan"), float("nan")
    res = stats.friedmanchisquare(*x.T)
    return float(res.statistic), float(res.pvalue)


def paired_t(diffs: np.ndarray) -> tuple[float, float]:
    """One-sample t-test of per-run paired differences against 0; nan below 2 runs or
    when every difference is the same."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2 or np.all(d == d[0]):
        return float("nan"), float("nan")
    res = stats.ttest_1samp(d, 0.0)
    return float(res.statistic), float(res.pvalue)


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment; nan p-values stay nan and do not count."""
    idx = [i for i, v in enumerate(p) if v == v]
    order = sorted(idx, key=lambda i: p[i])
    m = len(order)
    out = [float("nan")] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class Comparison:
    """The paired difference a - b of two checkpoints' self-plasticity over a group's runs."""

    a: float  # fraction of training
    b: float
    diff: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float
    n_runs: int
    n_agree: int  # runs whose difference has the sign of the mean difference


def compare(
    a: float, b: float, slopes_a: list[np.ndarray], slopes_b: list[np.ndarray],
    n_resamples: int, seed: int,
) -> Comparison:
    """Paired by run and by item: each run's item slopes at a minus those at b."""
    diffs = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
             for x, y in zip(slopes_a, slopes_b, strict=True)]
    mean, lo, hi = hierarchical_bootstrap(diffs, n_resamples, seed)
    per_run = np.array([d.mean() for d in diffs])
    t, p = paired_t(per_run)
    sign = np.sign(mean)
    agree = int(np.sum(np.sign(per_run) == sign)) if sign != 0 else 0
    return Comparison(a, b, mean, lo, hi, t, p, len(diffs), agree)


def critical_windows(
    fractions: list[float], run_means: np.ndarray, comparisons: dict[tuple[float, float], Comparison]
) -> list[bool]:
    """Per checkpoint (in `fractions` order): called a critical window across seeds."""
    k = len(fractions)
    flags = []
    for s in range(k):
        if s == 0 or s == k - 1:
            flags.append(False)
            continue
        here, left, right = run_means[:, s], run_means[:, s - 1], run_means[:, s + 1]
        above = here.mean() > left.mean() and here.mean() > right.mean()
        every_run = bool(np.all(here > left) and np.all(here > right))
        c_left = comparisons.get((fractions[s], fractions[s - 1]))
        c_right = comparisons.get((fractions[s], fractions[s + 1]))
        ci = c_left is not None and c_right is not None and c_left.ci_low > 0 and c_right.ci_low > 0
        flags.append(bool(above and every_run and ci))
    return flags
