"""Fine-tuning killed with SIGKILL resumes from its last snapshot, bit for bit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import torch
from safetensors import safe_open

from plasticity import stages
from plasticity.config import load_config
from plasticity.storage import Storage, read_table
from plasticity.train.checkpoint import sha256_file

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["train.max_steps=40", "train.snapshot_steps=[0, 5, 40]", "data.max_documents=60"]

CHILD = r"""
import sys
from plasticity import stages
from plasticity.config import load_config
cfg = load_config(sys.argv[1], sys.argv[3:])
stages.finetune_stage(cfg, sys.argv[2])
"""


def _cfg(root: Path, extra=()):
    return load_config(ROOT / "configs/smoke.yaml", [f"storage.uri=file://{root}", *OVERRIDES, *extra])


def test_sigkill_during_finetuning_then_resume_is_bit_identical(tmp_path):
    ref_root, crash_root = tmp_path / "ref", tmp_path / "crash"
    ref_refs, _ = stages.finetune_stage(_cfg(ref_root), "r")

    args = [sys.executable, "-c", CHILD, str(ROOT / "configs/smoke.yaml"), "r",
            f"storage.uri=file://{crash_root}", *OVERRIDES]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = crash_root / "tables/checkpoints/run_id=r/step=000005.parquet"
    final = crash_root / "runs/r/checkpoints/step=000040/SHA256SUMS"
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), "the child never reached its step-5 snapshot"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not final.exists(), "the child finished before it was killed; the test proves nothing"

    refs, result = stages.finetune_stage(_cfg(crash_root), "r")
    assert result.summary["resumed_from"] == 5
    assert [r.step for r in refs] == [0, 5, 40]
    ckpt = "runs/r/checkpoints/step=000040"
    assert sha256_file(ref_root / ckpt / "model.safetensors") == sha256_file(crash_root / ckpt / "model.safetensors")
    assert refs[-1].sha256 == ref_refs[-1].sha256
    # Optimizer and trainer state: the same tensors, bit for bit, and the same metadata
    # (the files' bytes may differ: safetensors writes its metadata map in any order).
    for name in ("optimizer.safetensors", "trainer_state.safetensors"):
        with safe_open(str(ref_root / ckpt / name), "pt") as a, safe_open(str(crash_root / ckpt / name), "pt") as b:
            assert a.metadata() == b.metadata(), name
            assert sorted(a.keys()) == sorted(b.keys()), name
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (name, key)

    # Train metrics: every step once, with the uninterrupted run's losses.
    def losses(root):
        t = read_table(Storage.from_config(_cfg(root).storage), "train_metrics", ["r"])
        return t.sort_by("step").select(["step", "loss", "lr", "tokens_seen"])

    got, want = losses(crash_root), losses(ref_root)
    assert got.column("step").to_pylist() == list(range(1, 41))
    assert got.equals(want)
    # The stage reports every shard of the run, the killed attempt's included.
    assert any("part-000001-000005" in p for p in result.shards)


def test_a_finished_finetune_is_not_redone(tmp_path):
    cfg = _cfg(tmp_path, ["train.max_steps=6", "train.snapshot_steps=[0, 6]"])
    refs, _ = stages.finetune_stage(cfg, "r")
    mtime = (tmp_path / "runs/r/checkpoints/step=000006/model.safetensors").stat().st_mtime_ns
    again, result = stages.finetune_stage(cfg, "r")
    assert [r.step for r in again] == [0, 6] and again[-1].sha256 == refs[-1].sha256
    assert result.summary["resumed_from"] == 6
    assert (tmp_path / "runs/r/checkpoints/step=000006/model.safetensors").stat().st_mtime_ns == mtime
    t = read_table(Storage.from_config(cfg.storage), "checkpoints", ["r"])
    assert isinstance(t, pa.Table) and t.num_rows == 2
