"""Direction readers: pure functions of activations.

Inputs are (n_pairs, d) activations of the positive and negative member of each pair,
and for PCA the members in presentation order (the order each pair was shown in, which
RepE shuffles), so that the paired differences carry random signs.
"""

from __future__ import annotations

import torch


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Unit vector along mean(positive) - mean(negative)."""
    diff = positive.double().mean(0) - negative.double().mean(0)
    norm = diff.norm()
    if norm == 0:
        raise ValueError("positive and negative activations have the same mean")
    return (diff / norm).float()


def pca_direction(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Top principal component of the centred paired differences (first - second, in
    presentation order), by a full SVD in float64; with its explained-variance ratio.

    The sign of a principal component is arbitrary: fix it with `vote_sign`.
    """
    diffs = first.double() - second.double()
    diffs = diffs - diffs.mean(0)
    _, s, vh = torch.linalg.svd(diffs, full_matrices=False)
    total = float((s**2).sum())
    if total == 0:
        raise ValueError("the paired differences have no variance")
    return vh[0].float(), float(s[0] ** 2) / total


def random_direction(d: int, seed: int) -> torch.Tensor:
    """A unit Gaussian direction: the null against which real directions are read."""
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm()).float()


def detection_accuracy(direction: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Share of pairs whose positive member projects higher than its negative member."""
    d = direction.double()
    return float(((positive.double() @ d) > (negative.double() @ d)).double().mean())


def vote_sign(direction: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> int:
    """RepE's vote: +1 if the positive member projects higher in most pairs, else -1."""
    return 1 if detection_accuracy(direction, positive, negative) >= 0.5 else -1


def explained_variance(direction: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> float:
    """Share of the variance of the centred paired differences (first - second, in
    presentation order, as PCA sees them) that lies along `direction`."""
    diffs = first.double() - second.double()
    diffs = diffs - diffs.mean(0)
    total = float((diffs**2).sum())
    if total == 0:
        return 0.0
    u = direction.double() / direction.double().norm()
    return float(((diffs @ u) ** 2).sum()) / total
