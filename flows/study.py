"""The study flow: every run of a study as a timeline subflow, several at once on the
Ray cluster, then the study's tables, figures and artefacts.

A rerun of a study skips its finished runs and resumes the others (each timeline
resumes from its own manifest); a run that fails is recorded and the others go on.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.timeline import describe_cause, timeline
from plasticity.storage.fs import Storage
from plasticity.study.runs import StudyManifest, run_status, write_study_runs
from plasticity.study.spec import Study, StudyRun, expand
from tasks.actors import ensure_ray

log = logging.getLogger(__name__)
POLL_S = 2.0


class StudyFailed(RuntimeError):
    """Some runs of a study failed; the others finished and are in its report."""


def concurrency(study: Study) -> int:
    """Runs at once: the study's max_concurrent, else one per GPU share a fine-tune asks
    for on a GPU cluster, else one per CPU a worker asks for."""
    import ray

    if study.max_concurrent:
        return study.max_concurrent
    compute = study.runs[0].config.compute
    resources = ray.cluster_resources()
    gpus = float(resources.get(compute.gpu_resource, 0))
    if gpus > 0:
        return max(1, int(gpus // compute.train_gpus))
    return max(1, int(float(resources.get("CPU", 1)) // compute.cpus_per_worker))


def run_config(run: StudyRun, n_concurrent: int) -> dict[str, Any]:
    """A run's config, its CPU share set for a one-node CPU cluster shared by
    `n_concurrent` runs (unless the config sets it). `compute` is not part of a run's
    identity, so a rerun at another concurrency still resumes it."""
    import ray

    cfg = run.config
    c = cfg.compute
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if ray.cluster_resources().get(c.gpu_resource, 0) == 0 and len(nodes) == 1 and n_concurrent > 1:
        share = max(1.0, float(ray.cluster_resources().get("CPU", 1)) // n_concurrent)
        c = dataclasses.replace(
            c,
            train_cpus=c.train_cpus if c.train_cpus is not None else share,
            num_workers=c.num_workers if c.num_workers is not None else max(1, int(share // c.cpus_per_worker)),
        )
        cfg = dataclasses.replace(cfg, compute=c)
    return cfg.to_dict()


@task(name="study-run", cache_policy=NONE, task_run_name="run {run_id}")
def run_task(config: dict[str, Any], run_id: str) -> dict:
    return timeline(config=config, run_id=run_id)


def _artifacts(study: Study, storage: Storage, report, statuses: dict) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from plasticity.analysis.artifact_page import artifact_key, artifact_markdown, study_files

    key = artifact_key(study.study_id)
    shards = storage.fs.glob(storage.path("tables", "*", f"study_id={study.study_id}", "*.parquet"))
    create_markdown_artifact(
        markdown=artifact_markdown(
            storage, report.markdown, report.figure_paths,
            study_files(storage, study.study_id, [r.run_id for r in study.runs]),
            "study_id", study.study_id, shards, study.storage.browse_url),
        key=f"study-summary-{key}", description=f"Report of study {study.study_id}",
    )
    create_table_artifact(
        table=[{"run_id": r.run_id, "group": r.group, "seed": r.seed,
                "status": statuses[r.run_id][0],
                "report": storage.full_uri(storage.path("runs", r.run_id, "report", "summary.md"))}
               for r in study.runs],
        key=f"study-runs-{key}", description=f"Runs of study {study.study_id}",
    )


@flow(name="plasticity-study", flow_run_name="study {study_id}", log_prints=False,
      task_runner=ThreadPoolTaskRunner(max_workers=64))
def study_flow(spec: dict[str, Any], study_id: str) -> dict:
    """Run every unfinished run of the study (`spec`: a resolved study, see
    `plasticity.study.spec`), then build the study report."""
    from plasticity.study.report import build_study_report, study_path

    logger = get_run_logger()
    study = expand({**spec, "name": study_id})
    storage = Storage.from_config(study.storage)
    storage.check_writable()
    manifest = StudyManifest(storage, study.study_id)
    manifest.open(study)
    started_ray = ensure_ray(study.runs[0].config.compute.ray_address,
                             study.runs[0].config.compute.working_dir)
    try:
        n = concurrency(study)
        statuses = {r.run_id: run_status(storage, r.run_id) for r in study.runs}
        write_study_runs(storage, study, statuses)
        todo = [r for r in study.runs if statuses[r.run_id][0] != "done"]
        for r in study.runs:
            if statuses[r.run_id][0] == "done":
                logger.info("run %s already finished: skipped", r.run_id)
        logger.info("study %s: %d runs, %d to run, %d at once", study.study_id, len(study.runs),
                    len(todo), min(n, max(1, len(todo))))
        running: dict[str, Any] = {}
        while todo or running:
            while todo and len(running) < n:
                r = todo.pop(0)
                manifest.set_run(r.run_id, "running")
                running[r.run_id] = run_task.submit(run_config(r, n), r.run_id)
            done, _ = wait(list(running.values()), timeout=POLL_S)
            for run_id, fut in list(running.items()):
                if fut not in done:
                    continue
                del running[run_id]
                try:
                    fut.result()
                except Exception as exc:  # the run's failure, recorded; the others go on
                    statuses[run_id] = ("failed", describe_cause(exc))
                    logger.error("run %s failed: %s", run_id, statuses[run_id][1])
                else:
                    statuses[run_id] = ("done", None)
                    logger.info("run %s finished", run_id)
                manifest.set_run(run_id, *statuses[run_id])
        write_study_runs(storage, study, statuses)
        failed = sorted(k for k, (s, _) in statuses.items() if s != "done")
        result: dict[str, Any] = {"study_id": study.study_id,
                                  "runs": {k: s for k, (s, _) in statuses.items()},
                                  "manifest": storage.full_uri(manifest.path)}
        if len(failed) < len(study.runs):
            report = build_study_report(storage, study.study_id, study.bootstrap, study.seed)
            try:
                _artifacts(study, storage, report, statuses)
            except Exception as exc:  # a display never fails the study
                logger.warning("study artefacts not published: %s: %s", type(exc).__name__, exc)
            result["summary"] = storage.full_uri(study_path(storage, study.study_id, "report", "summary.md"))
            result["figures"] = report.figure_uris
        if failed:
            manifest.set_status("failed", failed=failed)
            raise StudyFailed(
                f"study {study.study_id}: {len(failed)} of {len(study.runs)} runs failed "
                f"({', '.join(failed)}); the others are in its report. Run the study again to "
                "resume them: finished runs are skipped."
            )
        manifest.set_status("done", failed=[])
        return result
    finally:
        if started_ray:
            import ray

            ray.shutdown()
