"""The smoke study end to end: two tiny architectures x two seeds through the CLI, its
tables read back with pyarrow and DuckDB; a rerun skips the finished runs; the same
seed gives the same tables, another seed other ones; a failed run does not stop the
others."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import yaml

from tests.integration.conftest import ROOT, run_cli

pytestmark = pytest.mark.integration

RUN_TABLES = ("train_metrics", "checkpoints", "directions", "plasticity", "plasticity_items",
              "plasticity_stats", "direction_similarity", "vocab_topk")
# Columns that name the run or the clock; a checkpoint folder's size counts its config
# file, which holds the run's name (its weights are compared by sha256).
VOLATILE = {"wall_time", "created_at", "step_time_s", "uri", "run_id", "bytes"}


def _rows(store, table: str, run_id: str) -> list[str]:
    from plasticity.config import StorageConfig
    from plasticity.storage import Storage, read_table

    t = read_table(Storage.from_config(StorageConfig(uri=f"file://{store}")), table, [run_id])
    t = t.select([c for c in t.column_names if c not in VOLATILE])
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist())


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    store = tmp_path_factory.mktemp("study")
    out = run_cli("study", "run", "--config", "configs/study-smoke.yaml", "--storage", f"file://{store}",
                  timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return store, out


def test_smoke_study_runs_end_to_end_and_reads_back(smoke_study):
    import duckdb
    import pyarrow.dataset as ds

    store, out = smoke_study
    assert "study study-smoke finished: 4 runs" in out.stdout
    assert "4 to run, 2 at once" in out.stderr
    runs = ds.dataset(store / "tables/study_runs", partitioning="hive").to_table().to_pylist()
    assert sorted((r["run_id"], r["group"], r["seed"], r["status"]) for r in runs) == [
        ("study-smoke-gpt2-s0", "gpt2", 0, "done"), ("study-smoke-gpt2-s1", "gpt2", 1, "done"),
        ("study-smoke-llama-s0", "llama", 0, "done"), ("study-smoke-llama-s1", "llama", 1, "done")]
    assert {r["model"] for r in runs} == {"tiny-gpt2", "tiny-llama"}
    plas = ds.dataset(store / "tables/study_plasticity", partitioning="hive").to_table()
    assert plas.schema.field("slope").type == pa.float64()
    # 4 checkpoints -> a 4 x 4 matrix per group, every cell over both seeds.
    assert plas.num_rows == 2 * 16
    assert set(plas.column("n_runs").to_pylist()) == {2}
    assert sorted(set(plas.column("target_fraction").to_pylist())) == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-5)
    con = duckdb.connect()
    got = con.sql(
        f"SELECT \"group\", count(*) AS n, min(ci_low <= slope AND slope <= ci_high) AS inside "
        f"FROM read_parquet('{store}/tables/study_plasticity/**/*.parquet', hive_partitioning = true) "
        "GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert got == [("gpt2", 16, True), ("llama", 16, True)]
    tests = con.sql(
        f"SELECT DISTINCT test FROM read_parquet('{store}/tables/study_stats/**/*.parquet', "
        "hive_partitioning = true) ORDER BY 1"
    ).fetchall()
    assert [t[0] for t in tests] == ["base", "friedman", "neighbours", "window"]
    # Each run is a whole timeline of its own, with its own report.
    for r in runs:
        assert (store / "runs" / r["run_id"] / "report" / "summary.md").is_file()
    manifest = json.loads((store / "studies/study-smoke/manifest.json").read_text())
    assert manifest["status"] == "done" and {v["status"] for v in manifest["runs"].values()} == {"done"}
    summary = (store / "studies/study-smoke/report/summary.md").read_text()
    assert "## gpt2" in summary and "## llama" in summary and "Friedman" in summary
    assert (store / "studies/study-smoke/report/self_plasticity.png").stat().st_size > 10_000
    # Seeds give different training, so different tables.
    assert _rows(store, "train_metrics", "study-smoke-gpt2-s0") != _rows(store, "train_metrics", "study-smoke-gpt2-s1")
    # The report is rebuilt from the Parquet alone, with the same numbers.
    before = sorted(map(str, plas.drop(["schema_version"]).to_pylist()))
    rep = run_cli("study", "report", "--study-id", "study-smoke", "--storage", f"file://{store}")
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "# Study `study-smoke`" in rep.stdout
    again = ds.dataset(store / "tables/study_plasticity", partitioning="hive").to_table()
    assert sorted(map(str, again.drop(["schema_version"]).to_pylist())) == before


def test_a_rerun_skips_finished_runs(smoke_study):
    store, _ = smoke_study
    mtimes = {p: p.stat().st_mtime_ns for p in (store / "tables").rglob("*.parquet")
              if "study_" not in str(p)}
    out = run_cli("study", "run", "--config", "configs/study-smoke.yaml", "--storage", f"file://{store}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("already finished: skipped") == 4
    assert "4 runs, 0 to run" in out.stderr
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_same_seed_same_tables_and_a_failed_run_spares_the_others(smoke_study, tmp_path):
    """A second study: the gpt2 runs of the smoke study again under other run ids, beside
    runs whose corpus is unreadable (found only when fine-tuning reads it)."""
    store, _ = smoke_study
    spec = yaml.safe_load((ROOT / "configs/study-smoke.yaml").read_text())
    broken = tmp_path / "corpus.jsonl"
    broken.write_text("this is not json\n")
    spec.update(name="again", base=str(ROOT / "configs/smoke.yaml"))
    spec["axes"]["arch"] = [spec["axes"]["arch"][0],
                            {"label": "broken", "model.source": "tiny-gpt2", "data.corpus": str(broken)}]
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run_cli("study", "run", "--config", str(path), "--storage", f"file://{store}", timeout=1500)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 of 4 runs failed (again-broken-s0, again-broken-s1)" in out.stderr
    for seed in (0, 1):
        for table in RUN_TABLES:
            assert _rows(store, table, f"again-gpt2-s{seed}") == _rows(store, table, f"study-smoke-gpt2-s{seed}"), table
    import pyarrow.dataset as ds

    runs = {r["run_id"]: r for r in ds.dataset(store / "tables/study_runs", partitioning="hive").to_table().to_pylist()
            if r["study_id"] == "again"}
    assert runs["again-gpt2-s0"]["status"] == "done"
    assert runs["again-broken-s1"]["status"] == "failed" and "corpus" in runs["again-broken-s1"]["error"].lower()
    summary = (store / "studies/again/report/summary.md").read_text()
    assert "## gpt2" in summary and "failed" in summary
