"""The plasticity stage: target checkpoint j steered by every source checkpoint i's
direction, and by random null directions of the same norm, over the alpha sweep, for
each layer set and operator; per-item slopes against alpha_rel with bootstrap CIs."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from plasticity.config import RunConfig
from plasticity.models.loading import LoadedModel
from plasticity.stages.common import StageResult, load_vectors, model_layers
from plasticity.storage.fs import Storage
from plasticity.storage.shards import Rows, write_shard
from plasticity.train.checkpoint import CheckpointRef, load_checkpoint

log = logging.getLogger(__name__)


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


def plasticity_layer_sets(cfg: RunConfig, n_layers: int) -> list[list[int]]:
    """The layer sets of the sweep (each steered together); the middle layer by default."""
    from plasticity.config import layer_sets

    sets = layer_sets(cfg.plasticity.layers)
    if sets is None:
        return [[n_layers // 2]]
    return [model_layers(s, n_layers, "plasticity.layers") for s in sets]


def plasticity_stage(
    cfg: RunConfig,
    run_id: str,
    target: CheckpointRef,
    sources: list[CheckpointRef],
    lm: LoadedModel | None = None,
    observe: Callable[[int, int], None] | None = None,
) -> StageResult:
    """Steer target model j with every source i's direction (and the null directions)
    over the alpha sweep, for each layer set and operator, in batched forward passes
    where every row carries its own direction and alpha.

    `observe(done, total)`, if given, is called after every forward pass with the rows
    (item x variant) done so far of all the stage's sweeps."""
    import numpy as np

    from plasticity.analysis.stats import bootstrap_mean_ci, item_slopes
    from plasticity.steering.hooks import RowSteering
    from plasticity.steering.items import eval_sets
    from plasticity.steering.sweep import UNSTEERED, Variant, sweep_rows, sweep_scores

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
    items = eval_sets(cfg, lm)
    # Directions stacked per layer: every source's, then the nulls.
    labels = [(src.step, p.method, None) for src in sources] + [
        (NULL_SOURCE_STEP, "random", k) for k in range(p.null_seeds)
    ]
    alphas = list(p.alphas)

    def sweep_variants(operator: str) -> list:
        # add and piecewise are the identity at alpha = 0: those rows are the baseline.
        skip_zero = operator in ("add", "piecewise")
        return [Variant(d, a) for d in range(len(labels)) for a in alphas if not (skip_zero and a == 0)]

    on_rows = None
    if observe is not None:
        total = sweep_rows(p.metrics, **items) * (
            1 + len(sets) * sum(len(sweep_variants(op)) for op in p.operators))
        done = [0]

        def on_rows(n: int) -> None:
            done[0] += n
            observe(done[0], total)

    baseline = {
        m: v[0] for m, v in sweep_scores(lm, p.metrics, [UNSTEERED], None, batch_size=p.batch_size,
                                         on_rows=on_rows, **items).items()
    }
    plas: dict[int, Rows] = {}
    per_item: dict[int, Rows] = {}
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
            variants = sweep_variants(operator)
            with RowSteering(lm, stacks, scale, operator) as steering:
                scores = sweep_scores(lm, p.metrics, variants, steering, batch_size=p.batch_size,
                                      on_rows=on_rows, **items)
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
