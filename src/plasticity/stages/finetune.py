"""The finetune stage: train the configured model, snapshot checkpoints, write train
metrics; resume an interrupted attempt from its last checkpoint, bit for bit."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from plasticity.config import RunConfig
from plasticity.models.loading import load_model
from plasticity.stages.common import StageResult, device, now, written_checkpoints
from plasticity.storage.fs import Storage
from plasticity.storage.shards import write_shard
from plasticity.train.checkpoint import CheckpointRef, save_checkpoint

log = logging.getLogger(__name__)


def _finetune_shards(storage: Storage, run_id: str) -> list[str]:
    """Every shard of the fine-tuning stage of a run, from any attempt (the names are
    deterministic, so a later attempt replaced, never added to, an earlier one's)."""
    return sorted(
        p for table in ("train_metrics", "checkpoints")
        for p in storage.fs.glob(storage.path("tables", table, f"run_id={run_id}", "*.parquet"))
    )


def finetune_stage(
    cfg: RunConfig, run_id: str, observe: Callable[[dict[str, Any]], None] | None = None
) -> tuple[list[CheckpointRef], StageResult]:
    """Fine-tune the configured model; write checkpoints and train metrics.

    When an earlier attempt of the run wrote checkpoints, training resumes from the last
    one (weights, optimizer state, data position and RNG states), bit for bit.
    `observe(row)`, if given, sees each train-metrics row as it is recorded, long before
    its shard is written at the next snapshot (a live progress display).
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
                "optimizer_state_bytes": optimizer_state_bytes(optimizer), "wall_time": now(),
            }
        )
        log.info(
            "step %d/%d loss %.4f lr %.2e", rec.step, cfg.train.max_steps, rec.loss, rec.lr
        )
        if observe is not None:
            observe(pending[-1])

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
