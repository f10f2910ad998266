"""Servers for integration tests: each listens on 127.0.0.1 only and is stopped after."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# `--set` arguments: the smoke config with less of the work that the reliability and
# deployment tests do not look at (bootstrap resamples, vocabulary read-outs).
# Fewer steps, pairs, items and alphas too; still three checkpoints (steps 0, 3, 6).
FAST = [
    "--set", "plasticity.bootstrap=50", "--set", "vocab.layers=[0]",
    "--set", "vocab.objects=[ff_key]", "--set", "vocab.circuits=[ov]",
    "--set", "vocab.circuit_heads=[0]", "--set", "plasticity.alphas=[-1.0,0.0,1.0]",
    "--set", "plasticity.n_items=16", "--set", "concept.max_pairs=32",
    "--set", "concept.n_train=16", "--set", "train.max_steps=6",
    "--set", "train.snapshot_steps=[0,3,6]",
]
FAST_STEPS = (0, 3, 6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto's) on loopback; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("the S3 server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def bucket(s3_server):
    import boto3

    name = f"plasticity-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def run_cli(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `plasticity` command in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "plasticity.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers 200 (or raise, with the process's exit status)."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything it started."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME.

    Yields the environment (PREFECT_API_URL, PREFECT_HOME) for clients, workers and CLI
    calls; stops the server and everything it started afterwards."""
    tmp_path = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    log = open(tmp_path / "prefect-server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 120, proc)
        yield env
    finally:
        stop_group(proc)
        log.close()


# Columns that identify a row of each table (those a table has; the rest are measurements).
ROW_KEYS = {
    "train_metrics": ("step",),
    "checkpoints": ("step",),
    "activations": ("checkpoint_step", "layer", "concept", "split", "example_id"),
    "directions": ("checkpoint_step", "concept", "layer", "method"),
    "plasticity": ("source_step", "target_step", "concept", "direction", "null_seed", "layers",
                   "operator", "alpha_rel", "metric"),
    "plasticity_items": ("source_step", "target_step", "concept", "direction", "null_seed",
                         "layers", "operator", "alpha_rel", "metric", "item"),
    "direction_similarity": ("concept", "layer", "step_a", "step_b"),
}


def assert_whole_and_unique(storage, run_id: str) -> dict[str, int]:
    """Every Parquet file of the run is a committed shard and reads whole; no table has a
    duplicate row key. Returns the row count per table."""
    import json
    from collections import Counter

    from plasticity.storage import read_table

    manifest = json.loads(storage.read_bytes(storage.path("runs", run_id, "manifest.json")))
    committed = {s for units in manifest["stages"].values() for u in units.values()
                 for s in u.get("shards", [])}
    files = set(storage.fs.glob(storage.path("tables", "*", f"run_id={run_id}", "**")))
    parquet = {f for f in files if f.endswith(".parquet")}
    assert not [f for f in files if "_tmp-" in f], "a temporary file was left behind"
    assert parquet == committed, (sorted(parquet - committed), sorted(committed - parquet))
    counts = {}
    for table in sorted({p.split("/tables/")[1].split("/")[0] for p in committed}):
        paths = sorted(p for p in committed if f"/tables/{table}/" in p)
        data = read_table(storage, table, paths=paths)  # raises on a partial shard
        cols = [c for c in ROW_KEYS.get(table, data.column_names) if c in data.column_names]
        if "vector" in cols or "hidden" in cols:
            cols = [c for c in cols if c not in ("vector", "hidden")]
        keys = Counter(repr(tuple(r.values())) for r in data.select(cols).to_pylist())
        dupes = [k for k, n in keys.items() if n > 1]
        assert not dupes, f"{table}: duplicate rows for {cols}: {dupes[:3]}"
        counts[table] = data.num_rows
    return counts
