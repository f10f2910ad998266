"""Checkpoint snapshots: HF folders with optimizer state and SHA256SUMS, on any Storage.

Layout: `<root>/runs/<run_id>/checkpoints/step=NNNNNN/` with `model.safetensors`,
`config.json`, tokenizer files, `optimizer.safetensors`, `plasticity_config.json` and
`SHA256SUMS`, written last so that a folder with a valid SHA256SUMS is complete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plasticity.config import ModelConfig
from plasticity.storage.fs import Storage

log = logging.getLogger(__name__)
SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class CheckpointRef:
    """What crosses process boundaries about a checkpoint: its step and where it is."""

    step: int
    path: str  # storage path of the folder
    sha256: str  # of model.safetensors
    n_params: int
    bytes: int
    created_at: str


class CorruptCheckpointError(RuntimeError):
    pass


def checkpoint_path(storage: Storage, run_id: str, step: int) -> str:
    return storage.path("runs", run_id, "checkpoints", f"step={step:06d}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Flatten an optimizer state_dict into safetensors (tensors) plus JSON metadata."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            key = f"state.{idx}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    # Sorted keys: the state's order depends on how it was filled (first steps, or a load),
    # and a resumed run must write the same metadata as an uninterrupted one.
    meta = {
        "param_groups": json.dumps(sd["param_groups"], sort_keys=True),
        "scalars": json.dumps(scalars, sort_keys=True),
        "optimizer": type(optimizer).__name__,
    }
    save_file(tensors, str(path), metadata=meta)


def optimizer_from_safetensors(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Restore `optimizer` from a file written by `optimizer_to_safetensors` (no pickle).

    Tensors come back with their saved dtypes (AdamW4bit keeps uint8 codes uint8 and fp32
    scales fp32 whatever the parameters' dtype); plain values (AdamW4bit's integer step)
    come from the JSON metadata.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("optimizer") != type(optimizer).__name__:
        raise ValueError(
            f"{path} holds {meta.get('optimizer')} state, not {type(optimizer).__name__} state"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(json.loads(meta["scalars"]).items()):
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def train_state_to_safetensors(train_state, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        "order": train_state.order.contiguous(),
        "data_rng": train_state.data_rng.contiguous(),
        "torch_rng": train_state.torch_rng.contiguous(),
    }
    meta = {k: str(getattr(train_state, k)) for k in ("step", "epoch", "cursor", "tokens_seen")}
    save_file(tensors, str(path), metadata=meta)


def train_state_from_safetensors(path: str | Path):
    from safetensors import safe_open

    from plasticity.train.loop import TrainState

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        return TrainState(
            step=int(meta["step"]), epoch=int(meta["epoch"]), cursor=int(meta["cursor"]),
            tokens_seen=int(meta["tokens_seen"]), order=fh.get_tensor("order"),
            data_rng=fh.get_tensor("data_rng"), torch_rng=fh.get_tensor("torch_rng"),
        )


def save_checkpoint(
    storage: Storage,
    run_id: str,
    step: int,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer | None,
    run_config: dict[str, Any],
    train_state=None,
) -> CheckpointRef:
    dest = checkpoint_path(storage, run_id, step)
    with tempfile.TemporaryDirectory(prefix="plasticity-ckpt-") as tmp:
        local = Path(tmp)
        model.save_pretrained(local, safe_serialization=True)
        tokenizer.save_pretrained(local)
        if optimizer is not None:
            optimizer_to_safetensors(optimizer, local / "optimizer.safetensors")
        if train_state is not None:
            train_state_to_safetensors(train_state, local / "trainer_state.safetensors")
        (local / "plasticity_config.json").write_text(
            json.dumps({"step": step, "run_id": run_id, "config": run_config}, indent=2)
        )
        files = sorted(p for p in local.iterdir() if p.is_file())
        sums = {p.name: sha256_file(p) for p in files}
        for p in files:
            storage.put_file(p, posixpath.join(dest, p.name))
        body = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
        storage.write_bytes(posixpath.join(dest, SUMS), body.encode())
        total = sum(p.stat().st_size for p in files)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("checkpoint step %d written to %s", step, storage.full_uri(dest))
    return CheckpointRef(
        step=step,
        path=dest,
        sha256=sums["model.safetensors"],
        n_params=n_params,
        bytes=total,
        created_at=dt.datetime.now(dt.UTC).isoformat(),
    )


def verify_folder(folder: Path) -> None:
    sums_file = folder / SUMS
    if not sums_file.is_file():
        raise CorruptCheckpointError(f"checkpoint {folder} has no {SUMS}: it is incomplete")
    for line in sums_file.read_text().splitlines():
        digest, name = line.split("  ", 1)
        f = folder / name
        if not f.is_file():
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} is missing")
        if sha256_file(f) != digest:
            raise CorruptCheckpointError(f"checkpoint {folder}: {name} does not match {SUMS}")


def local_checkpoint(storage: Storage, path: str, cache: str | None = None) -> Path:
    """A verified local copy of a checkpoint folder (the folder itself when local)."""
    if storage.is_local:
        folder = Path(path)
    else:
        base = Path(cache or os.path.join(tempfile.gettempdir(), "plasticity-ckpt-cache"))
        folder = base / hashlib.sha1(storage.full_uri(path).encode()).hexdigest()[:16]
        if not (folder / SUMS).is_file():
            storage.get_dir(path, folder)
    verify_folder(folder)
    return folder


def load_checkpoint(storage: Storage, path: str, model_cfg: ModelConfig, cache: str | None = None):
    """Fetch (if remote), verify and load a checkpoint folder; returns a LoadedModel."""
    from plasticity.models.loading import load_model

    return load_model(model_cfg, folder=local_checkpoint(storage, path, cache))
