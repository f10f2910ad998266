"""The vocab stage: vocabulary-space readings of one checkpoint, and of the timeline.

Per checkpoint (`vocab_stage`), through that checkpoint's own embeddings:
- every steering direction of every reader and layer (objects ``direction_<method>``);
- in `vocab.layers`, the weight vectors of `vocab.objects` (FF keys/values, attention
  Q/K/V columns and output rows per head) and their deltas against the base checkpoint
  (step 0 of the run; objects ``<object>_delta``);
- in every layer, the top singular vectors (residual side) of each weight matrix's delta
  (objects ``svd_<param>``) and the delta's norms (`delta_stats`);
- per head of `vocab.layers`, the exact top-k entries of the OV and QK circuits and of
  their deltas (`circuit_topk`), never building a vocab x vocab matrix;
- concept scores of every projected vector against the word lists (`concept_scores`).
The vectors it projected and the circuit factors go to
``runs/<run_id>/vocab/step=NNNNNN/vectors.safetensors`` for the timeline comparison.

Across checkpoints (`vocab_similarity_stage`): drift of every object (Jaccard@k of the
top and bottom tokens, Spearman over the vocabulary, cosine in vocabulary space), circuit
cosine through d x d Gram matrices, parameter alignment of FF vectors between
checkpoints (`vocab_alignment`), and `token_meta`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from plasticity.config import RunConfig
from plasticity.models.loading import LoadedModel
from plasticity.storage.fs import Storage
from plasticity.storage.shards import Rows, read_table, write_shard
from plasticity.train.checkpoint import CheckpointRef
from plasticity.vocab import weights as W
from plasticity.vocab.concepts import concept_name, concept_token_ids
from plasticity.vocab.project import project, topk_columns
from plasticity.vocab.scores import (
    RankedScores,
    align_layers,
    average_ranks,
    circuit_cosine,
    cosine_columns,
    gram,
    jaccard,
    null_percentile,
    spearman_from_ranks,
)
from plasticity.vocab.topk import product_topk

if TYPE_CHECKING:
    from plasticity.stages import StageResult

log = logging.getLogger(__name__)

ATTENTION_OBJECTS = ("attn_q", "attn_k", "attn_v", "attn_out")
TOP_SINGULAR_VALUES = 5

# The base model of the last run this process used (the actor keeps it between calls).
_BASE: dict[str, LoadedModel] = {}


def vocab_path(storage: Storage, run_id: str, step: int) -> str:
    return storage.path("runs", run_id, "vocab", f"step={step:06d}", "vectors.safetensors")


def vocab_layers(cfg: RunConfig, n_layers: int) -> list[int]:
    from plasticity.config import layer_sets

    spec, name = cfg.vocab.layers, "vocab.layers"
    if spec is None:
        sets = layer_sets(cfg.plasticity.layers)
        spec = sorted({x for s in sets for x in s}) if sets else [n_layers // 2]
        name = "plasticity.layers"
    bad = [x for x in spec if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"{name}: layers {bad} are outside the model's 0..{n_layers - 1}")
    return list(spec)


def _base_model(cfg: RunConfig, storage: Storage, run_id: str, ckpt: CheckpointRef,
                lm: LoadedModel) -> tuple[LoadedModel | None, int | None]:
    """The run's step-0 checkpoint (None when the run has none)."""
    from plasticity.stages import written_checkpoints
    from plasticity.train.checkpoint import checkpoint_path, load_checkpoint

    if ckpt.step == 0:
        return lm, 0
    steps = [r.step for r in written_checkpoints(storage, run_id, cfg)]
    if 0 not in steps:
        log.warning("run %s has no step-0 checkpoint: no weight deltas", run_id)
        return None, None
    path = checkpoint_path(storage, run_id, 0)
    key = storage.full_uri(path)
    if key not in _BASE:
        _BASE.clear()
        base = load_checkpoint(storage, path, cfg.model)
        base.model.to(next(lm.model.parameters()).device)
        _BASE[key] = base
    return _BASE[key], 0


@dataclass
class _Vectors:
    """The d-vectors one checkpoint projects, with their identity."""

    keys: list[tuple[str, int | None, int | None, int]] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, obj: str, layer: int | None, head: int | None, index: int, v: torch.Tensor) -> None:
        self.keys.append((obj, layer, head, index))
        self.rows.append(v.detach().float().cpu())

    def matrix(self, d: int) -> torch.Tensor:
        return torch.stack(self.rows) if self.rows else torch.empty(0, d)


def _head_index(obj: str, i: int, d_head: int) -> tuple[int | None, int]:
    return (i // d_head, i % d_head) if obj in ATTENTION_OBJECTS else (None, i)


def _canonical_sign(v: torch.Tensor) -> torch.Tensor:
    """Singular vectors have no sign: make the largest-magnitude component positive."""
    return v if v[v.abs().argmax()] >= 0 else -v


def _delta_svd(delta: torch.Tensor, side: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular values of `delta` and its singular vectors on the residual side
    (rows for side 0, columns for side 1), from the d x d Gram matrix in float64."""
    x = delta.float()
    gram = (x @ x.t() if side == 0 else x.t() @ x).double()
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    return evals[:k].sqrt(), evecs[:, :k].t()


def _weights_and_deltas(cfg: RunConfig, lm: LoadedModel, base: LoadedModel | None,
                        is_base: bool, vecs: _Vectors, layers: list[int]) -> None:
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
                head, idx = _head_index(obj, i, d_head)
                vecs.add(obj, layer, head, idx, cur[obj][i])
            if base is None or is_base:
                continue
            delta = cur[obj] - ref[obj]
            sel = torch.topk(delta.norm(dim=1), min(n, len(delta))).indices.sort().values
            for i in sel.tolist():
                head, idx = _head_index(obj, i, d_head)
                vecs.add(f"{obj}_delta", layer, head, idx, delta[i])


def _delta_stats(cfg: RunConfig, lm: LoadedModel, base: LoadedModel, vecs: _Vectors,
                 e_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Rows:
    """delta_stats rows for every weight matrix (and attention head) of every layer and
    the embeddings; the top singular vectors of each layer matrix's delta go to `vecs`."""
    rows = Rows("delta_stats")
    n_heads, n_kv = W._config_heads(lm.model.config)

    def stats(delta: torch.Tensor, ref: torch.Tensor, side: int) -> tuple[float, float, list[float]]:
        dn, rn = float(delta.double().norm()), float(ref.double().norm())
        sv, _ = _delta_svd(delta, side, TOP_SINGULAR_VALUES)
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
            sv, vectors = _delta_svd(delta, side, max(cfg.vocab.delta_svd, TOP_SINGULAR_VALUES))
            rows.add(param=param, layer=layer, head=None, delta_norm=dn,
                     relative_delta_norm=dn / rn if rn > 0 else float("nan"),
                     top_singular_values=sv[:TOP_SINGULAR_VALUES].tolist())
            for i in range(min(cfg.vocab.delta_svd, len(vectors))):
                vecs.add(f"svd_{param}", layer, None, i, _canonical_sign(vectors[i]).float())
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


def _middle_factors(lm: LoadedModel, layer: int, head: int, circuit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) d x d_head factors of the circuit's d x d middle matrix."""
    hw = W.head_weights(lm, layer)
    if circuit == "ov":
        return hw.v[head].float(), hw.o[head].float().t()
    return hw.q[head].float(), hw.k[head].float()


class _Decoder:
    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tok.decode([token_id])
        return self.cache[token_id]


def vocab_stage(
    cfg: RunConfig, run_id: str, ckpt: CheckpointRef, lm: LoadedModel | None = None
) -> StageResult:
    """Vocabulary-space readings of one checkpoint (see the module docstring)."""
    from safetensors.torch import save as save_safetensors

    from plasticity.stages import StageResult, load_vectors
    from plasticity.train.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    v = cfg.vocab
    storage = Storage.from_config(cfg.storage)
    lm = lm or load_checkpoint(storage, ckpt.path, cfg.model)
    layers = vocab_layers(cfg, lm.n_layers)
    base, _ = _base_model(cfg, storage, run_id, ckpt, lm)
    is_base = ckpt.step == 0
    e_in, e_out, tied = W.embeddings(lm)
    e_in, e_out = e_in.float(), e_out.float()
    norm = W.final_norm(lm)
    variants = list(v.variants) + ([] if tied else ["raw_in"])
    decode = _Decoder(lm.tokenizer)
    d = lm.d_model
    part = {"run_id": run_id, "checkpoint_step": ckpt.step}
    result = StageResult()

    # -- the vectors: directions, weight vectors and deltas, delta singular vectors
    vecs = _Vectors()
    c = cfg.concept
    for key, t in sorted(load_vectors(storage, run_id, ckpt.step, c.name).tensors.items()):
        method, _, layer = key.rpartition(".")
        if method in c.methods:
            vecs.add(f"direction_{method}", int(layer), None, 0, t)
    _weights_and_deltas(cfg, lm, base, is_base, vecs, layers)
    if base is not None and not is_base:
        b_in, b_out, _ = W.embeddings(base)
        e_pairs = {"embed_out": (e_out, b_out.float())}
        if not tied:
            e_pairs["embed_in"] = (e_in, b_in.float())
        delta_rows = _delta_stats(cfg, lm, base, vecs, e_pairs)
        result.shards.append(write_shard(storage, "delta_stats", part, "deltas", delta_rows.columns))
    x = vecs.matrix(d)

    # -- projections, top-k tokens and concept scores
    topk_rows, concept_rows = Rows("vocab_topk"), Rows("concept_scores")
    concepts = {concept_name(n): concept_token_ids(lm.tokenizer, n, e_out.shape[0]) for n in v.concepts}
    gen = torch.Generator().manual_seed(v.seed)
    null_vecs = torch.randn(v.null_samples, d, generator=gen)
    k = min(v.top_k, e_out.shape[0])
    for variant in variants:
        emb = e_in if variant == "raw_in" else e_out
        scores = project(emb, x, "raw" if variant == "raw_in" else variant, norm)
        top_v, top_i, bot_v, bot_i = topk_columns(scores, k)
        for j, (obj, layer, head, index) in enumerate(vecs.keys):
            for sign, vals, ids in ((1, top_v, top_i), (-1, bot_v, bot_i)):
                for rank in range(k):
                    tid = int(ids[rank, j])
                    topk_rows.add(object=obj, variant=variant, layer=layer, head=head, index=index,
                                  sign=sign, rank=rank, token_id=tid, token=decode(tid),
                                  score=float(vals[rank, j]))
        null_scores = project(emb, null_vecs, "raw" if variant == "raw_in" else variant, norm)
        ranked, ranked_null = RankedScores(scores, k), RankedScores(null_scores, k)
        for cname, ids in concepts.items():
            if ids.numel() == 0:
                log.warning("concept %s has no single-token word in this vocabulary", cname)
                continue
            _, null_auc, _ = ranked_null.concept(ids, 1)
            for sign in (1, -1):
                prec, auc, mean_rank = ranked.concept(ids, sign)
                pct = null_percentile(auc, null_auc)
                for j, (obj, layer, head, index) in enumerate(vecs.keys):
                    concept_rows.add(
                        object=obj, layer=layer, head=head, index=index, sign=sign,
                        concept=cname, variant=variant, k=k,
                        precision_at_k=float(prec[j]), auroc=float(auc[j]),
                        mean_rank=float(mean_rank[j]), null_percentile=float(pct[j]),
                    )
        del scores, null_scores
    result.shards.append(write_shard(storage, "vocab_topk", part, "vocab", topk_rows.columns))
    result.shards.append(write_shard(storage, "concept_scores", part, "concepts", concept_rows.columns))

    # -- circuits
    circuit_rows = Rows("circuit_topk")
    tensors: dict[str, torch.Tensor] = {"vectors": x.contiguous(), "norm_gain": norm.gain.float()}
    n_circuits = 0
    for layer in layers:
        n_heads = W.head_weights(lm, layer).n_heads
        heads = list(range(n_heads)) if v.circuit_heads is None else list(v.circuit_heads)
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise ValueError(f"vocab.circuit_heads: heads {bad} outside 0..{n_heads - 1}")
        for head in heads:
            for circuit in v.circuits:
                if circuit.startswith("delta_") and (base is None or is_base):
                    continue
                if not circuit.startswith("delta_"):
                    left, right = _middle_factors(lm, layer, head, circuit)
                    tensors[f"circuit.{circuit}.{layer}.{head}.left"] = left.contiguous()
                    tensors[f"circuit.{circuit}.{layer}.{head}.right"] = right.contiguous()
                a, b = circuit_factors(lm, layer, head, circuit, base)
                res = product_topk(a, b, v.circuit_top_k, screen=v.circuit_screen)
                n_circuits += 1
                for sign, rank, src, dst, score in res.entries():
                    circuit_rows.add(circuit=circuit, layer=layer, head=head, sign=sign, rank=rank,
                                     src_token_id=src, dst_token_id=dst, src_token=decode(src),
                                     dst_token=decode(dst), score=score)
    if n_circuits:
        result.shards.append(write_shard(storage, "circuit_topk", part, "circuits", circuit_rows.columns))

    # -- what the timeline comparison needs
    if base is not None:
        for obj in cfg.vocab.align_objects:
            for layer in range(lm.n_layers):
                cur, ref = W.ff_weights(lm, layer), W.ff_weights(base, layer)
                sel = torch.topk(ref[obj].norm(dim=1), min(v.align_vectors, len(ref[obj]))).indices
                tensors[f"align.{obj}.{layer}"] = cur[obj][sel.sort().values].float().contiguous()
    meta = {
        "keys": json.dumps(vecs.keys), "centre": json.dumps(norm.centre), "tied": json.dumps(tied),
        "variants": json.dumps(variants), "step": str(ckpt.step), "top_k": str(k),
    }
    storage.write_bytes(
        vocab_path(storage, run_id, ckpt.step),
        save_safetensors({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, metadata=meta),
    )
    elapsed = time.perf_counter() - t0
    log.info(
        "vocab step %d: %d vectors x %d variants, %d circuits, %.1f s",
        ckpt.step, len(vecs.keys), len(variants), n_circuits, elapsed,
    )
    result.summary = {"step": ckpt.step, "vectors": len(vecs.keys), "circuits": n_circuits,
                      "seconds": round(elapsed, 2)}
    return result


# -- across checkpoints -------------------------------------------------------------------


@dataclass
class _Checkpoint:
    step: int
    e_in: torch.Tensor
    e_out: torch.Tensor
    norm: W.FinalNorm
    keys: dict[tuple, int]
    vectors: torch.Tensor
    tensors: dict[str, torch.Tensor]


def _load_checkpoint_vocab(cfg: RunConfig, storage: Storage, run_id: str, ref: CheckpointRef) -> _Checkpoint:
    from plasticity.train.checkpoint import load_checkpoint

    path = vocab_path(storage, run_id, ref.step)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"no vocab stage output for step {ref.step} at {storage.full_uri(path)}: run the "
            "vocab stage of every checkpoint first"
        )
    from plasticity.steering.vectors import read_vector_file

    stored = read_vector_file(storage.read_bytes(path))
    tensors, meta = dict(stored.tensors), stored.metadata
    lm = load_checkpoint(storage, ref.path, cfg.model)
    e_in, e_out, _ = W.embeddings(lm)
    norm = W.FinalNorm(gain=tensors["norm_gain"], centre=json.loads(meta["centre"]))
    keys = {tuple(k): i for i, k in enumerate(json.loads(meta["keys"]))}
    out = _Checkpoint(ref.step, e_in.float().clone(), e_out.float().clone(), norm, keys,
                      tensors.pop("vectors"), tensors)
    del lm
    return out


class _Projections:
    """Each checkpoint's projections of all its vectors, their ranks and top/bottom-k
    token ids, per variant: computed once, reused for every pair of checkpoints."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}

    def get(self, c: _Checkpoint, variant: str) -> tuple[torch.Tensor, ...]:
        key = (c.step, variant)
        if key not in self._cache:
            base_variant = "raw" if variant == "raw_in" else variant
            s = project(c.e_in if variant == "raw_in" else c.e_out, c.vectors, base_variant, c.norm)
            top, bot = torch.topk(s, self.k, dim=0).indices, torch.topk(-s, self.k, dim=0).indices
            self._cache[key] = (s, average_ranks(s), top, bot)
        return self._cache[key]


def _drift_rows(
    a: _Checkpoint, b: _Checkpoint, variants: list[str], k: int, rows: Rows,
    projections: _Projections | None = None,
) -> None:
    shared = [key for key in a.keys if key in b.keys]
    if not shared:
        return
    projections = projections or _Projections(k)
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


class _Grams:
    """x^T y of embedding matrices, computed once per pair of tensors within a stage."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (id(x), id(y))
        if key not in self._cache:
            self._cache[key] = gram(x, y)
        return self._cache[key]


def _circuit_rows(a: _Checkpoint, b: _Checkpoint, table, rows: Rows, grams: _Grams | None = None) -> None:
    """Circuit drift: Jaccard of the top/bottom entry sets (from circuit_topk) and the
    cosine of the vocab x vocab matrices through d x d Grams (ov, qk)."""
    grams = grams or _Grams()
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


def _token_meta(cfg: RunConfig, tokenizer, vocab_size: int) -> Rows:
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


def vocab_similarity_stage(cfg: RunConfig, run_id: str) -> StageResult:
    """`vocab_similarity` (drift of every projected object and circuit between every two
    checkpoints), `vocab_alignment` (FF vectors of every layer pair, Hungarian-matched
    correlation in vocabulary space) and `token_meta`, from what the per-checkpoint
    stage wrote (its vectors files and `circuit_topk`) and the checkpoints' embeddings."""
    from plasticity.models.loading import load_tokenizer_from
    from plasticity.stages import StageResult, written_checkpoints
    from plasticity.train.checkpoint import local_checkpoint

    storage = Storage.from_config(cfg.storage)
    refs = written_checkpoints(storage, run_id, cfg)
    if not refs:
        raise FileNotFoundError(f"run {run_id}: no checkpoints to compare")
    cks = [_load_checkpoint_vocab(cfg, storage, run_id, r) for r in refs]
    try:
        circuits = read_table(storage, "circuit_topk", [run_id]).to_pylist()
    except FileNotFoundError:
        circuits = None
    variants = list(cfg.vocab.variants)
    if any(not torch.equal(c.e_in, c.e_out) for c in cks):
        variants.append("raw_in")
    sim, align = Rows("vocab_similarity"), Rows("vocab_alignment")
    k = min(cfg.vocab.top_k, cks[0].e_out.shape[0])
    projections, grams = _Projections(k), _Grams()
    for i, a in enumerate(cks):
        for b in cks[i + 1 :]:
            _drift_rows(a, b, variants, k, sim, projections)
            _circuit_rows(a, b, circuits, sim, grams)
            for obj in cfg.vocab.align_objects:
                va = {int(n.split(".")[2]): t for n, t in a.tensors.items() if n.startswith(f"align.{obj}.")}
                vb = {int(n.split(".")[2]): t for n, t in b.tensors.items() if n.startswith(f"align.{obj}.")}
                if not va or not vb:
                    continue
                al = align_layers(va, vb, a.e_out, b.e_out)
                for x, la in enumerate(al.layers_x):
                    for y, lb in enumerate(al.layers_y):
                        align.add(object=obj, step_a=a.step, step_b=b.step, layer_a=la, layer_b=lb,
                                  n_vectors=min(len(va[la]), len(vb[lb])),
                                  correlation=float(al.score[x, y]),
                                  layer_match=al.layer_match.get(la) == lb)
    part = {"run_id": run_id}
    result = StageResult()
    result.shards.append(write_shard(storage, "vocab_similarity", part, "vocab", sim.columns))
    if align.columns["object"]:
        result.shards.append(write_shard(storage, "vocab_alignment", part, "vocab", align.columns))
    tok = load_tokenizer_from(local_checkpoint(storage, refs[0].path))
    meta = _token_meta(cfg, tok, cks[0].e_out.shape[0])
    result.shards.append(write_shard(storage, "token_meta", part, "tokens", meta.columns))
    result.summary = {"pairs": len(cks) * (len(cks) - 1) // 2, "rows": len(sim.columns["object"])}
    return result


# -- report section -------------------------------------------------------------------------


def _fmt_tokens(rows: list[dict], n: int) -> str:
    rows = sorted(rows, key=lambda r: r["rank"])[:n]
    return ", ".join(f"`{r['token']!r}`"[0:40] for r in rows) or "-"


def vocab_summary_markdown(storage: Storage, run_id: str, n_tokens: int = 8, n_deltas: int = 3) -> str:
    """A Markdown section: per checkpoint, the top and bottom tokens of the honesty
    direction at its best layer (by test detection accuracy, any reader but `random`)
    and the largest weight deltas (by relative norm) with the top tokens of their first
    singular vector. Raises FileNotFoundError when the run has no vocab output."""
    topk = read_table(storage, "vocab_topk", [run_id]).to_pylist()
    try:
        directions = read_table(storage, "directions", [run_id]).select(
            ["checkpoint_step", "concept", "layer", "method", "detection_accuracy"]
        ).to_pylist()
    except FileNotFoundError:
        directions = []
    try:
        deltas = read_table(storage, "delta_stats", [run_id]).to_pylist()
    except FileNotFoundError:
        deltas = []
    by_key: dict[tuple, list[dict]] = {}
    for r in topk:
        if r["variant"] != "raw":
            continue
        by_key.setdefault((r["checkpoint_step"], r["object"], r["layer"], r["index"], r["sign"]), []).append(r)
    lines = ["## Vocabulary space", ""]
    steps = sorted({r["checkpoint_step"] for r in topk})
    method_order = {"pca": 0, "mean_diff": 1}
    for step in steps:
        lines.append(f"### Step {step}")
        lines.append("")
        cands = [r for r in directions if r["checkpoint_step"] == step and r["method"] != "random"]
        if cands:
            best = max(cands, key=lambda r: (r["detection_accuracy"], -method_order.get(r["method"], 9), -r["layer"]))
            obj = f"direction_{best['method']}"
            top = by_key.get((step, obj, best["layer"], 0, 1), [])
            bot = by_key.get((step, obj, best["layer"], 0, -1), [])
            lines.append(
                f"{best['concept']} direction (`{best['method']}`, layer {best['layer']}, test "
                f"detection accuracy {best['detection_accuracy']:.3f}): promotes "
                f"{_fmt_tokens(top, n_tokens)}; suppresses {_fmt_tokens(bot, n_tokens)}."
            )
            lines.append("")
        mats = [r for r in deltas if r["checkpoint_step"] == step and r["head"] is None and r["layer"] is not None]
        mats.sort(key=lambda r: -(r["relative_delta_norm"] or 0.0))
        if mats:
            lines += ["| weight delta | layer | relative norm | top tokens of its first singular vector |",
                      "|---|---|---|---|"]
            for r in mats[:n_deltas]:
                toks = by_key.get((step, f"svd_{r['param']}", r["layer"], 0, 1), [])
                lines.append(
                    f"| {r['param']} | {r['layer']} | {r['relative_delta_norm']:.3g} | {_fmt_tokens(toks, n_tokens)} |"
                )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
