"""A study's record of its runs: the study manifest (state of every run, for resuming)
and the `study_runs` table (what the study report reads)."""

from __future__ import annotations

import json
import threading
from typing import Any

from plasticity.config import layer_sets
from plasticity.storage.fs import Storage
from plasticity.storage.manifest import Manifest, now_iso
from plasticity.storage.shards import Rows, write_shard
from plasticity.study.spec import Study

# Runs of one study finish in threads of one process: one writer at a time.
_LOCK = threading.Lock()
STATUSES = ("pending", "running", "done", "failed")


def run_status(storage: Storage, run_id: str) -> tuple[str, str | None]:
    """A run's state from its own manifest: pending (no manifest), running, done or
    failed (with the error it recorded)."""
    data = Manifest(storage, run_id).read()
    if data is None:
        return "pending", None
    status = data.get("status") or "running"
    return status, data.get("error") if status == "failed" else None


class StudyManifest:
    """`studies/<study_id>/manifest.json`: the resolved study and every run's state."""

    def __init__(self, storage: Storage, study_id: str):
        self.storage = storage
        self.study_id = study_id
        self.path = storage.path("studies", study_id, "manifest.json")

    def read(self) -> dict[str, Any] | None:
        if not self.storage.exists(self.path):
            return None
        return json.loads(self.storage.read_bytes(self.path))

    def _write(self, data: dict[str, Any]) -> None:
        data["updated_at"] = now_iso()
        self.storage.write_bytes(self.path, json.dumps(data, indent=2, sort_keys=True).encode())

    def open(self, study: Study) -> dict[str, Any]:
        """Create the manifest, or bring an existing one up to this study's runs (runs
        dropped from the study stay listed, marked not in the study)."""
        with _LOCK:
            data = self.read() or {"study_id": self.study_id, "created_at": now_iso(), "attempts": 0}
            data["attempts"] = data.get("attempts", 0) + 1
            data["spec"] = study.spec
            old = data.get("runs", {})
            runs = {}
            for r in study.runs:
                status, error = run_status(self.storage, r.run_id)
                runs[r.run_id] = {"group": r.group, "seed": r.seed, "labels": r.labels,
                                  "status": status, "error": error}
            for run_id, entry in old.items():
                if run_id not in runs:
                    runs[run_id] = {**entry, "in_study": False}
            data["runs"] = runs
            data["status"] = "running"
            self._write(data)
            return data

    def set_run(self, run_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"status: expected one of {STATUSES}, got {status!r}")
        with _LOCK:
            data = self.read() or {"runs": {}}
            entry = data.setdefault("runs", {}).setdefault(run_id, {})
            entry.update(status=status, error=error, updated_at=now_iso())
            self._write(data)

    def set_status(self, status: str, **info: Any) -> None:
        with _LOCK:
            data = self.read() or {}
            data.update(status=status, **info)
            self._write(data)


def study_runs_rows(study: Study, statuses: dict[str, tuple[str, str | None]]) -> Rows:
    rows = Rows("study_runs")
    for r in study.runs:
        cfg = r.config
        sets = layer_sets(cfg.plasticity.layers)
        status, error = statuses.get(r.run_id, ("pending", None))
        rows.add(
            run_id=r.run_id, group=r.group, seed=r.seed,
            axes=json.dumps(r.values, sort_keys=True, default=str), model=cfg.model.source,
            concept=cfg.concept.name, method=cfg.plasticity.method, metric=cfg.plasticity.metrics[0],
            layers=",".join(str(x) for x in sets[0]) if sets else None,
            operator=cfg.plasticity.operators[0], max_steps=cfg.train.max_steps,
            snapshot_steps=sorted(cfg.train.snapshot_steps), status=status, error=error,
        )
    return rows


def write_study_runs(storage: Storage, study: Study, statuses: dict[str, tuple[str, str | None]]) -> str:
    return write_shard(storage, "study_runs", {"study_id": study.study_id}, "runs",
                       study_runs_rows(study, statuses).columns)
