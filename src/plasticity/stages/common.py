"""What the stages share: their result type, the device, and where a run's checkpoints
and vectors are found."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import torch

from plasticity.config import RunConfig
from plasticity.storage.fs import Storage
from plasticity.storage.shards import read_table
from plasticity.train.checkpoint import CheckpointRef, checkpoint_path


@dataclass
class StageResult:
    """What a stage hands back: the shards it wrote and a small summary."""

    shards: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def model_layers(spec: list[int] | None, n_layers: int, field_name: str) -> list[int]:
    """The layers `spec` names (None: every layer), checked against the model."""
    layers = list(range(n_layers)) if spec is None else list(spec)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"{field_name}: layers {bad} are outside the model's 0..{n_layers - 1}")
    return layers


def written_checkpoints(storage: Storage, run_id: str, cfg: RunConfig) -> list[CheckpointRef]:
    """Checkpoints an earlier attempt of this run finished (each has its `checkpoints`
    row, which is written only after the folder's SHA256SUMS), in step order."""
    try:
        table = read_table(storage, "checkpoints", [run_id])
    except FileNotFoundError:
        return []
    refs = []
    for row in sorted(table.to_pylist(), key=lambda r: r["step"]):
        if row["step"] not in cfg.train.snapshot_steps:
            continue
        refs.append(
            CheckpointRef(
                step=row["step"], path=checkpoint_path(storage, run_id, row["step"]),
                sha256=row["sha256"], n_params=row["n_params"], bytes=row["bytes"],
                created_at=row["created_at"].isoformat(),
            )
        )
    return refs


def vectors_path(storage: Storage, run_id: str, step: int, concept: str) -> str:
    """The extract stage's vector file of one checkpoint."""
    return storage.path("runs", run_id, "vectors", f"step={step:06d}", f"{concept}.safetensors")


def load_vectors(storage: Storage, run_id: str, step: int, concept: str):
    """The extract stage's vector file of one checkpoint, as a VectorFile."""
    from plasticity.steering.vectors import read_vector_file

    path = vectors_path(storage, run_id, step, concept)
    if not storage.exists(path):
        raise FileNotFoundError(f"no {concept} vectors for step {step} at {storage.full_uri(path)}")
    return read_vector_file(storage.read_bytes(path))
