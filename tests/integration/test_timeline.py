"""The smoke config through the real Prefect flow and real Ray actors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from plasticity.config import StorageConfig
from plasticity.storage import Storage, read_table
from plasticity.storage.schemas import TABLES
from tests.integration.conftest import ROOT, run_cli

pytestmark = pytest.mark.integration
SMOKE = str(ROOT / "configs" / "smoke.yaml")
TABLE_NAMES = (
    "train_metrics", "checkpoints", "activations", "directions", "plasticity", "vocab_topk",
    "direction_similarity", "plasticity_items", "plasticity_stats",
)


def _check_tables(storage: Storage, run_id: str) -> dict[str, pa.Table]:
    tables = {name: read_table(storage, name, [run_id]) for name in TABLE_NAMES}
    for name, table in tables.items():
        assert table.column_names == TABLES[name].column_names, name
        assert table.num_rows > 0, name
        assert set(table.column("run_id").to_pylist()) == {run_id}
    steps = sorted(tables["checkpoints"].column("step").to_pylist())
    assert steps == [0, 5, 10]
    n_alphas, n_metrics, n_nulls = 5, 2, 2
    assert tables["plasticity"].num_rows == len(steps) * (len(steps) + n_nulls) * n_alphas * n_metrics
    # No duplicate keys anywhere that matters.
    keys = [(r["source_step"], r["target_step"], r["null_seed"], r["alpha_rel"], r["metric"])
            for r in tables["plasticity"].to_pylist()]
    assert len(keys) == len(set(keys))
    keys = [(r["checkpoint_step"], r["layer"], r["example_id"]) for r in tables["activations"].select(
        ["checkpoint_step", "layer", "example_id"]).to_pylist()]
    assert len(keys) == len(set(keys))
    return tables


# Recognisable credentials: they must show up in no output of a run.
CANARY_KEY_ID = "AKIAPLASTICITYCANARY7"
CANARY_SECRET = "plasticity-canary-secret-0123456789abcdef"


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n!r}" for n in needles if n in data]
    return hits


def test_smoke_run_on_s3_reads_back_with_pyarrow_and_duckdb(s3_server, bucket):
    run_id = "s3-smoke"
    uri = f"s3://{bucket}/lab"
    ray_logs = Path("/tmp/ray")
    before = set(ray_logs.glob("session_2*")) if ray_logs.exists() else set()
    out = run_cli("run", "--config", SMOKE, "--storage", uri, "--run-id", run_id,
                  "--set", f"storage.endpoint_url={s3_server}",
                  env={"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET})
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"run {run_id} finished" in out.stdout

    # The credentials appear in no log, manifest, artefact or table of the run: not in
    # its output, not in any object it stored, not in Prefect's database (logs and
    # artefacts), not in the Ray session's logs.
    needles = [CANARY_KEY_ID.encode(), CANARY_SECRET.encode()]
    assert not [n for n in needles if n.decode() in out.stdout + out.stderr]
    storage_check = Storage.from_config(StorageConfig(uri=uri, endpoint_url=s3_server))
    stored = storage_check.fs.find(f"{bucket}/lab")
    assert stored and not [p for p in stored for n in needles if n in storage_check.fs.cat_file(p)]
    prefect_home = Path(os.environ["PREFECT_HOME"])
    assert _files_containing(prefect_home, needles) == []
    sessions = (set(ray_logs.glob("session_2*")) if ray_logs.exists() else set()) - before
    for session in sessions:
        assert _files_containing(session, needles) == []
    # Positive controls: the places searched do hold this run's logs.
    assert _files_containing(prefect_home, [f"timeline {run_id}".encode()])
    assert sessions and any(_files_containing(s, [b"fine-tuning tiny-gpt2"]) for s in sessions)

    storage = Storage.from_config(StorageConfig(uri=uri, endpoint_url=s3_server))
    tables = _check_tables(storage, run_id)
    manifest = json.loads(storage.read_bytes(storage.path("runs", run_id, "manifest.json")))
    assert manifest["status"] == "done"
    assert manifest["config"]["storage"]["endpoint_url"] == s3_server
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(manifest) and "testing" not in json.dumps(manifest)
    committed = set()
    for units in manifest["stages"].values():
        for unit in units.values():
            committed |= set(unit["shards"])
    on_store = set(storage.fs.glob(storage.path("tables", "**", "*.parquet")))
    assert committed == on_store

    import duckdb

    con = duckdb.connect()
    con.register_filesystem(storage.fs)
    for name, table in tables.items():
        rel = con.sql(
            f"SELECT * FROM read_parquet('s3://{bucket}/lab/tables/{name}/**/*.parquet', "
            "hive_partitioning = true, hive_types_autocast = false)"
        )
        got = rel.to_arrow_table()
        assert set(got.column_names) == set(TABLES[name].column_names), name
        assert got.num_rows == table.num_rows
        assert set(got.column("run_id").to_pylist()) == {run_id}
    slope_rows = con.sql(
        f"SELECT source_step, target_step, count(*) AS n FROM read_parquet("
        f"'s3://{bucket}/lab/tables/plasticity/**/*.parquet', hive_partitioning = true) "
        "WHERE direction = 'pca' GROUP BY ALL"
    ).fetchall()
    assert len(slope_rows) == 9 and {r[2] for r in slope_rows} == {10}
    assert storage.exists(storage.path("runs", run_id, "report", "plasticity_matrix.png"))


def test_file_run_resumes_without_duplicates_and_refuses_a_changed_config(tmp_path):
    uri = f"file://{tmp_path}/p"
    # Both modes: the grid, and the training-time intervention branches from steps 0 and 5.
    modes = ("--set", "plasticity.modes=[matrix, training]")
    out = run_cli("run", "--config", SMOKE, "--storage", uri, "--run-id", "r1", *modes)
    assert out.returncode == 0, out.stderr[-4000:]
    storage = Storage.from_config(StorageConfig(uri=uri))
    before = {n: t.num_rows for n, t in _check_tables(storage, "r1").items()}
    inter = read_table(storage, "intervention", ["r1"]).to_pylist()
    assert sorted({r["intervention_step"] for r in inter}) == [0, 5] and len(inter) == 2 * 2
    stats = read_table(storage, "plasticity_stats", ["r1"]).to_pylist()
    assert {"self", "training"} <= {r["scope"] for r in stats}
    assert (tmp_path / "p/runs/r1/report/intervention.png").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "p" / "tables").rglob("*.parquet")}

    again = run_cli("run", "--config", SMOKE, "--storage", uri, "--run-id", "r1", *modes)
    assert again.returncode == 0, again.stderr[-4000:]
    after = {n: t.num_rows for n, t in _check_tables(storage, "r1").items()}
    assert after == before
    # Committed shards were skipped, not rewritten.
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "p" / "tables").rglob("*.parquet")} == mtimes
    manifest = json.loads((tmp_path / "p/runs/r1/manifest.json").read_text())
    assert manifest["attempts"] == 2 and manifest["status"] == "done"

    changed = run_cli("run", "--config", SMOKE, "--storage", uri, "--run-id", "r1", "--set", "train.lr=0.01")
    assert changed.returncode == 2
    assert "train.lr: 0.001 (stored) != 0.01 (given)" in changed.stderr
