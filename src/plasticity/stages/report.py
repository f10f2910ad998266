"""The report stage: the `direction_similarity` table, then the `plasticity_stats` table,
the figures and `summary.md` of a run, from its committed tables alone."""

from __future__ import annotations

from plasticity.config import RunConfig
from plasticity.stages.common import StageResult
from plasticity.storage.fs import Storage
from plasticity.storage.shards import read_table, write_shard


def similarity_stage(cfg: RunConfig, run_id: str, shards: list[str] | None = None) -> StageResult:
    """The `direction_similarity` table of the steering reader's directions."""
    from plasticity.analysis.similarity import direction_similarity

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
