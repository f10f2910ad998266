"""The stages of a timeline as plain functions: config and URIs in, shards out.

Each stage writes its own Parquet shards under deterministic names and returns their
paths in a small dataclass; the orchestrator records them in the manifest. Nothing here
knows about Prefect or Ray.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from plasticity.config import RunConfig
from plasticity.models.loading import LoadedModel, load_model
from plasticity.storage.fs import Storage
from plasticity.storage.shards import Rows, read_table, write_shard
from plasticity.train.checkpoint import CheckpointRef, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a stage hands back: the shards it wrote and a small summary."""

    shards: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def vectors_path(storage: Storage, run_id: str, step: int, concept: str) -> str:
    return storage.path("runs", run_id, "vectors", f"step={step:06d}", f"{concept}.safetensors")


# -- finetune ---------------------------------------------------------------------------


def written_checkpoints(storage: Storage, run_id: str, cfg: RunConfig) -> list[CheckpointRef]:
    """Checkpoints an earlier attempt of this run finished (each has its `checkpoints`
    row, which is written only after the folder's SHA256SUMS), in step order."""
    try:
        table = read_table(storage, "checkpoints", [run_id])
    except FileNotFoundError:
        return []
    from plasticity.train.checkpoint import checkpoint_path

    refs = []
    for row in sorted(table.to_pylist(), key=lambda r: r["step"]):
        if row["step"] not in cfg.train.snapshot_steps:
            continue
        refs.append(
            CheckpointRef(
                step=row["step"], path=checkpoint_path(storage, run_id, row["step"]),
                sha256=row["sha256"], n_params=row["n_params"], bytes=row["bytes"],
                created_at=row["created_at"].isoformat(),
            )
        )
    return refs


def _finetune_shards(storage: Storage, run_id: str) -> list[str]:
    """Every shard of the fine-tuning stage of a run, from any attempt (the names are
    deterministic, so a later attempt replaced, never added to, an earlier one's)."""
    return sorted(
        p for table in ("train_metrics", "checkpoints")
        for p in storage.fs.glob(storage.path("tables", table, f"run_id={run_id}", "*.parquet"))
    )


def finetune_stage(cfg: RunConfig, run_id: str) -> tuple[list[CheckpointRef], StageResult]:
    """Fine-tune the configured model; write checkpoints and train metrics.

    When an earlier attempt of the run wrote checkpoints, training resumes from the last
    one (weights, optimizer state, data position and RNG states), bit for bit.
    """
    from plasticity.data.corpus import load_corpus
    from plasticity.train.checkpoint import (
        local_checkpoint,
        optimizer_from_safetensors,
        train_state_from_safetensors,
    )
    from plasticity.train.loop import build_optimizer, finetune, optimizer_state_bytes, pack_corpus

    storage = Storage.from_config(cfg.storage)
    refs: list[CheckpointRef] = written_checkpoints(storage, run_id, cfg)
    result = StageResult()
    if refs and refs[-1].step == cfg.train.max_steps:
        log.info("fine-tuning of run %s already finished (step %d)", run_id, refs[-1].step)
        result.shards = _finetune_shards(storage, run_id)
        result.summary = {"checkpoints": [r.step for r in refs], "resumed_from": refs[-1].step}
        return refs, result
    resume = None
    dev = device()
    if refs:
        folder = local_checkpoint(storage, refs[-1].path)
        lm = load_model(cfg.model, folder=folder)
        lm.model.to(dev)
        optimizer = build_optimizer(lm.model, cfg.train)
        optimizer_from_safetensors(optimizer, folder / "optimizer.safetensors")
        resume = train_state_from_safetensors(folder / "trainer_state.safetensors")
        log.info("resuming fine-tuning of run %s from step %d", run_id, resume.step)
    else:
        lm = load_model(cfg.model)
        lm.model.to(dev)
        optimizer = build_optimizer(lm.model, cfg.train)
    docs = load_corpus(cfg.data.corpus, cfg.data.text_field, cfg.data.max_documents)
    blocks = pack_corpus(docs, lm.tokenizer, cfg.data.block_size)
    log.info(
        "fine-tuning %s on %d blocks of %d tokens for %d steps (%s)",
        cfg.model.source, len(blocks), cfg.data.block_size, cfg.train.max_steps, dev,
    )
    pending: list[dict[str, Any]] = []
    config_dict = cfg.to_dict()

    def flush(upto: int) -> None:
        if not pending:
            return
        cols = {k: [r[k] for r in pending] for k in pending[0]}
        name = f"part-{pending[0]['step']:06d}-{upto:06d}"
        result.shards.append(write_shard(storage, "train_metrics", {"run_id": run_id}, name, cols))
        pending.clear()

    def on_record(rec) -> None:
        pending.append(
            {
                "step": rec.step, "epoch": rec.epoch, "loss": rec.loss, "lr": rec.lr,
                "grad_norm": rec.grad_norm, "tokens_seen": rec.tokens_seen,
                "step_time_s": rec.step_time_s, "optimizer": cfg.train.optimizer,
                "optimizer_state_bytes": optimizer_state_bytes(optimizer), "wall_time": _now(),
            }
        )
        log.info(
            "step %d/%d loss %.4f lr %.2e", rec.step, cfg.train.max_steps, rec.loss, rec.lr
        )

    def on_snapshot(state) -> None:
        step = state.step
        flush(step)
        ref = save_checkpoint(
            storage, run_id, step, lm.model, lm.tokenizer, optimizer, config_dict, state
        )
        refs.append(ref)
        row = {
            "step": [ref.step], "uri": [storage.full_uri(ref.path)], "sha256": [ref.sha256],
            "n_params": [ref.n_params], "bytes": [ref.bytes],
            "created_at": [dt.datetime.fromisoformat(ref.created_at)],
        }
        result.shards.append(
            write_shard(storage, "checkpoints", {"run_id": run_id}, f"step={step:06d}", row)
        )

    finetune(lm.model, blocks, cfg.train, optimizer, on_record, on_snapshot, dev, resume)
    flush(cfg.train.max_steps)
    # The stage's shards, this attempt's and any earlier attempt's (deterministic names).
    result.shards = _finetune_shards(storage, run_id)
    result.summary = {
        "checkpoints": [r.step for r in refs],
        "resumed_from": resume.step if resume else None,
    }
    return refs, result


# -- extract ----------------------------------------------------------------------------


def _layers(spec: list[int] | None, n_layers: int, field_name: str) -> list[int]:
    layers = list(range(n_layers)) if spec is None else list(spec)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"{field_name}: layers {bad} are outside the model's 0..{n_layers - 1}")
    return layers


def plasticity_layers(cfg: RunConfig, n_layers: int) -> list[int]:
    if cfg.plasticity.layers is None:
        return [n_layers // 2]
    return _layers(cfg.plasticity.layers, n_layers, "plasticity.layers")


@torch.no_grad()
def collect_last_token(
    lm: LoadedModel, prompts: list[str], layers: list[int], batch_size: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Hidden state of the last token of each prompt at each layer's block output."""
    from plasticity.steering.forward import batches, encode_left_padded, forward
    from plasticity.steering.hooks import capture, hook_name

    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    token_index: list[torch.Tensor] = []
    with capture(lm, layers) as store:
        for _, chunk in batches(prompts, batch_size):
            enc = encode_left_padded(lm, chunk)
            forward(lm, enc)
            token_index.append(enc["attention_mask"].sum(-1).cpu() - 1)
            for layer in layers:
                out[layer].append(store[hook_name(layer)][:, -1].float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(token_index)


def extract_stage(
    cfg: RunConfig, run_id: str, ckpt: CheckpointRef, lm: LoadedModel | None = None
) -> StageResult:
    """Honesty contrast activations -> one direction per reader and layer."""
    from safetensors.torch import save as save_safetensors

    from plasticity.data.concepts import load_statements
    from plasticity.steering.prompts import contrast_pairs
    from plasticity.steering.readers import (
        detection_accuracy,
        explained_variance,
        mean_difference,
        pca_direction,
        random_direction,
        vote_sign,
    )

    storage = Storage.from_config(cfg.storage)
    lm = lm or load_checkpoint(storage, ckpt.path, cfg.model)
    c = cfg.concept
    layers = _layers(c.layers, lm.n_layers, "concept.layers")
    pairs = contrast_pairs(load_statements(c.dataset), lm.tokenizer, c, cfg.model)
    if len(pairs) <= c.n_train:
        raise ValueError(
            f"concept.n_train={c.n_train} leaves no test pairs: only {len(pairs)} pairs were built"
        )
    prompts = [p for pair in pairs for p in pair.prompts]
    labels = torch.tensor([lab for pair in pairs for lab in pair.labels])
    acts, token_index = collect_last_token(lm, prompts, layers, c.batch_size)
    n_pairs = len(pairs)
    pair_ids = torch.arange(n_pairs).repeat_interleave(2)
    split = ["train" if p < c.n_train else "test" for p in pair_ids.tolist()]
    # Positive and negative member of each pair, and the members in presentation order.
    pos_idx = torch.arange(2 * n_pairs)[labels == 1]
    neg_idx = torch.arange(2 * n_pairs)[labels == 0]
    first_idx, second_idx = torch.arange(0, 2 * n_pairs, 2), torch.arange(1, 2 * n_pairs, 2)
    result = StageResult()
    part = {"run_id": run_id, "checkpoint_step": ckpt.step}
    rows = Rows("directions")
    tensors: dict[str, torch.Tensor] = {}
    tr, te = slice(0, c.n_train), slice(c.n_train, n_pairs)
    for layer in layers:
        h = acts[layer]
        result.shards.append(
            write_shard(
                storage, "activations", {**part, "layer": layer}, c.name,
                {
                    "concept": [c.name] * len(prompts), "split": split,
                    "example_id": list(range(len(prompts))), "pair_id": pair_ids.tolist(),
                    "label": labels.tolist(), "token_index": token_index.tolist(),
                    "hidden": h.half().numpy(),
                },
                d_model=lm.d_model,
            )
        )
        pos, neg = h[pos_idx], h[neg_idx]
        first, second = h[first_idx][tr], h[second_idx][tr]
        residual_norm = float(h.norm(dim=-1).mean())
        tensors[f"residual_norm.{layer}"] = torch.tensor([residual_norm])
        for method in c.methods:
            if method == "pca":
                direction, _ = pca_direction(first, second)
            elif method == "mean_diff":
                direction = mean_difference(pos[tr], neg[tr])
            else:
                direction = random_direction(lm.d_model, seed=c.seed * 100_003 + layer)
            # Sign by vote: the positive member should project higher in most training pairs.
            sign = vote_sign(direction, pos[tr], neg[tr])
            direction = direction * sign
            rows.add(
                concept=c.name, layer=layer, method=method, sign=sign,
                explained_variance=explained_variance(direction, first, second),
                detection_accuracy=detection_accuracy(direction, pos[te], neg[te]),
                residual_norm=residual_norm, vector=direction.numpy().tolist(),
            )
            tensors[f"{method}.{layer}"] = direction.contiguous()
    result.shards.append(
        write_shard(storage, "directions", part, c.name, rows.columns, d_model=lm.d_model)
    )
    from plasticity.data.concepts import resolve_dataset
    from plasticity.train.checkpoint import sha256_file

    meta = {
        "run_id": run_id, "model": cfg.model.source, "model_type": lm.adapter.model_type,
        "d_model": str(lm.d_model), "checkpoint_step": str(ckpt.step),
        "checkpoint_sha256": ckpt.sha256, "concept": c.name, "methods": json.dumps(c.methods),
        "layers": json.dumps(layers), "n_train": str(c.n_train), "n_pairs": str(n_pairs),
        "user_tag": cfg.model.user_tag, "assistant_tag": cfg.model.assistant_tag,
        "template": c.template, "positive": c.positive, "negative": c.negative,
        "dataset": c.dataset, "dataset_sha256": sha256_file(resolve_dataset(c.dataset)),
        "seed": str(c.seed),
    }
    storage.write_bytes(
        vectors_path(storage, run_id, ckpt.step, c.name), save_safetensors(tensors, metadata=meta)
    )
    result.summary = {
        "step": ckpt.step,
        "detection_accuracy": {
            f"{m}.{layer}": acc
            for m, layer, acc in zip(
                rows.columns["method"], rows.columns["layer"], rows.columns["detection_accuracy"],
                strict=True,
            )
        },
    }
    log.info("extract step %d: %d pairs, %d layers", ckpt.step, n_pairs, len(layers))
    return result


def load_vectors(storage: Storage, run_id: str, step: int, concept: str):
    """The extract stage's vector file of one checkpoint, as a VectorFile."""
    from plasticity.steering.vectors import read_vector_file

    path = vectors_path(storage, run_id, step, concept)
    if not storage.exists(path):
        raise FileNotFoundError(f"no {concept} vectors for step {step} at {storage.full_uri(path)}")
    return read_vector_file(storage.read_bytes(path))


# -- plasticity -------------------------------------------------------------------------


def _eval_items(cfg: RunConfig, train_statements: set[int]):
    from plasticity.data.concepts import load_statements

    statements = load_statements(cfg.concept.dataset)
    # Prefer statements that did not feed the training pairs of the direction (by text:
    # the dataset repeats some statements).
    train_texts = {statements[i].text for i in train_statements}
    pool = [s for s in statements if s.text not in train_texts] or statements
    rng = random.Random(cfg.plasticity.seed)
    # As many true as false statements: a shift of the model's True/False bias then
    # cancels in the label-signed mean, which moves only with discrimination.
    by_label = {label: [s for s in pool if s.label == label] for label in (1, 0)}
    for group in by_label.values():
        rng.shuffle(group)
    half = min(cfg.plasticity.n_items // 2, len(by_label[0]), len(by_label[1]))
    if half == 0:
        raise ValueError(
            f"concept.dataset {cfg.concept.dataset!r}: held-out statements of both labels are "
            "needed to score facts metrics (and plasticity.n_items >= 2)"
        )
    items = [s for pair in zip(by_label[1][:half], by_label[0][:half], strict=True) for s in pair]
    return items


def _sample(items: list, cfg: RunConfig) -> list:
    """`plasticity.n_items` items in a seeded random order."""
    items = list(items)
    random.Random(cfg.plasticity.seed).shuffle(items)
    return items[: cfg.plasticity.n_items]


def _truthfulqa_items(cfg: RunConfig):
    from plasticity.data.truthfulqa import load_truthfulqa

    return _sample(load_truthfulqa(), cfg)


def _pubmedqa_items(cfg: RunConfig):
    from plasticity.data.pubmedqa import load_pubmedqa

    return _sample(load_pubmedqa("test"), cfg)


def score_metrics(
    lm: LoadedModel, metrics: list[str], facts, questions, batch_size: int, pubmedqa=()
) -> dict[str, torch.Tensor]:
    """Per-item values of each metric for the model as it is (steering hooks included)."""
    from plasticity.steering.evaluate import (
        facts_accuracy,
        facts_logit_gap,
        pubmedqa_accuracy,
        truthfulqa_mc,
    )

    out: dict[str, torch.Tensor] = {}
    if "pubmedqa_accuracy" in metrics:
        out["pubmedqa_accuracy"] = pubmedqa_accuracy(lm, list(pubmedqa), batch_size)
    if {"facts_logit_gap", "facts_accuracy"} & set(metrics):
        gap = facts_logit_gap(lm, facts, batch_size)
        out["facts_logit_gap"], out["facts_accuracy"] = gap, facts_accuracy(gap)
    if {"truthfulqa_mc1", "truthfulqa_mc2"} & set(metrics):
        out["truthfulqa_mc1"], out["truthfulqa_mc2"] = truthfulqa_mc(lm, questions, batch_size)
    return {m: out[m] for m in metrics}


def plasticity_stage(
    cfg: RunConfig,
    run_id: str,
    target: CheckpointRef,
    sources: list[CheckpointRef],
    lm: LoadedModel | None = None,
) -> StageResult:
    """Steer target model j with every source i's direction over the alpha sweep."""
    from plasticity.data.concepts import load_statements
    from plasticity.steering.evaluate import bootstrap_ci
    from plasticity.steering.hooks import steer
    from plasticity.steering.prompts import contrast_pairs

    storage = Storage.from_config(cfg.storage)
    lm = lm or load_checkpoint(storage, target.path, cfg.model)
    p, c = cfg.plasticity, cfg.concept
    layers = plasticity_layers(cfg, lm.n_layers)
    pairs = contrast_pairs(load_statements(c.dataset), lm.tokenizer, c, cfg.model)
    train_statements = {pair.statement_index for pair in pairs[: c.n_train]}
    facts = _eval_items(cfg, train_statements)
    questions = _truthfulqa_items(cfg) if any(m.startswith("truthfulqa") for m in p.metrics) else []
    pubmedqa = _pubmedqa_items(cfg) if "pubmedqa_accuracy" in p.metrics else []
    target_vecs = load_vectors(storage, run_id, target.step, c.name).tensors
    norms = {}
    for layer in layers:
        key = f"residual_norm.{layer}"
        if key not in target_vecs:
            raise ValueError(
                f"plasticity.layers: layer {layer} was not extracted (set concept.layers to include it)"
            )
        norms[layer] = float(target_vecs[key])
    baseline = score_metrics(lm, p.metrics, facts, questions, p.batch_size, pubmedqa)
    result = StageResult()
    layers_label = ",".join(str(x) for x in layers)
    for src in sources:
        source_file = load_vectors(storage, run_id, src.step, c.name)
        source_file.check_width(lm.d_model)
        directions = {layer: source_file.direction(p.method, layer) for layer in layers}
        rows = Rows("plasticity")
        for alpha in p.alphas:
            scale = {layer: (alpha * norms[layer] if p.alpha_scale == "relative" else alpha) for layer in layers}
            if alpha == 0 and p.operator in ("add", "piecewise"):
                scores = baseline  # these operators are the identity at alpha = 0
            else:
                with steer(lm, directions, scale, p.operator):
                    scores = score_metrics(lm, p.metrics, facts, questions, p.batch_size, pubmedqa)
            abs_alpha = sum(scale.values()) / len(scale)
            rel_alpha = alpha if p.alpha_scale == "relative" else alpha / (sum(norms.values()) / len(norms))
            for metric, values in scores.items():
                delta = values - baseline[metric]
                lo, hi = bootstrap_ci(delta, p.bootstrap, p.seed)
                rows.add(
                    target_step=target.step, concept=c.name, layers=layers_label,
                    operator=p.operator, alpha=abs_alpha, alpha_rel=rel_alpha, metric=metric,
                    value=float(values.mean()), baseline=float(baseline[metric].mean()),
                    delta=float(delta.mean()), n=len(values), ci_low=lo, ci_high=hi,
                )
        log.info(
            "plasticity target %d <- source %d: %s delta at alpha %+.2f = %+.4f",
            target.step, src.step, p.metrics[0], p.alphas[-1],
            [d for d, m in zip(rows.columns["delta"], rows.columns["metric"], strict=True)
             if m == p.metrics[0]][-1],
        )
        result.shards.append(
            write_shard(
                storage, "plasticity", {"run_id": run_id, "source_step": src.step},
                f"target={target.step:06d}-{c.name}", rows.columns,
            )
        )
    log.info("plasticity target %d: %d sources x %d alphas", target.step, len(sources), len(p.alphas))
    return result


# -- vocab ------------------------------------------------------------------------------


def vocab_stage(
    cfg: RunConfig, run_id: str, ckpt: CheckpointRef, lm: LoadedModel | None = None
) -> StageResult:
    """Top-k and bottom-k tokens of each direction through the checkpoint's unembedding."""
    from plasticity.vocab.project import topk_tokens

    storage = Storage.from_config(cfg.storage)
    lm = lm or load_checkpoint(storage, ckpt.path, cfg.model)
    c = cfg.concept
    vecs = load_vectors(storage, run_id, ckpt.step, c.name).tensors
    unembed = lm.adapter.unembedding_matrix(lm.model).detach()
    rows = Rows("vocab_topk")
    # The reader whose direction steers in the plasticity grid.
    method = cfg.plasticity.method
    for key in sorted(k for k in vecs if k.startswith(f"{method}.")):
        layer = int(key.split(".")[1])
        for ts in topk_tokens(unembed, vecs[key], cfg.vocab.top_k):
            rows.add(
                object="direction", variant="raw", layer=layer, head=None, index=0,
                sign=ts.sign, rank=ts.rank, token_id=ts.token_id,
                token=lm.tokenizer.decode([ts.token_id]), score=ts.score,
            )
    path = write_shard(
        storage, "vocab_topk", {"run_id": run_id, "checkpoint_step": ckpt.step},
        f"{c.name}-direction-{method}", rows.columns,
    )
    return StageResult(shards=[path])


# -- report -----------------------------------------------------------------------------


def plasticity_matrix(table, metric: str) -> tuple[list[int], list[int], torch.Tensor]:
    """Least-squares slope of delta against alpha_rel for every (source, target)."""
    df = [
        r for r in table.select(["source_step", "target_step", "alpha_rel", "metric", "delta"]).to_pylist()
        if r["metric"] == metric
    ]
    sources = sorted({r["source_step"] for r in df})
    targets = sorted({r["target_step"] for r in df})
    m = torch.full((len(sources), len(targets)), float("nan"), dtype=torch.float64)
    for i, s in enumerate(sources):
        for j, t in enumerate(targets):
            pts = [(r["alpha_rel"], r["delta"]) for r in df if r["source_step"] == s and r["target_step"] == t]
            if len(pts) < 2:
                continue
            x = torch.tensor([a for a, _ in pts], dtype=torch.float64)
            y = torch.tensor([d for _, d in pts], dtype=torch.float64)
            xc = x - x.mean()
            denom = float((xc**2).sum())
            if denom > 0:
                m[i, j] = float((xc * (y - y.mean())).sum()) / denom
    return sources, targets, m


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


def similarity_stage(cfg: RunConfig, run_id: str, shards: list[str] | None = None) -> StageResult:
    """The `direction_similarity` table of the steering reader's directions."""
    storage = Storage.from_config(cfg.storage)
    directions = read_table(storage, "directions", run_ids=[run_id], paths=shards)
    rows = direction_similarity(directions, cfg.plasticity.method)
    path = write_shard(storage, "direction_similarity", {"run_id": run_id}, cfg.concept.name, rows)
    return StageResult(shards=[path])


def report_stage(cfg: RunConfig, run_id: str, shards: list[str] | None = None) -> StageResult:
    """Plasticity matrix (CSV, PNG heatmap) and a Markdown summary in the run folder."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storage = Storage.from_config(cfg.storage)
    table = read_table(storage, "plasticity", run_ids=[run_id], paths=shards)
    metric = cfg.plasticity.metrics[0]
    sources, targets, m = plasticity_matrix(table, metric)
    out_dir = storage.path("runs", run_id, "report")
    csv = "source_step," + ",".join(f"target_{t}" for t in targets) + "\n"
    for i, s in enumerate(sources):
        csv += f"{s}," + ",".join(f"{float(v):.6g}" for v in m[i]) + "\n"
    storage.write_bytes(posixpath.join(out_dir, "plasticity_matrix.csv"), csv.encode())

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.9 * len(targets)), max(3.5, 1.2 + 0.8 * len(sources))))
    lim = float(torch.nan_to_num(m).abs().max()) or 1.0
    im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(targets)), [str(t) for t in targets])
    ax.set_yticks(range(len(sources)), [str(s) for s in sources])
    ax.set_xlabel("target checkpoint step (model steered)")
    ax.set_ylabel("source checkpoint step (direction)")
    ax.set_title(f"{cfg.concept.name}: d({metric}) / d(alpha_rel)", fontsize=10)
    for i in range(len(sources)):
        for j in range(len(targets)):
            ax.text(j, i, f"{float(m[i, j]):.2g}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    png = posixpath.join(out_dir, "plasticity_matrix.png")
    storage.write_bytes(png, buf.getvalue())

    header = "| source \\ target | " + " | ".join(str(t) for t in targets) + " |"
    lines = [
        f"# Run {run_id}: plasticity matrix",
        "",
        f"Slope of the change in `{metric}` per unit `alpha_rel` when the "
        f"`{cfg.concept.name}` direction of a source checkpoint steers a target checkpoint "
        f"(layers {table.column('layers')[0].as_py()}, operator `{cfg.plasticity.operator}`).",
        "",
        header,
        "|" + "---|" * (len(targets) + 1),
    ]
    for i, s in enumerate(sources):
        lines.append(f"| {s} | " + " | ".join(f"{float(v):.3g}" for v in m[i]) + " |")
    markdown = "\n".join(lines) + "\n"
    storage.write_bytes(posixpath.join(out_dir, "summary.md"), markdown.encode())
    return StageResult(
        shards=[],
        summary={
            "markdown": markdown,
            "png": storage.full_uri(png),
            "matrix": m.tolist(),
            "sources": sources,
            "targets": targets,
        },
    )
