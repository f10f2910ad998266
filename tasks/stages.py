"""Thin Prefect tasks: skip committed work, call a Ray actor, record shards in the manifest.

The run manifest is the source of truth for what is done. On top of it, each stage task
caches its result per unit of work (stage, run id, unit, config digest) in result
storage under the run's own storage root, so a re-run of a run id shows finished units
as Cached. Tasks retry with backoff only on storage and network faults.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import task_run as current_task_run

from plasticity.config import RunConfig
from plasticity.stages.common import StageResult
from plasticity.stages.report import report_stage, similarity_stage
from plasticity.storage.fs import Storage
from plasticity.storage.manifest import Manifest
from plasticity.train.checkpoint import CheckpointRef
from tasks.actors import NODE_KEY, WorkerSpec, actor, start_trainer, stop
from tasks.logs import Drained, RunLogSink
from tasks.progress import PrefectProgressSink, Progress, ProgressSink, UnitProgress
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
# How often a task asks its actor for the log records of the call it is running.
LOG_POLL_S = 1.0
# How long the last drain after a call may take before forwarding gives up on it.
LOG_FINAL_DRAIN_TIMEOUT_S = 30.0
# How long a call waits for its lost actor to come back (Ray notices a dead node within
# its health-check period, then restarts the actor if it has restarts left).
ACTOR_LOST_TIMEOUT_S = 300.0


def _manifest(cfg: RunConfig, run_id: str) -> Manifest:
    return Manifest(Storage.from_config(cfg.storage), run_id)


class ActorLogs:
    """Forwards the log records of one stage call from its actor to this task run.

    With compute.forward_logs, the call gets a fresh id; while it runs, the actor's
    records under that id are drained about every LOG_POLL_S (one drain in flight at a
    time, so a slow actor never holds the task up) and once more after the call ends,
    also when it failed, so that its cause and traceback reach the task run's logs.
    `on_metrics(rows)` gets the train-metrics rows that came with a drain. Forwarding
    never fails a stage: an error in draining is logged as a warning and ends forwarding
    for this call; an actor that is restarting or gone is left to the call to report.
    A resubmitted call (its actor restarted) keeps the id.
    """

    def __init__(self, cfg: RunConfig, worker: WorkerSpec, what: str,
                 on_metrics: Callable[[list[dict[str, Any]]], None] | None = None):
        self.call_id: str | None = uuid.uuid4().hex if cfg.compute.forward_logs else None
        self.worker = worker
        self.what = what
        self.on_metrics = on_metrics
        self._pending = None  # the drain in flight
        self._sink: RunLogSink | None = None

    def _drain_ref(self):
        return actor(self.worker).drain_logs.remote(self.call_id)

    def poll(self) -> None:
        """Send what the actor has so far, without waiting for it."""
        if self.call_id is None:
            return
        try:
            if self._pending is None:
                self._pending = self._drain_ref()
            if not ray.wait([self._pending], timeout=0)[0]:
                return
            ref, self._pending = self._pending, None
            self._emit(ray.get(ref))
        except ray.exceptions.RayActorError:
            self._pending = None  # restarting or gone: the call itself says so
        except Exception as exc:
            self._stop(exc)

    def follow(self, ref, tick: Callable[[], None] | None = None) -> None:
        """Wait until the call `ref` is ready, forwarding its logs (and calling `tick`)
        about every LOG_POLL_S."""
        while not ray.wait([ref], timeout=LOG_POLL_S)[0]:
            self.poll()
            if tick is not None:
                tick()

    def finish(self) -> None:
        """After the call ended: send the rest of its records."""
        if self.call_id is None:
            return
        try:
            if self._pending is not None:
                ref, self._pending = self._pending, None
                self._emit(ray.get(ref, timeout=LOG_FINAL_DRAIN_TIMEOUT_S))
            self._emit(ray.get(self._drain_ref(), timeout=LOG_FINAL_DRAIN_TIMEOUT_S))
        except ray.exceptions.RayActorError:
            pass
        except Exception as exc:
            self._stop(exc)

    def abandon(self) -> None:
        """The call's actor became unavailable: forget the drain in flight."""
        self._pending = None

    def _emit(self, drained: Drained) -> None:
        if self._sink is None:
            self._sink = RunLogSink()
        self._sink(drained)
        if drained.metrics and self.on_metrics is not None:
            self.on_metrics(drained.metrics)

    def _stop(self, exc: Exception) -> None:
        self.call_id = None
        self._pending = None
        get_run_logger().warning(
            "%s: the actor's logs are no longer forwarded to this task run (%s: %s); "
            "they still reach the terminal", self.what, type(exc).__name__, exc,
        )


def actor_call(cfg: RunConfig, what: str, submit, wait=None, logs: ActorLogs | None = None):
    """`ray.get` of an actor call that is submitted again while its actor is restarted.

    When an actor's node dies, Ray restarts the actor elsewhere (at most
    compute.actor_restarts times), but a call in flight fails with ActorUnavailableError
    ("may or may not have run"), as do calls made before Ray has noticed the node is gone.
    Every stage writes deterministic shard names, so running the call again is safe: it is
    resubmitted, with backoff, for at most ACTOR_LOST_TIMEOUT_S. An actor that is gone for
    good (its restarts used up: ActorDiedError) fails the stage. `wait(ref)` may watch the
    call (e.g. to update a progress artefact) until it is ready; without it, `logs`
    follows the call. `logs` forwards the call's log records to the task run, the last
    of them once the call has ended (failed or not).
    """
    deadline = time.monotonic() + ACTOR_LOST_TIMEOUT_S
    attempt = 0
    if wait is None and logs is not None:
        wait = logs.follow
    while True:
        ref = submit()
        try:
            if wait is not None:
                wait(ref)
            result = ray.get(ref)
        except ray.exceptions.ActorUnavailableError as exc:
            if logs is not None:
                logs.abandon()
            attempt += 1
            delay = min(2.0 ** (attempt - 1), 5.0)
            if time.monotonic() + delay > deadline:
                raise
            get_run_logger().warning(
                "%s: its actor is unavailable (%s); resubmitting in %.0f s (attempt %d)",
                what, type(exc).__name__, delay, attempt + 1,
            )
            time.sleep(delay)
            continue
        except Exception:
            if logs is not None:
                logs.finish()
            raise
        if logs is not None:
            logs.finish()
        return result


def _plasticity_run_name() -> str:
    p = current_task_run.parameters
    sources = ",".join(str(s.step) for s in p["sources"])
    return f"plasticity target step={p['target'].step} <- sources {sources}"


# The loss table artefact (`finetune-loss-<run>`): these columns of the train-metrics
# rows, the newest LOSS_TABLE_ROWS, republished at most every LOSS_TABLE_S while training.
LOSS_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_seen", "step_time_s")
LOSS_TABLE_S = 10.0
LOSS_TABLE_ROWS = 500


def _prefect_loss_table(run_id: str) -> Callable[[list[dict[str, Any]]], None]:
    def publish(rows: list[dict[str, Any]]) -> None:
        last = rows[-1]
        create_table_artifact(
            table=[{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                   for r in rows],
            key=artifact_key("finetune-loss", run_id),
            description=f"Training loss of run {run_id}: step {last['step']}, loss "
                        f"{last['loss']:.4f} (the newest {LOSS_TABLE_ROWS} steps at most)",
        )

    return publish


class TrainProgress:
    """The fine-tuning progress artefact: percent of the steps, with the step count and
    an estimate of the time left in its description.

    It moves with the train-metrics rows the actor reports through its forwarded logs
    (`rows`), or, without them (compute.forward_logs off), with the train-metrics shards
    written at each snapshot; at most once every PROGRESS_POLL_S (`tick`, see
    tasks.progress). A display that cannot be updated never fails the stage."""

    def __init__(self, storage: Storage, run_id: str, max_steps: int,
                 sink: ProgressSink | None = None, clock: Callable[[], float] = time.monotonic,
                 loss_sink: Callable[[list[dict[str, Any]]], None] | None = None):
        self.storage, self.run_id, self.max_steps = storage, run_id, max_steps
        self.live = False  # rows have come from the actor
        # The loss table artefact: the rows seen so far, published at most every
        # LOSS_TABLE_S (a new version of one key) and once more at the end.
        self.clock = clock
        self.loss_rows: list[dict[str, Any]] = []
        self._loss_sink = loss_sink or _prefect_loss_table(run_id)
        self._loss_at: float | None = None
        self._loss_shown = 0
        self.progress = Progress(
            sink or PrefectProgressSink(artifact_key("finetune-progress", run_id)),
            f"Fine-tuning of run {run_id}", max_steps, done=trained_steps(storage, run_id),
            count=lambda done, total: f"step {int(done)}/{total}", clock=clock,
        )

    @property
    def step(self) -> int:
        return int(self.progress.done)

    def rows(self, rows: list[dict[str, Any]]) -> None:
        self.live = True
        self.progress.advance(max(int(r["step"]) for r in rows), rows[-1].get("step_time_s"))
        self.loss_rows += [{k: r.get(k) for k in LOSS_COLUMNS} for r in rows]

    def publish_loss(self, force: bool = False) -> None:
        """The loss table artefact, if it has new rows (and LOSS_TABLE_S has passed)."""
        now = self.clock()
        if len(self.loss_rows) == self._loss_shown:
            return
        if not force and self._loss_at is not None and now - self._loss_at < LOSS_TABLE_S:
            return
        self._loss_at, self._loss_shown = now, len(self.loss_rows)
        try:
            self._loss_sink(self.loss_rows[-LOSS_TABLE_ROWS:])
        except Exception as exc:  # a display never fails the stage
            logging.getLogger(__name__).debug("loss table not published: %s", exc)

    def describe(self) -> str:
        return self.progress.describe()

    def tick(self) -> None:
        if not self.live:
            try:
                step = trained_steps(self.storage, self.run_id)
            except Exception as exc:  # a progress display never fails the stage
                get_run_logger().debug("progress not updated: %s", exc)
                return
            if step > self.step:
                self.progress.advance(step)
        self.progress.tick()
        self.publish_loss()

    def done(self) -> None:
        self.progress.finish()
        self.publish_loss(force=True)


# The stages whose units the flow counts in a progress artefact of their own: the
# artefact's title, the name of its units, and a unit's key (as in the manifest).
STAGE_PROGRESS = {
    "extract": ("Extraction", "checkpoints", "step={}"),
    "plasticity": ("Plasticity grid", "target checkpoints", "target={}"),
    "vocab": ("Vocabulary read-outs", "checkpoints", "step={}"),
    "intervention": ("Intervention branches", "branches", "step={}"),
}
# The open ones, by (run id, stage): the flow opens one before it submits the stage's
# tasks; the tasks (threads of the flow's process) report their units to it. A task
# that runs elsewhere finds none and the flow alone counts its unit when it is done.
_OPEN_PROGRESS: dict[tuple[str, str], UnitProgress] = {}


def unit_key(stage: str, step: int) -> str:
    return STAGE_PROGRESS[stage][2].format(step)


def open_stage_progress(run_id: str, stage: str, steps: list[int],
                        sink: ProgressSink | None = None,
                        clock: Callable[[], float] = time.monotonic) -> UnitProgress:
    """The progress artefact `<stage>-progress-<run id>` of the units `steps` of `stage`."""
    title, unit, _ = STAGE_PROGRESS[stage]
    progress = UnitProgress(
        sink or PrefectProgressSink(artifact_key(f"{stage}-progress", run_id)),
        f"{title} of run {run_id}", [unit_key(stage, s) for s in steps], unit, clock=clock,
    )
    _OPEN_PROGRESS[(run_id, stage)] = progress
    return progress


def close_stage_progress(run_id: str) -> None:
    """Forget the run's open progress artefacts (they stay as last sent)."""
    for k in [k for k in _OPEN_PROGRESS if k[0] == run_id]:
        del _OPEN_PROGRESS[k]


def batch_fractions(progress: UnitProgress, key: str) -> Callable[[list[dict[str, Any]]], None]:
    """`on_metrics` for a unit whose actor reports `{"done", "total"}` rows per forward
    pass: the unit's fraction done."""
    def on_rows(rows: list[dict[str, Any]]) -> None:
        last = rows[-1]
        if last.get("total"):
            progress.part(key, last["done"] / last["total"])

    return on_rows


@task(name="finetune", **STAGE_TASK,
      task_run_name="finetune {cfg.model.source} snapshots {cfg.train.snapshot_steps}")
def finetune_task(cfg: RunConfig, run_id: str) -> list[CheckpointRef]:
    manifest = _manifest(cfg, run_id)
    unit = manifest.unit("finetune", "all")
    if unit and unit.get("status") == "done":
        return [CheckpointRef(**c) for c in unit["checkpoints"]]
    storage = manifest.storage
    progress = TrainProgress(storage, run_id, cfg.train.max_steps)
    spec = start_trainer(cfg, run_id)
    logs = ActorLogs(cfg, spec, "finetune", on_metrics=progress.rows)
    try:
        refs, result = actor_call(
            cfg, "finetune",
            lambda: actor(spec).finetune.remote(cfg, run_id, call_id=logs.call_id),
            lambda ref: logs.follow(ref, progress.tick), logs,
        )
    finally:
        stop([spec])
    node = result.summary.pop(NODE_KEY, None)
    manifest.commit(
        "finetune", "all", result.shards, checkpoints=[dataclasses.asdict(r) for r in refs],
        **({NODE_KEY: node} if node else {}),
    )
    try:  # displays: one that cannot be drawn (storage briefly away) never fails the stage
        progress.done()
        create_table_artifact(
            table=train_metrics_rows(storage, run_id),
            key=artifact_key("train-metrics", run_id),
            description=f"Train metrics of run {run_id} (at most 200 steps, evenly spaced)",
        )
    except Exception as exc:
        get_run_logger().warning("train-metrics artefact not published: %s: %s",
                                 type(exc).__name__, exc)
    return refs


def _run_unit(cfg: RunConfig, run_id: str, stage: str, key: str, worker: WorkerSpec,
              *args) -> StageResult | None:
    """Run `stage` (a StageWorker method) for one unit on `worker`, its logs forwarded,
    its progress (its forward passes, where the stage reports them) counted in the
    stage's progress artefact if the flow opened one."""
    manifest = _manifest(cfg, run_id)
    progress = _OPEN_PROGRESS.get((run_id, stage))
    if manifest.is_done(stage, key):
        if progress is not None:
            progress.finish_unit(key)
            progress.tick()
        return None
    if progress is not None:
        progress.start(key)
    logs = ActorLogs(cfg, worker, f"{stage} {key}",
                     on_metrics=batch_fractions(progress, key) if progress is not None else None)
    result: StageResult = actor_call(
        cfg, f"{stage} {key}",
        lambda: getattr(actor(worker), stage).remote(cfg, run_id, *args, call_id=logs.call_id),
        lambda ref: logs.follow(ref, progress.tick if progress is not None else None), logs,
    )
    node = result.summary.pop(NODE_KEY, None)
    info = {"summary": result.summary} if result.summary else {}
    if node:
        info[NODE_KEY] = node
    manifest.commit(stage, key, result.shards, **info)
    if progress is not None:
        progress.finish_unit(key)
        progress.tick()
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
    _run_unit(cfg, run_id, "extract", unit_key("extract", ckpt.step), worker, ckpt)


@task(name="plasticity", **STAGE_TASK, task_run_name=_plasticity_run_name)
def plasticity_task(
    cfg: RunConfig, run_id: str, target: CheckpointRef, sources: list[CheckpointRef], worker: WorkerSpec
) -> None:
    _run_unit(cfg, run_id, "plasticity", unit_key("plasticity", target.step), worker, target,
              sources)


@task(name="intervention", **STAGE_TASK, task_run_name="intervention branch from step={step}")
def intervention_task(
    cfg: RunConfig, run_id: str, step: int, refs: list[CheckpointRef], worker: WorkerSpec
) -> None:
    _run_unit(cfg, run_id, "intervention", unit_key("intervention", step), worker, step, refs)


@task(name="vocab", **STAGE_TASK, task_run_name="vocab checkpoint step={ckpt.step}")
def vocab_task(cfg: RunConfig, run_id: str, ckpt: CheckpointRef, worker: WorkerSpec) -> None:
    _run_unit(cfg, run_id, "vocab", unit_key("vocab", ckpt.step), worker, ckpt)


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
    publish_report_artifacts(Storage.from_config(cfg.storage), run_id, summary,
                             manifest.committed_shards() + result.shards, cfg.storage.browse_url)
    out = {k: summary[k] for k in REPORT_KEYS}
    manifest.commit("report", "all", result.shards, **out)
    return out


REPORT_KEYS = ("png", "figures", "sources", "targets", "critical_windows")


def publish_report_artifacts(storage: Storage, run_id: str, summary: dict, shards: list[str],
                             browse_url: str | None = None) -> None:
    """The summary with its figures inline and where its files and tables are, and the
    plasticity matrix as a table."""
    from plasticity.analysis.artifact_page import artifact_key, artifact_markdown, run_files

    key = artifact_key(run_id)
    create_markdown_artifact(
        markdown=artifact_markdown(storage, summary["markdown"], summary["figure_paths"],
                                   run_files(storage, run_id), "run_id", run_id, shards, browse_url),
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
