"""Project residual-space vectors onto the vocabulary: scores = W_U @ v, then top-k."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenScore:
    sign: int  # +1: promoted (top-k), -1: suppressed (bottom-k)
    rank: int
    token_id: int
    score: float


def topk_tokens(unembedding: torch.Tensor, vector: torch.Tensor, k: int) -> list[TokenScore]:
    """Top-k and bottom-k tokens of `unembedding @ vector` (unembedding is vocab x d)."""
    scores = unembedding.float() @ vector.float().to(unembedding.device)
    k = min(k, scores.numel())
    out: list[TokenScore] = []
    for sign, (values, ids) in ((1, torch.topk(scores, k)), (-1, torch.topk(-scores, k))):
        for rank, (v, i) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
            out.append(TokenScore(sign, rank, int(i), float(v) * sign))
    return out
