"""The timeline flow: finetune -> extract (per checkpoint) -> plasticity (per target) ->
vocab (per checkpoint) -> intervention branches (training mode) -> report. Tasks drive Ray actors; only configs, URIs and small
dataclasses cross between them."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger

from plasticity.config import config_from_dict, validate_run_id
from plasticity.stages.intervention import intervention_steps
from plasticity.storage.fs import Storage
from plasticity.storage.manifest import Manifest, RunLock
from tasks.actors import ensure_ray, start_workers, stop
from tasks.runtime import result_storage_block
from tasks.stages import (
    close_stage_progress,
    detection_task,
    extract_task,
    finetune_task,
    intervention_task,
    open_stage_progress,
    plasticity_task,
    report_task,
    unit_key,
    vocab_similarity_task,
    vocab_task,
)


class StageFailed(RuntimeError):
    """A stage of the timeline failed; the message names the stage, the unit and the cause."""


def _stage(label: str, call, lock: RunLock | None = None):
    """Run or wait for one stage unit; a failure names the stage and its cause. An attempt
    that lost its run lock to another (it was paused past the lock's staleness) stops."""
    if lock is not None and lock.lost:
        raise StageFailed(
            f"stage {label} not started: run {lock.run_id} lost its lock to another attempt"
        )
    try:
        return call()
    except StageFailed:
        raise
    except Exception as exc:
        raise StageFailed(f"stage {label} failed: {describe_cause(exc)}") from exc


def _unit_done(progress, stage: str, step: int) -> None:
    """The flow has the unit's result: counted done (a cached task run never reports)."""
    progress.finish_unit(unit_key(stage, step))
    progress.tick()


def describe_cause(exc: BaseException) -> str:
    """`Type: message` of the root cause: the exception a Ray actor raised rather than
    Ray's wrapper; of a long message its first and last lines."""
    cause = getattr(exc, "cause", None)  # RayTaskError carries the actor's exception
    if isinstance(cause, BaseException):
        exc = cause
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}" if lines else ""
    return f"{type(exc).__name__}: {text[:1000]}".rstrip(": ")


@flow(name="plasticity-timeline", flow_run_name="timeline {run_id}", log_prints=False)
def timeline(config: dict[str, Any], run_id: str) -> dict:
    """Run the whole timeline for one resolved config under `run_id`."""
    logger = get_run_logger()
    cfg = config_from_dict(config)
    validate_run_id(run_id)
    storage = Storage.from_config(cfg.storage)
    storage.check_writable()
    # One live attempt per run id; a second is refused here, before it touches anything.
    lock = RunLock(storage, run_id, cfg.storage.lock_stale_s).acquire()
    manifest = Manifest(storage, run_id)
    try:
        manifest.open(cfg.to_dict())
    except BaseException:
        lock.release()
        raise
    lock.start_heartbeat()
    started_ray = False
    workers = []
    try:
        results = result_storage_block(cfg, run_id)
        finetune, extract, plasticity, vocab_t, intervention = (
            t.with_options(result_storage=results)
            for t in (finetune_task, extract_task, plasticity_task, vocab_task, intervention_task)
        )
        started_ray = ensure_ray(cfg.compute.ray_address, cfg.compute.working_dir)
        refs = _stage("finetune", lambda: finetune(cfg, run_id), lock)
        logger.info("checkpoints: %s", [r.step for r in refs])
        workers = start_workers(cfg, run_id)
        pick = {r.step: workers[i % len(workers)] for i, r in enumerate(refs)}
        steps = [r.step for r in refs]
        progress = open_stage_progress(run_id, "extract", steps)
        extracts = [extract.submit(cfg, run_id, r, pick[r.step]) for r in refs]
        for r, f in zip(refs, extracts, strict=True):
            _stage(f"extract (checkpoint step={r.step})", f.result, lock)
            _unit_done(progress, "extract", r.step)
        progress.finish()
        _stage("detection table", lambda: detection_task(cfg, run_id), lock)
        # Target j goes to the worker that already holds model j from extraction.
        modes = cfg.plasticity.modes
        grid_progress = open_stage_progress(run_id, "plasticity", steps) if "matrix" in modes else None
        vocab_progress = open_stage_progress(run_id, "vocab", steps)
        grid = [plasticity.submit(cfg, run_id, r, refs, pick[r.step]) for r in refs] if "matrix" in modes else []
        vocab = [
            vocab_t.submit(cfg, run_id, r, pick[r.step], wait_for=grid[i : i + 1])
            for i, r in enumerate(refs)
        ]
        for r, f in zip(refs, grid, strict=True):
            _stage(f"plasticity (target step={r.step})", f.result, lock)
            _unit_done(grid_progress, "plasticity", r.step)
        if grid_progress is not None:
            grid_progress.finish()
        if "training" in modes:
            branch_steps = intervention_steps(cfg)
            branch_progress = open_stage_progress(run_id, "intervention", branch_steps)
            branches = [
                intervention.submit(cfg, run_id, t, refs, workers[i % len(workers)], wait_for=vocab)
                for i, t in enumerate(branch_steps)
            ]
            for t, f in zip(branch_steps, branches, strict=True):
                _stage(f"intervention (branch from step={t})", f.result, lock)
                _unit_done(branch_progress, "intervention", t)
            branch_progress.finish()
        for r, f in zip(refs, vocab, strict=True):
            _stage(f"vocab (checkpoint step={r.step})", f.result, lock)
            _unit_done(vocab_progress, "vocab", r.step)
        vocab_progress.finish()
        _stage("vocab similarity", lambda: vocab_similarity_task(cfg, run_id), lock)
        report = _stage("report", lambda: report_task(cfg, run_id), lock)
        manifest.set_status("done")
    except BaseException as exc:
        manifest.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        close_stage_progress(run_id)
        stop(workers)
        if started_ray:
            import ray

            ray.shutdown()
        lock.release()
    logging.getLogger(__name__).info("run %s done: %s", run_id, storage.full_uri(manifest.path))
    return {"run_id": run_id, "manifest": storage.full_uri(manifest.path), **report}
