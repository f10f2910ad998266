"""Project residual-space vectors onto the vocabulary: scores = E @ v, then top-k.

Variants (as in "Analyzing Transformers in Embedding Space"):
- ``raw``: ``E v`` through the unembedding E (V x d);
- ``lnf``: the final norm's gain applied to the (for LayerNorm: centred) vector first,
  ``E (g * (v - mean(v)))``, without the division by the norm, which does not change
  the ranking;
- ``raw_in``: ``E_in v`` through the input embedding, for models whose input and output
  embeddings are not tied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VARIANTS = ("raw", "lnf", "raw_in")


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


def prepare(vectors: torch.Tensor, variant: str, norm=None) -> torch.Tensor:
    """The vectors (n x d) as the variant projects them (lnf: gain times centred)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    x = vectors.float()
    if variant == "lnf":
        if norm is None:
            raise ValueError("norm: the lnf variant needs the final norm (gain, centring)")
        x = norm.apply(x)
    return x


def project(embedding: torch.Tensor, vectors: torch.Tensor, variant: str = "raw", norm=None,
            chunk: int = 256) -> torch.Tensor:
    """Vocabulary scores of n vectors: (V x n) = E @ prepare(vectors).T, in float32."""
    if vectors.ndim != 2 or vectors.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"vectors: expected (n, {embedding.shape[1]}), got {tuple(vectors.shape)}"
        )
    x = prepare(vectors, variant, norm).to(embedding.device)
    e = embedding.float()
    return torch.cat([e @ x[i : i + chunk].t() for i in range(0, max(len(x), 1), chunk)], dim=1)


def topk_columns(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column of a (V x n) score matrix: top-k (values, ids) and bottom-k (values, ids),
    each (k x n), best first."""
    k = min(k, scores.shape[0])
    top_v, top_i = torch.topk(scores, k, dim=0)
    bot_v, bot_i = torch.topk(-scores, k, dim=0)
    return top_v, top_i, -bot_v, bot_i
