"""The intervention stage (`plasticity.modes: [training]`), the protocol of Kannan (2024):
branch from a snapshot, steer the loss of the next step with the snapshot's own
direction, train on to the end, and score the branch's final model against the run's."""

from __future__ import annotations

import logging

import torch

from plasticity.config import RunConfig
from plasticity.models.loading import LoadedModel, load_model
from plasticity.stages.common import StageResult, device, load_vectors
from plasticity.storage.fs import Storage
from plasticity.storage.shards import Rows, write_shard
from plasticity.train.checkpoint import CheckpointRef, load_checkpoint

log = logging.getLogger(__name__)


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
    from plasticity.steering.items import eval_sets
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
    items = eval_sets(cfg, lm)
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
