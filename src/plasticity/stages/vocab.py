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

import torch

from plasticity.config import RunConfig, layer_sets
from plasticity.models.loading import LoadedModel
from plasticity.stages.common import StageResult, load_vectors, written_checkpoints
from plasticity.storage.fs import Storage
from plasticity.storage.shards import Rows, read_table, write_shard
from plasticity.train.checkpoint import CheckpointRef
from plasticity.vocab import weights as W
from plasticity.vocab.concepts import concept_name, concept_token_ids
from plasticity.vocab.drift import (
    CheckpointVocab,
    Grams,
    Projections,
    circuit_rows,
    drift_rows,
    token_meta_rows,
)
from plasticity.vocab.project import project, topk_columns
from plasticity.vocab.readings import (
    TokenDecoder,
    VectorSet,
    circuit_factors,
    delta_stats,
    middle_factors,
    weight_vectors,
)
from plasticity.vocab.scores import CentredGrams, RankedScores, align_layers, null_percentile
from plasticity.vocab.topk import product_topk

log = logging.getLogger(__name__)

# The base model of the last run this process used (the actor keeps it between calls).
_BASE: dict[str, LoadedModel] = {}


def vocab_path(storage: Storage, run_id: str, step: int) -> str:
    return storage.path("runs", run_id, "vocab", f"step={step:06d}", "vectors.safetensors")


def vocab_layers(cfg: RunConfig, n_layers: int) -> list[int]:
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


def vocab_stage(
    cfg: RunConfig, run_id: str, ckpt: CheckpointRef, lm: LoadedModel | None = None
) -> StageResult:
    """Vocabulary-space readings of one checkpoint (see the module docstring)."""
    from safetensors.torch import save as save_safetensors

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
    decode = TokenDecoder(lm.tokenizer)
    d = lm.d_model
    part = {"run_id": run_id, "checkpoint_step": ckpt.step}
    result = StageResult()

    # -- the vectors: directions, weight vectors and deltas, delta singular vectors
    vecs = VectorSet()
    c = cfg.concept
    for key, t in sorted(load_vectors(storage, run_id, ckpt.step, c.name).tensors.items()):
        method, _, layer = key.rpartition(".")
        if method in c.methods:
            vecs.add(f"direction_{method}", int(layer), None, 0, t)
    weight_vectors(cfg, lm, base, is_base, vecs, layers)
    if base is not None and not is_base:
        b_in, b_out, _ = W.embeddings(base)
        e_pairs = {"embed_out": (e_out, b_out.float())}
        if not tied:
            e_pairs["embed_in"] = (e_in, b_in.float())
        delta_rows = delta_stats(cfg, lm, base, vecs, e_pairs)
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
    circuit_table = Rows("circuit_topk")
    tensors: dict[str, torch.Tensor] = {"vectors": x.contiguous(), "norm_gain": norm.gain.float()}
    n_circuits = 0
    for layer in layers:
        n_heads = W.head_weights(lm, layer).n_heads
        heads = list(range(n_heads)) if v.circuit_heads is None else list(v.circuit_heads)
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad and v.circuits:  # the heads are only read as circuits
            raise ValueError(f"vocab.circuit_heads: heads {bad} outside 0..{n_heads - 1}")
        for head in heads:
            for circuit in v.circuits:
                if circuit.startswith("delta_") and (base is None or is_base):
                    continue
                if not circuit.startswith("delta_"):
                    left, right = middle_factors(lm, layer, head, circuit)
                    tensors[f"circuit.{circuit}.{layer}.{head}.left"] = left.contiguous()
                    tensors[f"circuit.{circuit}.{layer}.{head}.right"] = right.contiguous()
                a, b = circuit_factors(lm, layer, head, circuit, base)
                res = product_topk(a, b, v.circuit_top_k, screen=v.circuit_screen)
                n_circuits += 1
                for sign, rank, src, dst, score in res.entries():
                    circuit_table.add(circuit=circuit, layer=layer, head=head, sign=sign, rank=rank,
                                     src_token_id=src, dst_token_id=dst, src_token=decode(src),
                                     dst_token=decode(dst), score=score)
    if n_circuits:
        result.shards.append(write_shard(storage, "circuit_topk", part, "circuits", circuit_table.columns))

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


# -- across checkpoints ---------------------------------------------------------------------


def _load_checkpoint_vocab(cfg: RunConfig, storage: Storage, run_id: str, ref: CheckpointRef) -> CheckpointVocab:
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
    e_in, e_out, tied = W.embeddings(lm)
    norm = W.FinalNorm(gain=tensors["norm_gain"], centre=json.loads(meta["centre"]))
    keys = {tuple(k): i for i, k in enumerate(json.loads(meta["keys"]))}
    # Tied embeddings (one tensor in and out) are kept once: over a large vocabulary each
    # copy is the bulk of what a checkpoint holds here.
    e_in = e_in.float().clone()
    out = CheckpointVocab(ref.step, e_in, e_in if tied else e_out.float().clone(), norm, keys,
                          tensors.pop("vectors"), tensors)
    del lm
    return out


def vocab_similarity_stage(cfg: RunConfig, run_id: str) -> StageResult:
    """`vocab_similarity` (drift of every projected object and circuit between every two
    checkpoints), `vocab_alignment` (FF vectors of every layer pair, Hungarian-matched
    correlation in vocabulary space) and `token_meta`, from what the per-checkpoint
    stage wrote (its vectors files and `circuit_topk`) and the checkpoints' embeddings."""
    from plasticity.models.loading import load_tokenizer_from
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
    projections, grams, centred = Projections(k), Grams(), CentredGrams()
    for i, a in enumerate(cks):
        for b in cks[i + 1 :]:
            drift_rows(a, b, variants, k, sim, projections)
            circuit_rows(a, b, circuits, sim, grams)
            for obj in cfg.vocab.align_objects:
                va = {int(n.split(".")[2]): t for n, t in a.tensors.items() if n.startswith(f"align.{obj}.")}
                vb = {int(n.split(".")[2]): t for n, t in b.tensors.items() if n.startswith(f"align.{obj}.")}
                if not va or not vb:
                    continue
                al = align_layers(va, vb, a.e_out, b.e_out, centred)
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
    meta = token_meta_rows(cfg, tok, cks[0].e_out.shape[0])
    result.shards.append(write_shard(storage, "token_meta", part, "tokens", meta.columns))
    result.summary = {"pairs": len(cks) * (len(cks) - 1) // 2, "rows": len(sim.columns["object"])}
    return result
