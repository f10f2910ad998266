"""Direction readers: pure functions of activations."""

from __future__ import annotations

import torch


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Unit vector along mean(positive) - mean(negative); inputs are (n, d)."""
    diff = positive.double().mean(0) - negative.double().mean(0)
    norm = diff.norm()
    if norm == 0:
        raise ValueError("positive and negative activations have the same mean")
    return (diff / norm).float()


def detection_accuracy(direction: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Share of pairs whose positive member projects higher than its negative member."""
    d = direction.double()
    return float(((positive.double() @ d) > (negative.double() @ d)).double().mean())


def explained_variance(direction: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Share of the variance of the centred paired differences that lies along `direction`."""
    diffs = positive.double() - negative.double()
    diffs = diffs - diffs.mean(0)
    total = float((diffs**2).sum())
    if total == 0:
        return 0.0
    along = float(((diffs @ direction.double()) ** 2).sum())
    return along / total
