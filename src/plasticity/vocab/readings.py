"""Vocabulary-space readings of one checkpoint's weights: the vectors it projects
(steering directions, FF and attention weight vectors and their deltas against the base
model, top singular vectors of every weight delta), the delta norms, and the OV and QK
circuits of each head as thin factors of their vocab x vocab matrices."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plasticity.config import RunConfig
from plasticity.models.loading import LoadedModel
from plasticity.storage.shards import Rows
from plasticity.vocab import weights as W

ATTENTION_OBJECTS = ("attn_q", "attn_k", "attn_v", "attn_out")
TOP_SINGULAR_VALUES = 5


@dataclass
class VectorSet:
    """The d-vectors one checkpoint projects, with their identity."""

    keys: list[tuple[str, int | None, int | None, int]] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, obj: str, layer: int | None, head: int | None, index: int, v: torch.Tensor) -> None:
        self.keys.append((obj, layer, head, index))
        self.rows.append(v.detach().float().cpu())

    def matrix(self, d: int) -> torch.Tensor:
        return torch.stack(self.rows) if self.rows else torch.empty(0, d)


def head_index(obj: str, i: int, d_head: int) -> tuple[int | None, int]:
    return (i // d_head, i % d_head) if obj in ATTENTION_OBJECTS else (None, i)


def canonical_sign(v: torch.Tensor) -> torch.Tensor:
    """Singular vectors have no sign: make the largest-magnitude component positive."""
    return v if v[v.abs().argmax()] >= 0 else -v


def delta_svd(delta: torch.Tensor, side: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular values of `delta` and its singular vectors on the residual side
    (rows for side 0, columns for side 1), from the d x d Gram matrix in float64."""
    x = delta.float()
    gram = (x @ x.t() if side == 0 else x.t() @ x).double()
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    return evals[:k].sqrt(), evecs[:, :k].t()


def weight_vectors(cfg: RunConfig, lm: LoadedModel, base: LoadedModel | None,
                        is_base: bool, vecs: VectorSet, layers: list[int]) -> None:
    v = cfg.vocab
    n = v.vectors_per_object
    for layer in layers:
        cur = W.layer_vectors(lm, layer)
        ref = W.layer_vectors(base, layer) if base is not None else cur
        d_head = W.head_weights(lm, layer).q.shape[-1]
        for obj in v.objects:
            if obj not in cur:
                continue
            sel = torch.topk(ref[obj].norm(dim=1), min(n, len(ref[obj]))).indices.sort().values
            for i in sel.tolist():
                head, idx = head_index(obj, i, d_head)
                vecs.add(obj, layer, head, idx, cur[obj][i])
            if base is None or is_base:
                continue
            delta = cur[obj] - ref[obj]
            sel = torch.topk(delta.norm(dim=1), min(n, len(delta))).indices.sort().values
            for i in sel.tolist():
                head, idx = head_index(obj, i, d_head)
                vecs.add(f"{obj}_delta", layer, head, idx, delta[i])


def delta_stats(cfg: RunConfig, lm: LoadedModel, base: LoadedModel, vecs: VectorSet,
                 e_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Rows:
    """delta_stats rows for every weight matrix (and attention head) of every layer and
    the embeddings; the top singular vectors of each layer matrix's delta go to `vecs`."""
    rows = Rows("delta_stats")
    n_heads, n_kv = W._config_heads(lm.model.config)

    def stats(delta: torch.Tensor, ref: torch.Tensor, side: int) -> tuple[float, float, list[float]]:
        dn, rn = float(delta.double().norm()), float(ref.double().norm())
        sv, _ = delta_svd(delta, side, TOP_SINGULAR_VALUES)
        return dn, dn / rn if rn > 0 else float("nan"), sv.tolist()

    for name, (cur, ref) in e_pairs.items():
        dn, rel, sv = stats(cur - ref, ref, 1)
        rows.add(param=name, layer=None, head=None, delta_norm=dn, relative_delta_norm=rel,
                 top_singular_values=sv)
    for layer in range(lm.n_layers):
        cur, ref = W.param_matrices(lm, layer), W.param_matrices(base, layer)
        for param, m in cur.items():
            delta, side = m - ref[param], W.RESIDUAL_SIDE[param]
            dn, rn = float(delta.double().norm()), float(ref[param].double().norm())
            sv, vectors = delta_svd(delta, side, max(cfg.vocab.delta_svd, TOP_SINGULAR_VALUES))
            rows.add(param=param, layer=layer, head=None, delta_norm=dn,
                     relative_delta_norm=dn / rn if rn > 0 else float("nan"),
                     top_singular_values=sv[:TOP_SINGULAR_VALUES].tolist())
            for i in range(min(cfg.vocab.delta_svd, len(vectors))):
                vecs.add(f"svd_{param}", layer, None, i, canonical_sign(vectors[i]).float())
            if param.startswith("attn_"):
                heads = n_kv if param in ("attn_k", "attn_v") else n_heads
                width = delta.shape[1] if side == 0 else delta.shape[0]
                dh = width // heads
                for h in range(heads):
                    sl = slice(h * dh, (h + 1) * dh)
                    dh_m, ref_m = (delta[:, sl], ref[param][:, sl]) if side == 0 else (
                        delta[sl], ref[param][sl])
                    dn, rel, sv = stats(dh_m, ref_m, side)
                    rows.add(param=param, layer=layer, head=h, delta_norm=dn,
                             relative_delta_norm=rel, top_singular_values=sv)
    return rows


def circuit_factors(lm: LoadedModel, layer: int, head: int, circuit: str,
                    base: LoadedModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin factors (A, B), V x r each, with A @ B.T the circuit's vocab x vocab matrix:
    OV = E_in W_V W_O E_out^T (rows: attended token, columns: promoted token), QK =
    E_in W_Q W_K^T E_in^T (rows: query token, columns: key token); delta_* subtract
    the base model's circuit (each model through its own embeddings)."""
    def one(m: LoadedModel, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        e_in, e_out, _ = W.embeddings(m)
        hw = W.head_weights(m, layer)
        if not 0 <= head < hw.n_heads:
            raise ValueError(f"vocab.circuit_heads: head {head} outside 0..{hw.n_heads - 1}")
        e_in, e_out = e_in.float(), e_out.float()
        if kind == "ov":
            return e_in @ hw.v[head].float(), e_out @ hw.o[head].float().t()
        return e_in @ hw.q[head].float(), e_in @ hw.k[head].float()

    if circuit in ("ov", "qk"):
        return one(lm, circuit)
    if circuit not in ("delta_ov", "delta_qk"):
        raise ValueError(f"circuit: expected ov, qk, delta_ov or delta_qk, got {circuit!r}")
    if base is None:
        raise ValueError(f"circuit {circuit}: needs the base model")
    a1, b1 = one(lm, circuit[6:])
    a0, b0 = one(base, circuit[6:])
    return torch.cat([a1, a0], dim=1), torch.cat([b1, -b0], dim=1)


def middle_factors(lm: LoadedModel, layer: int, head: int, circuit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) d x d_head factors of the circuit's d x d middle matrix."""
    hw = W.head_weights(lm, layer)
    if circuit == "ov":
        return hw.v[head].float(), hw.o[head].float().t()
    return hw.q[head].float(), hw.k[head].float()


class TokenDecoder:
    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tok.decode([token_id])
        return self.cache[token_id]
