"""`plasticity run` killed outright during fine-tuning and started again at once under the
same run id: the new attempt takes over the dead attempt's lock without waiting for it
to go stale, resumes from the last snapshot and finishes the whole run, and its final
weights are those of an uninterrupted run, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plasticity.config import StorageConfig
from plasticity.storage import Storage, read_table
from tests.integration.conftest import FAST, ROOT, assert_whole_and_unique, stop_group

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads processes from /proc"),
]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# Three checkpoints as in FAST, but a long stretch of steps after the second one: the
# test kills the run there, and the run must not reach the last snapshot first.
MAX_STEPS = 30
STEPS = (0, 3, MAX_STEPS)
ARGS = [*FAST, "--set", f"train.max_steps={MAX_STEPS}", "--set", f"train.snapshot_steps={list(STEPS)}"]


def _processes() -> dict[int, tuple[int, int, str, int]]:
    """Every process: pid -> (ppid, session id, state, start time in ticks)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                text = fh.read()
        except OSError:
            continue  # exited meanwhile
        f = text[text.rfind(")") + 2 :].split()
        out[int(entry)] = (int(f[1]), int(f[3]), f[0], int(f[19]))
    return out


def _family(root: int) -> dict[int, int]:
    """The live processes a command started: its session (Ray's workers get a process
    group of their own, not a session) and its descendants. pid -> start time."""
    procs = _processes()
    family = {pid for pid, (_, sid, _, _) in procs.items() if sid == root}
    todo = [root]
    while todo:
        parent = todo.pop()
        kids = [pid for pid, (ppid, *_) in procs.items() if ppid == parent and pid not in family]
        family.update(kids)
        todo += kids
    family.add(root)
    return {pid: procs[pid][3] for pid in family if pid in procs and procs[pid][2] not in "ZX"}


def _alive(family: dict[int, int]) -> dict[int, str]:
    """Those of `family` still running (the same pid and start time, not a zombie)."""
    procs = _processes()
    out = {}
    for pid, start in family.items():
        p = procs.get(pid)
        if p is not None and p[3] == start and p[2] not in "ZX":
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
            except OSError:
                pass
    return out


def _wait_gone(family: dict[int, int], timeout: float) -> dict[int, str]:
    deadline = time.time() + timeout
    while (alive := _alive(family)) and time.time() < deadline:
        time.sleep(0.1)
    return alive


def _kill(family: dict[int, int]) -> None:
    for pid in _alive(family):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start(storage: Path, run_id: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "plasticity.cli", "run", "--config", SMOKE,
             "--storage", f"file://{storage}", "--run-id", run_id, *ARGS],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _reference(root: Path) -> dict[int, bytes]:
    """The same config fine-tuned in one uninterrupted go (in this process: the other
    stages do not change the weights), under another storage root."""
    from plasticity.config import load_config
    from plasticity.stages import finetune_stage

    overrides = [a for a in ARGS if a != "--set"] + [f"storage.uri=file://{root}"]
    finetune_stage(load_config(SMOKE, overrides), "reference")
    return {s: (root / f"runs/reference/checkpoints/step={s:06d}/model.safetensors").read_bytes()
            for s in STEPS}


def test_a_run_sigkilled_during_finetuning_restarts_at_once_and_finishes_bit_identical(tmp_path):
    began = time.time()
    want = _reference(tmp_path / "reference")
    reference_s = time.time() - began
    store, run_id = tmp_path / "store", "crash"
    marker = store / f"tables/checkpoints/run_id={run_id}/step={STEPS[1]:06d}.parquet"
    final = store / f"runs/{run_id}/checkpoints/step={MAX_STEPS:06d}"
    first, second = _start(store, run_id, tmp_path / "first.log"), None
    families: list[dict[int, int]] = []
    try:
        deadline = time.time() + 300
        while not marker.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert marker.exists(), (tmp_path / "first.log").read_text()[-4000:]
        # The whole attempt dies at once, as when its machine or container is killed:
        # the flow process (the lock's owner), Prefect's server, Ray's GCS and raylet.
        old = _family(first.pid)
        families.append(old)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        killed_at = time.time()
        old.update(_family(first.pid))  # the session outlives its leader
        lock_file = store / f"runs/{run_id}/lock.json"
        assert lock_file.exists(), "the killed attempt's lock should be left behind"

        # Started again at once: the lock names a process of this host that is gone.
        second = _start(store, run_id, tmp_path / "second.log")
        # Ray's fine-tuning worker has a process group of its own and outlives the kill
        # until it finds its raylet gone; it must end well before the new attempt's
        # fine-tuning begins, and must not have reached the last snapshot.
        survivors = _wait_gone(old, timeout=30)
        assert not survivors, f"processes of the killed attempt still run: {survivors}"
        orphans_gone_s = time.time() - killed_at
        assert not final.exists(), "the killed attempt finished fine-tuning; the test proves nothing"

        rc = second.wait(timeout=400)
        rerun_s = time.time() - killed_at
        out = (tmp_path / "second.log").read_text()
        assert rc == 0, out[-6000:]
        assert f"run {run_id} finished" in out
        assert "is already running" not in out
        assert (f"run {run_id}: taking over the lock of an attempt that is gone "
                f"(host {socket.gethostname()}, pid {first.pid}") in out
        assert f"pid {first.pid} is not running" in out
        assert f"resuming fine-tuning of run {run_id} from step {STEPS[1]}" in out
        families.append(_family(second.pid))  # what the finished run left, if anything
        assert not _wait_gone(families[-1], timeout=30), "the finished run left processes behind"
        print(f"\nreference fine-tuning {reference_s:.0f} s; killed {killed_at - began - reference_s:.0f} s "
              f"after the first attempt started; its orphans gone {orphans_gone_s:.1f} s after "
              f"the kill; the rerun finished {rerun_s:.0f} s after the kill")
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_group(proc)
        for family in families:
            _kill(family)

    manifest = json.loads((store / f"runs/{run_id}/manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    assert not lock_file.exists()
    for step in STEPS:
        got = (store / f"runs/{run_id}/checkpoints/step={step:06d}/model.safetensors").read_bytes()
        assert got == want[step], f"step {step}: the weights differ from the uninterrupted run's"
    storage = Storage.from_config(StorageConfig(uri=f"file://{store}"))
    metrics = read_table(storage, "train_metrics", [run_id]).sort_by("step")
    assert metrics.column("step").to_pylist() == list(range(1, MAX_STEPS + 1))
    reference = Storage.from_config(StorageConfig(uri=f"file://{tmp_path / 'reference'}"))
    ref_metrics = read_table(reference, "train_metrics", ["reference"]).sort_by("step")
    assert metrics.column("loss").to_pylist() == ref_metrics.column("loss").to_pylist()
    counts = assert_whole_and_unique(storage, run_id)
    assert counts["checkpoints"] == len(STEPS)
