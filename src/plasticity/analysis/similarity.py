"""Cosine similarity between checkpoints' directions, from the `directions` table."""

from __future__ import annotations

import torch

from plasticity.storage.shards import Rows


def direction_similarity(directions, method: str) -> dict[str, list]:
    """Cosine between every two checkpoints' directions of one reader, per concept and layer."""
    rows = [r for r in directions.to_pylist() if r["method"] == method]
    out = Rows("direction_similarity")
    groups: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    for r in rows:
        groups.setdefault((r["concept"], r["layer"]), {})[r["checkpoint_step"]] = torch.tensor(
            r["vector"], dtype=torch.float64
        )
    for (concept, layer), by_step in sorted(groups.items()):
        steps = sorted(by_step)
        for a in steps:
            for b in steps:
                va, vb = by_step[a], by_step[b]
                cos = float(va @ vb / (va.norm() * vb.norm()))
                out.add(concept=concept, layer=layer, step_a=a, step_b=b, cosine=cos)
    return out.columns
