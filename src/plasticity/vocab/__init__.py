"""Vocabulary-space readings of vectors: projections through the unembedding, top-k."""

from plasticity.vocab.project import TokenScore, topk_tokens

__all__ = ["TokenScore", "topk_tokens"]
