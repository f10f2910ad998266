"""Corpora for fine-tuning and concept datasets, shipped with the project or read by path."""

from plasticity.data.concepts import Statement, load_statements
from plasticity.data.corpus import load_corpus

__all__ = ["Statement", "load_statements", "load_corpus"]
