"""How a checkpoint's vocabulary readings drift from another's: Jaccard@k of the top
and bottom tokens, Spearman over the vocabulary and cosine in vocabulary space of every
object, circuit cosine through d x d Gram matrices, and the `token_meta` rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plasticity.config import RunConfig
from plasticity.storage.shards import Rows
from plasticity.vocab import weights as W
from plasticity.vocab.concepts import concept_name, concept_token_ids
from plasticity.vocab.project import project
from plasticity.vocab.scores import (
    average_ranks,
    circuit_cosine,
    cosine_columns,
    gram,
    jaccard,
    spearman_from_ranks,
)


@dataclass
class CheckpointVocab:
    step: int
    e_in: torch.Tensor
    e_out: torch.Tensor
    norm: W.FinalNorm
    keys: dict[tuple, int]
    vectors: torch.Tensor
    tensors: dict[str, torch.Tensor]


class Projections:
    """Each checkpoint's projections of all its vectors, their ranks and top/bottom-k
    token ids, per variant: computed once, reused for every pair of checkpoints."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}

    def get(self, c: CheckpointVocab, variant: str) -> tuple[torch.Tensor, ...]:
        key = (c.step, variant)
        if key not in self._cache:
            base_variant = "raw" if variant == "raw_in" else variant
            s = project(c.e_in if variant == "raw_in" else c.e_out, c.vectors, base_variant, c.norm)
            top, bot = torch.topk(s, self.k, dim=0).indices, torch.topk(-s, self.k, dim=0).indices
            self._cache[key] = (s, average_ranks(s), top, bot)
        return self._cache[key]


def drift_rows(
    a: CheckpointVocab, b: CheckpointVocab, variants: list[str], k: int, rows: Rows,
    projections: Projections | None = None,
) -> None:
    shared = [key for key in a.keys if key in b.keys]
    if not shared:
        return
    projections = projections or Projections(k)
    ia = torch.tensor([a.keys[key] for key in shared])
    ib = torch.tensor([b.keys[key] for key in shared])
    for variant in variants:
        sa, ra, top_a, bot_a = (t[:, ia] for t in projections.get(a, variant))
        sb, rb, top_b, bot_b = (t[:, ib] for t in projections.get(b, variant))
        rho, cos = spearman_from_ranks(ra, rb), cosine_columns(sa, sb)
        for j, (obj, layer, head, index) in enumerate(shared):
            rows.add(object=obj, variant=variant, layer=layer, head=head, index=index,
                     step_a=a.step, step_b=b.step, k=k,
                     jaccard_at_k=jaccard(top_a[:, j], top_b[:, j]),
                     jaccard_bottom_at_k=jaccard(bot_a[:, j], bot_b[:, j]),
                     spearman=float(rho[j]), vocab_cosine=float(cos[j]))


class Grams:
    """x^T y of embedding matrices, computed once per pair of tensors within a stage."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (id(x), id(y))
        if key not in self._cache:
            self._cache[key] = gram(x, y)
        return self._cache[key]


def circuit_rows(a: CheckpointVocab, b: CheckpointVocab, table, rows: Rows, grams: Grams | None = None) -> None:
    """Circuit drift: Jaccard of the top/bottom entry sets (from circuit_topk) and the
    cosine of the vocab x vocab matrices through d x d Grams (ov, qk)."""
    grams = grams or Grams()
    entries: dict[tuple, dict[int, set]] = {}
    k_of: dict[tuple, int] = {}
    if table is not None:
        for r in table:
            key = (r["checkpoint_step"], r["circuit"], r["layer"], r["head"])
            entries.setdefault(key, {1: set(), -1: set()})[r["sign"]].add((r["src_token_id"], r["dst_token_id"]))
            k_of[key[1:]] = max(k_of.get(key[1:], 0), r["rank"] + 1)
    circuits = sorted({key[1:] for key in entries if key[0] in (a.step, b.step)})
    for circuit, layer, head in circuits:
        ea, eb = entries.get((a.step, circuit, layer, head)), entries.get((b.step, circuit, layer, head))
        if ea is None or eb is None:
            continue

        def jac(x: set, y: set) -> float:
            return len(x & y) / len(x | y) if x | y else float("nan")

        cos = float("nan")
        left_key = f"circuit.{circuit}.{layer}.{head}"
        if f"{left_key}.left" in a.tensors and f"{left_key}.left" in b.tensors:
            fa = (a.tensors[f"{left_key}.left"], a.tensors[f"{left_key}.right"])
            fb = (b.tensors[f"{left_key}.left"], b.tensors[f"{left_key}.right"])
            if circuit == "ov":
                cos = circuit_cosine(fa, fb, a.e_in, a.e_out, b.e_in, b.e_out, grams)
            else:
                cos = circuit_cosine(fa, fb, a.e_in, a.e_in, b.e_in, b.e_in, grams)
        rows.add(object=circuit, variant="raw", layer=layer, head=head, index=0,
                 step_a=a.step, step_b=b.step, k=k_of[(circuit, layer, head)],
                 jaccard_at_k=jac(ea[1], eb[1]), jaccard_bottom_at_k=jac(ea[-1], eb[-1]),
                 spearman=float("nan"), vocab_cosine=cos)


def token_meta_rows(cfg: RunConfig, tokenizer, vocab_size: int) -> Rows:
    rows = Rows("token_meta")
    member: dict[int, list[str]] = {}
    for name in cfg.vocab.concepts:
        for tid in concept_token_ids(tokenizer, name, vocab_size).tolist():
            member.setdefault(tid, []).append(concept_name(name))
    tokens = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    for tid, tok in enumerate(tokens):
        rows.add(token_id=tid, token=tok, leading_space=tok.startswith(" "),
                 is_alpha=tok.strip().isalpha(), concept=",".join(member[tid]) if tid in member else None)
    return rows
