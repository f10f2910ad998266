"""The stages of a timeline as plain functions: config and URIs in, shards out.

Each stage writes its own Parquet shards under deterministic names and returns their
paths in a small dataclass; the orchestrator records them in the manifest. Nothing here
knows about Prefect or Ray.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
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


def plasticity_layer_sets(cfg: RunConfig, n_layers: int) -> list[list[int]]:
    """The layer sets of the sweep (each steered together); the middle layer by default."""
    from plasticity.config import layer_sets

    sets = layer_sets(cfg.plasticity.layers)
    if sets is None:
        return [[n_layers // 2]]
    return [_layers(s, n_layers, "plasticity.layers") for s in sets]


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
    from plasticity.steering.vectors import tokenizer_fingerprint
    from plasticity.train.checkpoint import sha256_file

    meta = {
        "run_id": run_id, "model": cfg.model.source, "model_type": lm.adapter.model_type,
        "d_model": str(lm.d_model), "checkpoint_step": str(ckpt.step),
        "checkpoint_sha256": ckpt.sha256, "concept": c.name, "methods": json.dumps(c.methods),
        "layers": json.dumps(layers), "n_train": str(c.n_train), "n_pairs": str(n_pairs),
        "user_tag": cfg.model.user_tag, "assistant_tag": cfg.model.assistant_tag,
        "template": c.template, "positive": c.positive, "negative": c.negative,
        "dataset": c.dataset, "dataset_sha256": sha256_file(resolve_dataset(c.dataset)),
        "seed": str(c.seed), "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
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
        facts_signs,
        pubmedqa_accuracy,
        truthfulqa_mc,
    )

    out: dict[str, torch.Tensor] = {}
    if "pubmedqa_accuracy" in metrics:
        out["pubmedqa_accuracy"] = pubmedqa_accuracy(lm, list(pubmedqa), batch_size)
    if {"facts_logit_gap", "facts_accuracy", "facts_true_bias"} & set(metrics):
        gap = facts_logit_gap(lm, facts, batch_size)
        out["facts_logit_gap"], out["facts_accuracy"] = gap, facts_accuracy(gap)
        out["facts_true_bias"] = gap * facts_signs(facts)
    if {"truthfulqa_mc1", "truthfulqa_mc2"} & set(metrics):
        out["truthfulqa_mc1"], out["truthfulqa_mc2"] = truthfulqa_mc(lm, questions, batch_size)
    return {m: out[m] for m in metrics}


NULL_SOURCE_STEP = -1  # `source_step` of the null (random-direction) rows: no source stage


def null_directions(d_model: int, layer: int, cfg: RunConfig) -> list[torch.Tensor]:
    """`plasticity.null_seeds` random unit directions for one layer, the same for every
    target and source, so the null of every cell of the grid is the same sweep."""
    from plasticity.steering.readers import random_direction

    return [
        random_direction(d_model, seed=1_000_003 * (cfg.plasticity.seed + 1) + 7_919 * (k + 1) + layer)
        for k in range(cfg.plasticity.null_seeds)
    ]


def _check_sources(storage: Storage, run_id: str, cfg: RunConfig, lm: LoadedModel, sources, layers):
    """Every source's vectors, checked against the target model before any compute."""
    from plasticity.steering.vectors import tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(lm.tokenizer)
    files = {}
    for src in sources:
        f = load_vectors(storage, run_id, src.step, cfg.concept.name)
        try:
            f.check_width(lm.d_model)
            f.check_tokenizer(fingerprint)
            for layer in layers:
                f.direction(cfg.plasticity.method, layer)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"source step {src.step}: {exc}") from exc
        files[src.step] = f
    return files


def plasticity_stage(
    cfg: RunConfig,
    run_id: str,
    target: CheckpointRef,
    sources: list[CheckpointRef],
    lm: LoadedModel | None = None,
) -> StageResult:
    """Steer target model j with every source i's direction (and the null directions)
    over the alpha sweep, for each layer set and operator, in batched forward passes
    where every row carries its own direction and alpha."""
    import numpy as np

    from plasticity.analysis.stats import bootstrap_mean_ci, item_slopes
    from plasticity.steering.hooks import RowSteering
    from plasticity.steering.sweep import UNSTEERED, Variant, sweep_scores

    storage = Storage.from_config(cfg.storage)
    lm = lm or load_checkpoint(storage, target.path, cfg.model)
    p, c = cfg.plasticity, cfg.concept
    sets = plasticity_layer_sets(cfg, lm.n_layers)
    all_layers = sorted({x for s in sets for x in s})
    target_vecs = load_vectors(storage, run_id, target.step, c.name)
    target_vecs.check_width(lm.d_model)
    norms = {}
    for layer in all_layers:
        key = f"residual_norm.{layer}"
        if key not in target_vecs.tensors:
            raise ValueError(
                f"plasticity.layers: layer {layer} was not extracted (set concept.layers to include it)"
            )
        norms[layer] = float(target_vecs.tensors[key])
    files = _check_sources(storage, run_id, cfg, lm, sources, all_layers)
    items = _eval_sets(cfg, lm)
    baseline = {
        m: v[0] for m, v in sweep_scores(lm, p.metrics, [UNSTEERED], None, batch_size=p.batch_size, **items).items()
    }
    # Directions stacked per layer: every source's, then the nulls.
    labels = [(src.step, p.method, None) for src in sources] + [
        (NULL_SOURCE_STEP, "random", k) for k in range(p.null_seeds)
    ]
    plas: dict[int, Rows] = {}
    per_item: dict[int, Rows] = {}
    alphas = list(p.alphas)
    for layers in sets:
        stacks = {
            layer: torch.stack(
                [files[src.step].direction(p.method, layer) for src in sources]
                + null_directions(lm.d_model, layer, cfg)
            )
            for layer in layers
        }
        mean_norm = sum(norms[x] for x in layers) / len(layers)
        scale = {x: norms[x] if p.alpha_scale == "relative" else 1.0 for x in layers}
        alpha_rel = [a if p.alpha_scale == "relative" else a / mean_norm for a in alphas]
        alpha_abs = [a * mean_norm if p.alpha_scale == "relative" else a for a in alphas]
        layers_label = ",".join(str(x) for x in layers)
        for operator in p.operators:
            # add and piecewise are the identity at alpha = 0: those rows are the baseline.
            skip_zero = operator in ("add", "piecewise")
            variants = [
                Variant(d, a) for d in range(len(labels)) for a in alphas if not (skip_zero and a == 0)
            ]
            with RowSteering(lm, stacks, scale, operator) as steering:
                scores = sweep_scores(lm, p.metrics, variants, steering, batch_size=p.batch_size, **items)
            where = {(v.direction, v.coef): k for k, v in enumerate(variants)}
            for d, (source_step, direction, null_seed) in enumerate(labels):
                rows = plas.setdefault(source_step, Rows("plasticity"))
                irows = per_item.setdefault(source_step, Rows("plasticity_items"))
                for metric in p.metrics:
                    base = baseline[metric]
                    values = torch.stack(
                        [scores[metric][where[(d, a)]] if (d, a) in where else base for a in alphas]
                    )
                    effects = (values - base[None]).numpy()
                    slopes = item_slopes(np.array(alpha_rel), effects)
                    slope_lo, slope_hi = bootstrap_mean_ci(slopes, p.bootstrap, p.seed)
                    common = dict(
                        target_step=target.step, concept=c.name, direction=direction,
                        null_seed=null_seed, layers=layers_label, operator=operator, metric=metric,
                    )
                    for a_idx in range(len(alphas)):
                        lo, hi = bootstrap_mean_ci(effects[a_idx], p.bootstrap, p.seed)
                        rows.add(
                            **common, alpha=alpha_abs[a_idx], alpha_rel=alpha_rel[a_idx],
                            value=float(values[a_idx].mean()), baseline=float(base.mean()),
                            delta=float(effects[a_idx].mean()), n=len(base), ci_low=lo, ci_high=hi,
                            slope=float(slopes.mean()), slope_ci_low=slope_lo, slope_ci_high=slope_hi,
                        )
                        for item in range(len(base)):
                            irows.add(
                                **common, item=item, alpha_rel=alpha_rel[a_idx],
                                value=float(values[a_idx, item]), baseline=float(base[item]),
                                delta=float(effects[a_idx, item]), item_slope=float(slopes[item]),
                            )
                    if metric == p.metrics[0] and direction != "random":
                        log.info(
                            "plasticity target %d <- source %d, layers %s, %s: slope of %s %+.4f [%+.4f, %+.4f]",
                            target.step, source_step, layers_label, operator, metric,
                            float(slopes.mean()), slope_lo, slope_hi,
                        )
    result = StageResult()
    for source_step in sorted(plas):
        name = f"target={target.step:06d}-{c.name}"
        part = {"run_id": run_id, "source_step": source_step}
        result.shards.append(write_shard(storage, "plasticity", part, name, plas[source_step].columns))
        result.shards.append(write_shard(storage, "plasticity_items", part, name, per_item[source_step].columns))
    log.info(
        "plasticity target %d: %d sources + %d nulls x %d alphas x %d layer sets x %d operators",
        target.step, len(sources), p.null_seeds, len(alphas), len(sets), len(p.operators),
    )
    return result


# -- training-time intervention ------------------------------------------------------


def intervention_layer(cfg: RunConfig, n_layers: int) -> int:
    layer = cfg.plasticity.intervention_layer
    layer = n_layers - 1 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"plasticity.intervention_layer: {layer} is outside the model's 0..{n_layers - 1}")
    return layer


def intervention_steps(cfg: RunConfig) -> list[int]:
    steps = cfg.plasticity.intervention_steps
    if steps is None:
        steps = [s for s in cfg.train.snapshot_steps if s < cfg.train.max_steps]
    return sorted(steps)


def _eval_sets(cfg: RunConfig, lm: LoadedModel) -> dict[str, list]:
    from plasticity.data.concepts import load_statements
    from plasticity.steering.prompts import contrast_pairs

    c, p = cfg.concept, cfg.plasticity
    pairs = contrast_pairs(load_statements(c.dataset), lm.tokenizer, c, cfg.model)
    train_statements = {pair.statement_index for pair in pairs[: c.n_train]}
    return dict(
        facts=_eval_items(cfg, train_statements),
        questions=_truthfulqa_items(cfg) if any(m.startswith("truthfulqa") for m in p.metrics) else [],
        pubmedqa=_pubmedqa_items(cfg) if "pubmedqa_accuracy" in p.metrics else [],
    )


def _held_out_loss(lm: LoadedModel, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean causal-LM loss over `blocks` (the held-out tail of the corpus)."""
    dev = next(lm.model.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            b = blocks[start : start + batch_size].to(dev)
            total += float(lm.model(input_ids=b, labels=b).loss) * len(b)
            n += len(b)
    return total / max(n, 1)


def intervention_stage(cfg: RunConfig, run_id: str, step: int, refs: list[CheckpointRef]) -> StageResult:
    """The training-time protocol: branch from the snapshot at `step`, train on to
    `train.max_steps` with the loss of step `step + 1` replaced by L + lambda*(L' - L),
    L' the loss with the snapshot's own direction added to the intervention layer's
    output (the last hidden state by default), and score the branch's final model
    against the run's final model, item by item."""
    import dataclasses

    import numpy as np

    from plasticity.analysis.stats import bootstrap_mean_ci
    from plasticity.data.corpus import load_corpus
    from plasticity.steering.hooks import steer
    from plasticity.steering.sweep import UNSTEERED, sweep_scores
    from plasticity.train.checkpoint import (
        local_checkpoint,
        optimizer_from_safetensors,
        train_state_from_safetensors,
    )
    from plasticity.train.loop import build_optimizer, finetune, pack_corpus

    p, c = cfg.plasticity, cfg.concept
    by_step = {r.step: r for r in refs}
    final_step = cfg.train.max_steps
    for s in (step, final_step):
        if s not in by_step:
            raise ValueError(f"intervention at step {step}: no checkpoint of step {s} in this run")
    storage = Storage.from_config(cfg.storage)
    dev = device()
    folder = local_checkpoint(storage, by_step[step].path)
    lm = load_model(cfg.model, folder=folder)
    lm.model.to(dev)
    layer = intervention_layer(cfg, lm.n_layers)
    vectors = load_vectors(storage, run_id, step, c.name)
    vectors.check_width(lm.d_model)
    direction = vectors.direction(p.method, layer)
    norm_key = f"residual_norm.{layer}"
    if norm_key not in vectors.tensors:
        raise ValueError(f"plasticity.intervention_layer: layer {layer} was not extracted at step {step}")
    coef = p.intervention_alpha * float(vectors.tensors[norm_key])
    optimizer = build_optimizer(lm.model, cfg.train)
    optimizer_from_safetensors(optimizer, folder / "optimizer.safetensors")
    resume = train_state_from_safetensors(folder / "trainer_state.safetensors")
    docs = load_corpus(cfg.data.corpus, cfg.data.text_field, cfg.data.max_documents)
    blocks = pack_corpus(docs, lm.tokenizer, cfg.data.block_size)

    def mix(at: int, model, batch, loss):
        if at != step + 1:
            return loss
        # The extra forward pass must not move the RNG (dropout): with lambda = 0 the
        # branch then reproduces the run's own training bit for bit.
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        with steer(lm, {layer: direction}, coef, "add"):
            steered = model(input_ids=batch, labels=batch).loss
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        log.info("intervention at step %d: L = %.4f, L' = %.4f", at, float(loss.detach()), float(steered.detach()))
        return loss + p.intervention_lambda * (steered - loss)

    branch_cfg = dataclasses.replace(cfg.train, snapshot_steps=[])
    finetune(lm.model, blocks, branch_cfg, optimizer, lambda rec: None, lambda st: None, dev, resume, mix)
    items = _eval_sets(cfg, lm)
    final = load_checkpoint(storage, by_step[final_step].path, cfg.model)
    final.model.to(dev)
    scores = sweep_scores(lm, p.metrics, [UNSTEERED], None, batch_size=p.batch_size, **items)
    base = sweep_scores(final, p.metrics, [UNSTEERED], None, batch_size=p.batch_size, **items)
    eval_blocks = blocks[-min(len(blocks), 8):]
    loss_branch = _held_out_loss(lm, eval_blocks, cfg.train.batch_size)
    loss_base = _held_out_loss(final, eval_blocks, cfg.train.batch_size)
    summary, per_item = Rows("intervention"), Rows("intervention_items")
    for metric in p.metrics:
        v, b = scores[metric][0].numpy(), base[metric][0].numpy()
        d = v - b
        lo, hi = bootstrap_mean_ci(d, p.bootstrap, p.seed)
        summary.add(
            intervention_step=step, concept=c.name, layer=layer, lam=p.intervention_lambda,
            alpha_rel=p.intervention_alpha, metric=metric, value=float(np.mean(v)),
            baseline=float(np.mean(b)), delta=float(np.mean(d)), n=len(d), ci_low=lo, ci_high=hi,
            final_loss=loss_branch, baseline_final_loss=loss_base,
        )
        for item in range(len(d)):
            per_item.add(
                intervention_step=step, concept=c.name, layer=layer, metric=metric, item=item,
                value=float(v[item]), baseline=float(b[item]), delta=float(d[item]),
            )
    log.info(
        "intervention at step %d (layer %d, lambda %.2f, alpha_rel %.2f): %s %+.4f vs the final model",
        step, layer, p.intervention_lambda, p.intervention_alpha, p.metrics[0],
        summary.columns["delta"][0],
    )
    name = f"step={step:06d}-{c.name}"
    part = {"run_id": run_id}
    return StageResult(
        shards=[
            write_shard(storage, "intervention", part, name, summary.columns),
            write_shard(storage, "intervention_items", part, name, per_item.columns),
        ],
        summary={"step": step, "delta": summary.columns["delta"][0]},
    )


# -- vocab ------------------------------------------------------------------------------


def vocab_stage(
    cfg: RunConfig, run_id: str, ckpt: CheckpointRef, lm: LoadedModel | None = None
) -> StageResult:
    """Vocabulary-space readings of one checkpoint: see `plasticity.vocab.stage`."""
    from plasticity.vocab.stage import vocab_stage as run

    return run(cfg, run_id, ckpt, lm)


# -- report -----------------------------------------------------------------------------


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


def report_stage(
    cfg: RunConfig, run_id: str, shards: dict[str, list[str]] | None = None
) -> StageResult:
    """The `plasticity_stats` table, figures (PNG) and `summary.md` in the run folder,
    from the tables alone (`shards`: committed shard paths per table, when known)."""
    from plasticity.analysis.report import build_report

    storage = Storage.from_config(cfg.storage)
    rep = build_report(storage, run_id, cfg, shards)
    return StageResult(
        shards=rep.shards,
        summary={
            "markdown": rep.markdown,
            "figures": rep.figure_uris,
            "figure_paths": rep.figure_paths,
            "png": rep.figure_uris.get("plasticity_matrix") or next(iter(rep.figure_uris.values())),
            "matrix": rep.matrix,
            "sources": rep.sources,
            "targets": rep.targets,
            "critical_windows": rep.critical_windows,
        },
    )
