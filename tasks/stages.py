"""Thin Prefect tasks: skip committed work, call a Ray actor, record shards in the manifest."""

from __future__ import annotations

import dataclasses

import ray
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from plasticity.config import RunConfig
from plasticity.stages import StageResult, report_stage, similarity_stage
from plasticity.storage.fs import Storage
from plasticity.storage.manifest import Manifest
from plasticity.train.checkpoint import CheckpointRef
from tasks.actors import WorkerSpec, actor, start_trainer, stop


def _manifest(cfg: RunConfig, run_id: str) -> Manifest:
    return Manifest(Storage.from_config(cfg.storage), run_id)


@task(name="finetune", cache_policy=NONE, task_run_name="finetune {cfg.model.source}")
def finetune_task(cfg: RunConfig, run_id: str) -> list[CheckpointRef]:
    manifest = _manifest(cfg, run_id)
    unit = manifest.unit("finetune", "all")
    if unit and unit.get("status") == "done":
        return [CheckpointRef(**c) for c in unit["checkpoints"]]
    spec = start_trainer(cfg, run_id)
    try:
        refs, result = ray.get(actor(spec).finetune.remote(cfg, run_id))
    finally:
        stop([spec])
    manifest.commit(
        "finetune", "all", result.shards, checkpoints=[dataclasses.asdict(r) for r in refs]
    )
    return refs


def _run_unit(cfg: RunConfig, run_id: str, stage: str, key: str, call) -> StageResult | None:
    manifest = _manifest(cfg, run_id)
    if manifest.is_done(stage, key):
        return None
    result: StageResult = ray.get(call())
    manifest.commit(stage, key, result.shards, **{"summary": result.summary} if result.summary else {})
    return result


@task(name="extract", cache_policy=NONE, task_run_name="extract step={ckpt.step}")
def extract_task(cfg: RunConfig, run_id: str, ckpt: CheckpointRef, worker: WorkerSpec) -> None:
    _run_unit(
        cfg, run_id, "extract", f"step={ckpt.step}",
        lambda: actor(worker).extract.remote(cfg, run_id, ckpt),
    )


@task(name="plasticity", cache_policy=NONE, task_run_name="plasticity target step={target.step}")
def plasticity_task(
    cfg: RunConfig, run_id: str, target: CheckpointRef, sources: list[CheckpointRef], worker: WorkerSpec
) -> None:
    _run_unit(
        cfg, run_id, "plasticity", f"target={target.step}",
        lambda: actor(worker).plasticity.remote(cfg, run_id, target, sources),
    )


@task(name="vocab", cache_policy=NONE, task_run_name="vocab step={ckpt.step}")
def vocab_task(cfg: RunConfig, run_id: str, ckpt: CheckpointRef, worker: WorkerSpec) -> None:
    _run_unit(
        cfg, run_id, "vocab", f"step={ckpt.step}",
        lambda: actor(worker).vocab.remote(cfg, run_id, ckpt),
    )


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
        for t in ("plasticity", "plasticity_items", "directions", "direction_similarity")
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
