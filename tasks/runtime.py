"""How the stage tasks run under Prefect: which failures are retried, how a unit's result
is cached across attempts of a run, and the artefacts a researcher watches."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from typing import Any

from plasticity.config import RunConfig
from plasticity.storage.fs import Storage, StorageAccessError

log = logging.getLogger(__name__)

# -- retries: storage and network faults only --------------------------------------------

# Faults that a later attempt can outlive: a storage server or network that is briefly
# away. Bad input (a missing bucket, refused credentials, a missing file, a bad config)
# and errors in the computation are not retried.
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                  StorageAccessError)
_TRANSIENT_NAMES = (
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
)


def is_transient(exc: BaseException | None) -> bool:
    """True for a storage or network fault, here or in the cause chain of `exc` (a Ray
    task error is an instance of its cause's class, so a worker's OSError counts)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _NOT_TRANSIENT):
            return False
        if isinstance(exc, ConnectionError | TimeoutError | OSError):
            return True
        if any(n in c.__name__ for c in type(exc).__mro__ for n in _TRANSIENT_NAMES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_on_storage_faults(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed stage only for a transient fault."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    retry = is_transient(exc)
    if exc is not None:
        log.warning("%s failed with %s: %s", task_run.name, type(exc).__name__,
                    "retrying" if retry else "not retried (not a storage or network fault)")
    return retry


# Four tries in all, 2, 4 and 8 s apart (with jitter): enough for a storage server that
# restarts, short enough that a dead one fails the run within a minute.
RETRIES = 3
RETRY_BACKOFF_S = [2.0, 4.0, 8.0]
RETRY_JITTER = 0.5


# -- caching: one cache record per unit of work of a run ---------------------------------


def config_digest(cfg: RunConfig) -> str:
    """A digest of what determines a run's results (storage and compute excluded)."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in ("storage", "compute")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unit_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: the stage, the run, the unit and the config digest.

    The worker a unit was given to is left out, so a re-run of the run id finds the
    cached result whichever actor it would use."""
    cfg: RunConfig = parameters["cfg"]
    if "ckpt" in parameters:
        unit = f"step{parameters['ckpt'].step}"
    elif "target" in parameters:
        unit = f"target{parameters['target'].step}-sources" + "-".join(
            str(s.step) for s in parameters["sources"]
        )
    else:
        unit = "all"
    stage = context.task.name
    return f"{stage}-{parameters['run_id']}-{unit}-{config_digest(cfg)}"


def results_path(storage: Storage, run_id: str) -> str:
    return storage.path("runs", run_id, "prefect-results")


def result_storage_block(cfg: RunConfig, run_id: str):
    """A Prefect filesystem block under the run's own storage, saved under a name derived
    from its path (Prefect stores result locations server-side). Results live beside the
    tables, so a cache record exists exactly as long as the data it stands for."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    storage = Storage.from_config(cfg.storage)
    base = results_path(storage, run_id)
    if storage.is_local:
        block = LocalFileSystem(basepath=base)
    else:
        settings: dict[str, Any] = {"skip_instance_cache": True}
        endpoint = storage.fs.client_kwargs.get("endpoint_url") if hasattr(storage.fs, "client_kwargs") else None
        if endpoint:  # credentials are not settings: s3fs takes them from the environment
            settings["client_kwargs"] = {"endpoint_url": endpoint}
        block = RemoteFileSystem(basepath=storage.full_uri(base), settings=settings)
    digest = hashlib.sha256(storage.full_uri(base).encode()).hexdigest()[:16]
    block.save(f"plasticity-results-{digest}", overwrite=True)
    return block


# -- artefacts --------------------------------------------------------------------------


def artifact_key(kind: str, run_id: str) -> str:
    """Prefect artefact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{run_id}".lower()).strip("-")


def trained_steps(storage: Storage, run_id: str) -> int:
    """The last step whose train metrics are written (from the shard names
    `part-<first>-<last>.parquet`); 0 before the first shard."""
    pattern = storage.path("tables", "train_metrics", f"run_id={run_id}", "part-*.parquet")
    last = 0
    for path in storage.fs.glob(pattern):
        m = re.fullmatch(r"part-(\d+)-(\d+)\.parquet", posixpath.basename(path))
        if m:
            last = max(last, int(m.group(2)))
    return last


def thin(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` rows, evenly spaced, first and last kept."""
    if len(rows) <= limit:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in idx]


def train_metrics_rows(storage: Storage, run_id: str, limit: int = 200) -> list[dict[str, Any]]:
    from plasticity.storage.shards import read_table

    table = read_table(storage, "train_metrics", [run_id])
    cols = ["step", "epoch", "loss", "lr", "grad_norm", "tokens_seen", "step_time_s"]
    rows = sorted(table.select(cols).to_pylist(), key=lambda r: r["step"])
    return [
        {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
        for r in thin(rows, limit)
    ]


def detection_rows(storage: Storage, shards: list[str]) -> list[dict[str, Any]]:
    """Detection accuracy by layer: one row per (concept, method, layer), one column per
    checkpoint, from the committed `directions` shards (vectors not read)."""
    from plasticity.storage.shards import read_table

    if not shards:
        return []
    table = read_table(storage, "directions", paths=shards)
    cols = ["checkpoint_step", "concept", "method", "layer", "detection_accuracy"]
    cells: dict[tuple, dict[str, Any]] = {}
    for r in table.select(cols).to_pylist():
        row = cells.setdefault((r["concept"], r["method"], r["layer"]),
                               {"concept": r["concept"], "method": r["method"], "layer": r["layer"]})
        acc = r["detection_accuracy"]
        row[f"step_{r['checkpoint_step']}"] = None if acc is None else round(float(acc), 4)
    return [cells[k] for k in sorted(cells)]
