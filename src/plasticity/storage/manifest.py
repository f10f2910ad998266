"""The run manifest: resolved config, versions, and each stage's committed shards.

Only the orchestrating process writes it (workers return the shards they wrote), so a
process-wide lock is enough to keep read-modify-write updates whole.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

from plasticity.storage.fs import Storage
from plasticity.storage.schemas import SCHEMA_VERSION

_LOCK = threading.RLock()
PACKAGES = ("plasticity", "torch", "transformers", "safetensors", "pyarrow", "prefect", "ray", "s3fs")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class ConfigMismatchError(ValueError):
    """A run id that already exists with a different configuration."""


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {a!r} (stored) != {b!r} (given)"]


# Keys that may differ between attempts of the same run without changing its results.
_VOLATILE = ("storage", "compute")


class Manifest:
    def __init__(self, storage: Storage, run_id: str):
        self.storage = storage
        self.run_id = run_id
        self.path = storage.path("runs", run_id, "manifest.json")

    def read(self) -> dict[str, Any] | None:
        if not self.storage.exists(self.path):
            return None
        return json.loads(self.storage.read_bytes(self.path))

    def _write(self, data: dict[str, Any]) -> None:
        data["updated_at"] = now_iso()
        self.storage.write_bytes(self.path, json.dumps(data, indent=2, sort_keys=True).encode())

    def check_config(self, config: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        """Refuse a config that differs from the stored one (storage and compute aside)."""
        data = self.read() if data is None else data
        if data is None:
            return
        stored = {k: v for k, v in data["config"].items() if k not in _VOLATILE}
        given = {k: v for k, v in config.items() if k not in _VOLATILE}
        diffs = _diff(stored, given)
        if diffs:
            raise ConfigMismatchError(
                f"run {self.run_id} already exists with a different config:\n  "
                + "\n  ".join(diffs)
                + "\nuse a new --run-id, or the stored config to resume"
            )

    def open(self, config: dict[str, Any]) -> dict[str, Any]:
        """Create the manifest, or check that an existing one has the same config."""
        with _LOCK:
            data = self.read()
            if data is not None:
                self.check_config(config, data)
                data["attempts"] = data.get("attempts", 1) + 1
            else:
                data = {
                    "run_id": self.run_id,
                    "schema_version": SCHEMA_VERSION,
                    "created_at": now_iso(),
                    "config": config,
                    "versions": package_versions(),
                    "git_commit": git_commit(),
                    "status": "running",
                    "attempts": 1,
                    "stages": {},
                }
            data["status"] = "running"
            self._write(data)
            return data

    def unit(self, stage: str, key: str) -> dict[str, Any] | None:
        data = self.read() or {}
        return data.get("stages", {}).get(stage, {}).get(key)

    def is_done(self, stage: str, key: str) -> bool:
        unit = self.unit(stage, key)
        return bool(unit and unit.get("status") == "done")

    def commit(self, stage: str, key: str, shards: list[str], **info: Any) -> None:
        """Record a finished unit of work and the shards it wrote."""
        with _LOCK:
            data = self.read()
            if data is None:
                raise FileNotFoundError(f"no manifest at {self.path}: open the run first")
            units = data.setdefault("stages", {}).setdefault(stage, {})
            units[key] = {"status": "done", "shards": sorted(shards), "finished_at": now_iso(), **info}
            self._write(data)

    def set_status(self, status: str, error: str | None = None) -> None:
        with _LOCK:
            data = self.read()
            if data is None:
                return
            data["status"] = status
            if error:
                data["error"] = error
            else:
                data.pop("error", None)
            self._write(data)

    def committed_shards(self, table: str | None = None) -> list[str]:
        data = self.read() or {}
        out = []
        for units in data.get("stages", {}).values():
            for unit in units.values():
                out += unit.get("shards", [])
        if table is not None:
            out = [p for p in out if f"/tables/{table}/" in p]
        return sorted(out)
