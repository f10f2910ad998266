"""Thin Prefect tasks: skip committed work, call a Ray actor, record shards in the manifest.

The run manifest is the source of truth for what is done. On top of it, each stage task
caches its result per unit of work (stage, run id, unit, config digest) in result
storage under the run's own storage root, so a re-run of a run id shows finished units
as Cached. Tasks retry with backoff only on storage and network faults.
"""

from __future__ import annotations

import dataclasses
import time

import ray
from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.runtime import task_run as current_task_run

from plasticity.config import RunConfig
from plasticity.stages.common import StageResult
from plasticity.stages.report import report_stage, similarity_stage
from plasticity.storage.fs import Storage
from plasticity.storage.manifest import Manifest
from plasticity.train.checkpoint import CheckpointRef
from tasks.actors import NODE_KEY, WorkerSpec, actor, start_trainer, stop
from tasks.runtime import (
    RETRIES,
    RETRY_BACKOFF_S,
    RETRY_JITTER,
    artifact_key,
    detection_rows,
    retry_on_storage_faults,
    train_metrics_rows,
    trained_steps,
    unit_cache_key,
)

# Every stage task: cached per unit, results persisted as JSON (never pickle), retried
# with backoff on storage and network faults only.
STAGE_TASK = dict(
    cache_key_fn=unit_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=RETRIES,
    retry_delay_seconds=RETRY_BACKOFF_S,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_on_storage_faults,
)
# How often the fine-tuning task refreshes its progress artefact while the actor trains.
PROGRESS_POLL_S = 2.0
# How long a call waits for its lost actor to come back (Ray notices a dead node within
# its health-check period, then restarts the actor if it has restarts left).
ACTOR_LOST_TIMEOUT_S = 300.0


def _manifest(cfg: RunConfig, run_id: str) -> Manifest:
    return Manifest(Storage.from_config(cfg.storage), run_id)


def actor_call(cfg: RunConfig, what: str, submit, wait=None):
    """`ray.get` of an actor call that is submitted again while its actor is restarted.

    When an actor's node dies, Ray restarts the actor elsewhere (at most
    compute.actor_restarts times), but a call in flight fails with ActorUnavailableError
    ("may or may not have run"), as do calls made before Ray has noticed the node is gone.
    Every stage writes deterministic shard names, so running the call again is safe: it is
    resubmitted, with backoff, for at most ACTOR_LOST_TIMEOUT_S. An actor that is gone for
    good (its restarts used up: ActorDiedError) fails the stage. `wait(ref)` may watch the
    call (e.g. to update a progress artefact) until it is ready.
    """
    deadline = time.monotonic() + ACTOR_LOST_TIMEOUT_S
    attempt = 0
    while True:
        ref = submit()
        try:
            if wait is not None:
                wait(ref)
            return ray.get(ref)
        except ray.exceptions.ActorUnavailableError as exc:
            attempt += 1
            delay = min(2.0 ** (attempt - 1), 5.0)
            if time.monotonic() + delay > deadline:
                raise
            get_run_logger().warning(
                "%s: its actor is unavailable (%s); resubmitting in %.0f s (attempt %d)",
                what, type(exc).__name__, delay, attempt + 1,
            )
            time.sleep(delay)


def _plasticity_run_name() -> str:
    p = current_task_run.parameters
    sources = ",".join(str(s.step) for s in p["sources"])
    return f"plasticity target step={p['target'].step} <- sources {sources}"


@task(name="finetune", **STAGE_TASK,
      task_run_name="finetune {cfg.model.source} snapshots {cfg.train.snapshot_steps}")
def finetune_task(cfg: RunConfig, run_id: str) -> list[CheckpointRef]:
    manifest = _manifest(cfg, run_id)
    unit = manifest.unit("finetune", "all")
    if unit and unit.get("status") == "done":
        return [CheckpointRef(**c) for c in unit["checkpoints"]]
    storage = manifest.storage
    total = max(1, cfg.train.max_steps)
    progress = create_progress_artifact(
        progress=100.0 * trained_steps(storage, run_id) / total,
        key=artifact_key("finetune-progress", run_id),
        description=f"Fine-tuning of run {run_id}: percent of {cfg.train.max_steps} steps written",
    )
    spec = start_trainer(cfg, run_id)

    def watch(pending) -> None:
        # The actor trains remotely; its progress shows in the train-metrics shards it writes.
        while not ray.wait([pending], timeout=PROGRESS_POLL_S)[0]:
            try:
                update_progress_artifact(progress, 100.0 * trained_steps(storage, run_id) / total)
            except Exception as exc:  # a progress display never fails the stage
                get_run_logger().debug("progress not updated: %s", exc)

    try:
        refs, result = actor_call(
            cfg, "finetune", lambda: actor(spec).finetune.remote(cfg, run_id), watch
        )
    finally:
        stop([spec])
    node = result.summary.pop(NODE_KEY, None)
    manifest.commit(
        "finetune", "all", result.shards, checkpoints=[dataclasses.asdict(r) for r in refs],
        **({NODE_KEY: node} if node else {}),
    )
    try:  # displays: one that cannot be drawn (storage briefly away) never fails the stage
        update_progress_artifact(progress, 100.0)
        create_table_artifact(
            table=train_metrics_rows(storage, run_id),
            key=artifact_key("train-metrics", run_id),
            description=f"Train metrics of run {run_id} (at most 200 steps, evenly spaced)",
        )
    except Exception as exc:
        get_run_logger().warning("train-metrics artefact not published: %s: %s",
                                 type(exc).__name__, exc)
    return refs


def _run_unit(cfg: RunConfig, run_id: str, stage: str, key: str, call) -> StageResult | None:
    manifest = _manifest(cfg, run_id)
    if manifest.is_done(stage, key):
        return None
    result: StageResult = actor_call(cfg, f"{stage} {key}", call)
    node = result.summary.pop(NODE_KEY, None)
    info = {"summary": result.summary} if result.summary else {}
    if node:
        info[NODE_KEY] = node
    manifest.commit(stage, key, result.shards, **info)
    return result


@task(name="detection-table", cache_policy=NONE, retries=RETRIES,
      retry_delay_seconds=RETRY_BACKOFF_S, retry_condition_fn=retry_on_storage_faults,
      task_run_name="detection accuracy by layer")
def detection_task(cfg: RunConfig, run_id: str) -> int:
    """Publish detection accuracy by layer and checkpoint as a table artefact."""
    manifest = _manifest(cfg, run_id)
    rows = detection_rows(manifest.storage, manifest.committed_shards("directions"))
    create_table_artifact(
        table=rows, key=artifact_key("detection-by-layer", run_id),
        description=f"Detection accuracy on the test pairs by layer (rows) and checkpoint "
                    f"(columns), run {run_id}",
    )
    return len(rows)


@task(name="extract", **STAGE_TASK, task_run_name="extract checkpoint step={ckpt.step}")
def extract_task(cfg: RunConfig, run_id: str, ckpt: CheckpointRef, worker: WorkerSpec) -> None:
    _run_unit(
        cfg, run_id, "extract", f"step={ckpt.step}",
        lambda: actor(worker).extract.remote(cfg, run_id, ckpt),
    )


@task(name="plasticity", **STAGE_TASK, task_run_name=_plasticity_run_name)
def plasticity_task(
    cfg: RunConfig, run_id: str, target: CheckpointRef, sources: list[CheckpointRef], worker: WorkerSpec
) -> None:
    _run_unit(
        cfg, run_id, "plasticity", f"target={target.step}",
        lambda: actor(worker).plasticity.remote(cfg, run_id, target, sources),
    )


@task(name="intervention", **STAGE_TASK, task_run_name="intervention branch from step={step}")
def intervention_task(
    cfg: RunConfig, run_id: str, step: int, refs: list[CheckpointRef], worker: WorkerSpec
) -> None:
    _run_unit(
        cfg, run_id, "intervention", f"step={step}",
        lambda: actor(worker).intervention.remote(cfg, run_id, step, refs),
    )


@task(name="vocab", **STAGE_TASK, task_run_name="vocab checkpoint step={ckpt.step}")
def vocab_task(cfg: RunConfig, run_id: str, ckpt: CheckpointRef, worker: WorkerSpec) -> None:
    _run_unit(
        cfg, run_id, "vocab", f"step={ckpt.step}",
        lambda: actor(worker).vocab.remote(cfg, run_id, ckpt),
    )


@task(name="vocab-similarity", cache_policy=NONE, retries=RETRIES,
      retry_delay_seconds=RETRY_BACKOFF_S, retry_condition_fn=retry_on_storage_faults,
      task_run_name="vocab similarity across checkpoints")
def vocab_similarity_task(cfg: RunConfig, run_id: str) -> None:
    """Drift, circuit similarity and parameter alignment between checkpoints, from what
    every checkpoint's vocab stage wrote."""
    from plasticity.stages.vocab import vocab_similarity_stage

    manifest = _manifest(cfg, run_id)
    if manifest.is_done("vocab_similarity", "all"):
        return
    result = vocab_similarity_stage(cfg, run_id)
    manifest.commit("vocab_similarity", "all", result.shards, summary=result.summary)


@task(name="report", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def report_task(cfg: RunConfig, run_id: str) -> dict:
    manifest = _manifest(cfg, run_id)
    done = manifest.unit("report", "all")
    if done and done.get("status") == "done":
        return {k: done[k] for k in REPORT_KEYS}
    # Only shards the manifest records as committed feed the report.
    similarity = similarity_stage(cfg, run_id, manifest.committed_shards("directions"))
    manifest.commit("similarity", "all", similarity.shards)
    committed = {
        t: manifest.committed_shards(t)
        for t in ("plasticity", "plasticity_items", "directions", "direction_similarity",
                  "intervention", "intervention_items")
    }
    result = report_stage(cfg, run_id, committed)
    summary = result.summary
    publish_report_artifacts(Storage.from_config(cfg.storage), run_id, summary)
    out = {k: summary[k] for k in REPORT_KEYS}
    manifest.commit("report", "all", result.shards, **out)
    return out


REPORT_KEYS = ("png", "figures", "sources", "targets", "critical_windows")


def publish_report_artifacts(storage: Storage, run_id: str, summary: dict) -> None:
    """The summary with its figures inline, and the plasticity matrix as a table."""
    import base64

    key = "".join(ch if ch.isalnum() else "-" for ch in run_id.lower())
    images = []
    for name, uri in summary["figures"].items():
        png = storage.read_bytes(summary["figure_paths"][name])
        images.append(f"### {name.replace('_', ' ')}\n\n![{name}](data:image/png;base64,"
                      f"{base64.b64encode(png).decode()})\n\n`{uri}`\n")
    create_markdown_artifact(
        markdown=summary["markdown"] + "\n## Figures\n\n" + "\n".join(images),
        key=f"plasticity-summary-{key}",
        description=f"Plasticity report of run {run_id}",
    )
    create_table_artifact(
        table=[
            {"source_step": s, **{f"target_{t}": summary["matrix"][i][j] for j, t in enumerate(summary["targets"])}}
            for i, s in enumerate(summary["sources"])
        ],
        key=f"plasticity-matrix-{key}",
        description=f"Slope of the headline metric against alpha_rel (source rows, target columns), run {run_id}",
    )
