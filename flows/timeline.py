"""The timeline flow: finetune -> extract (per checkpoint) -> plasticity (per target) ->
vocab (per checkpoint) -> report. Tasks drive Ray actors; only configs, URIs and small
dataclasses cross between them."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger

from plasticity.config import config_from_dict, validate_run_id
from plasticity.storage.fs import Storage
from plasticity.storage.manifest import Manifest
from tasks.actors import ensure_ray, start_workers, stop
from tasks.stages import extract_task, finetune_task, plasticity_task, report_task, vocab_task


@flow(name="plasticity-timeline", flow_run_name="timeline {run_id}", log_prints=False)
def timeline(config: dict[str, Any], run_id: str) -> dict:
    """Run the whole timeline for one resolved config under `run_id`."""
    logger = get_run_logger()
    cfg = config_from_dict(config)
    validate_run_id(run_id)
    storage = Storage.from_config(cfg.storage)
    storage.check_writable()
    manifest = Manifest(storage, run_id)
    manifest.open(cfg.to_dict())
    started_ray = ensure_ray(cfg.compute.ray_address)
    workers = []
    try:
        refs = finetune_task(cfg, run_id)
        logger.info("checkpoints: %s", [r.step for r in refs])
        workers = start_workers(cfg, run_id)
        pick = {r.step: workers[i % len(workers)] for i, r in enumerate(refs)}
        extracts = [extract_task.submit(cfg, run_id, r, pick[r.step]) for r in refs]
        for f in extracts:
            f.result()
        # Target j goes to the worker that already holds model j from extraction.
        grid = [plasticity_task.submit(cfg, run_id, r, refs, pick[r.step]) for r in refs]
        vocab = [vocab_task.submit(cfg, run_id, r, pick[r.step], wait_for=[g]) for r, g in zip(refs, grid, strict=True)]
        for f in grid + vocab:
            f.result()
        report = report_task(cfg, run_id)
    except BaseException as exc:
        manifest.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop(workers)
        if started_ray:
            import ray

            ray.shutdown()
    manifest.set_status("done")
    logging.getLogger(__name__).info("run %s done: %s", run_id, storage.full_uri(manifest.path))
    return {"run_id": run_id, "manifest": storage.full_uri(manifest.path), **report}
