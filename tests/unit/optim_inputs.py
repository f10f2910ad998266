"""Inputs and probes shared by the optimizer tests (CPU, GPU and interpreted Triton)."""

from __future__ import annotations

import torch


def outlier_grad(shape, gen: torch.Generator) -> torch.Tensor:
    """Random float32 gradient with row/column scale structure and large outliers."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if len(shape) >= 2:
        g = g * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen, dtype=torch.float64) * 3
        g = g * torch.rand(shape[-1], generator=gen, dtype=torch.float64)
    flat = g.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 200),), generator=gen)
    flat[idx] *= 100.0
    return g.float()


def count_plan_builds(monkeypatch) -> list[int]:
    """A list that grows by one each time a `_triton.Plan` is built (for the test's duration)."""
    from plasticity.optim import _triton

    builds: list[int] = []
    original = _triton.Plan.__init__

    def counted(self, *args, **kwargs):
        builds.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(_triton.Plan, "__init__", counted)
    return builds
