import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plasticity.config import StorageConfig
from plasticity.storage import Manifest, Storage, read_table, write_shard
from plasticity.storage.manifest import ConfigMismatchError
from plasticity.storage.schemas import TABLES


@pytest.fixture
def storage(tmp_path):
    return Storage.from_config(StorageConfig(uri=f"file://{tmp_path}"))


def _directions(n: int, d: int = 4) -> dict:
    return {
        "concept": ["honesty"] * n, "layer": list(range(n)), "method": ["mean_diff"] * n,
        "sign": [1] * n, "explained_variance": [0.5] * n, "detection_accuracy": [0.9] * n,
        "residual_norm": [3.0] * n, "vector": [[float(i)] * d for i in range(n)],
    }


def test_shards_land_in_hive_partitions_and_read_back_typed(storage, tmp_path):
    for step in (0, 10):
        write_shard(storage, "directions", {"run_id": "007", "checkpoint_step": step}, "honesty",
                    _directions(3), d_model=4)
    path = tmp_path / "tables/directions/run_id=007/checkpoint_step=10/honesty.parquet"
    assert path.is_file()
    # Partition columns live in the path only; the file carries schema_version.
    assert "run_id" not in pq.read_schema(path).names
    assert pq.read_schema(path).field("vector").type == pa.list_(pa.float32(), 4)
    table = read_table(storage, "directions", run_ids=["007"])
    assert table.num_rows == 6
    # "007" stays a string even though it looks like a number.
    assert table.schema.field("run_id").type == pa.string()
    assert set(table.column("run_id").to_pylist()) == {"007"}
    assert sorted(set(table.column("checkpoint_step").to_pylist())) == [0, 10]
    assert set(table.column("schema_version").to_pylist()) == {1}


def test_a_retried_shard_replaces_itself(storage):
    part = {"run_id": "r", "checkpoint_step": 0}
    write_shard(storage, "directions", part, "honesty", _directions(3), d_model=4)
    write_shard(storage, "directions", part, "honesty", _directions(2), d_model=4)
    assert read_table(storage, "directions").num_rows == 2


def test_no_temporary_file_is_left_behind(storage, tmp_path):
    write_shard(storage, "directions", {"run_id": "r", "checkpoint_step": 0}, "x", _directions(1), d_model=4)
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert names == ["x.parquet"]


def test_wrong_columns_and_partitions_are_named(storage):
    rows = _directions(1)
    del rows["sign"]
    with pytest.raises(ValueError, match=r"missing columns \['sign'\]"):
        write_shard(storage, "directions", {"run_id": "r", "checkpoint_step": 0}, "x", rows, d_model=4)
    with pytest.raises(ValueError, match="partitions must be"):
        write_shard(storage, "directions", {"run_id": "r"}, "x", _directions(1), d_model=4)


def test_every_design_table_has_run_id_and_schema_version():
    for spec in TABLES.values():
        if spec.name.startswith("study_"):
            # A study's tables are partitioned by study and name each run in a column.
            assert spec.column_names[0] == "study_id", spec.name
            assert spec.name == "study_runs" or "group" in spec.column_names
        else:
            assert spec.column_names[0] == "run_id", spec.name
        assert "schema_version" in spec.column_names


def test_memory_filesystem_works_like_a_remote_one():
    storage = Storage.from_config(StorageConfig(uri="memory://bucket/prefix"))
    assert not storage.is_local
    write_shard(storage, "directions", {"run_id": "r", "checkpoint_step": 5}, "h", _directions(2), d_model=4)
    assert read_table(storage, "directions").num_rows == 2


def test_unwritable_storage_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    storage = Storage.from_config(StorageConfig(uri=f"file://{blocker}/sub"))
    with pytest.raises(OSError, match="is not writable"):
        storage.check_writable()


def test_manifest_records_units_and_refuses_a_changed_config(storage):
    m = Manifest(storage, "r1")
    m.open({"train": {"lr": 1.0}, "storage": {"uri": "a"}})
    assert not m.is_done("extract", "step=0")
    m.commit("extract", "step=0", ["/x/tables/directions/a.parquet"], summary={"k": 1})
    assert m.is_done("extract", "step=0")
    assert m.committed_shards("directions") == ["/x/tables/directions/a.parquet"]
    data = json.loads(storage.read_bytes(m.path))
    assert data["versions"]["torch"] and data["config"]["train"]["lr"] == 1.0
    # Storage may differ between attempts; the science may not.
    m.open({"train": {"lr": 1.0}, "storage": {"uri": "b"}})
    with pytest.raises(ConfigMismatchError, match=r"train.lr: 1.0 \(stored\) != 2.0 \(given\)"):
        m.open({"train": {"lr": 2.0}, "storage": {"uri": "a"}})


def test_vector_columns_from_arrays_equal_those_from_lists(storage):
    import numpy as np

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 4)).astype(np.float32)
    rows = _directions(5)
    part = {"run_id": "r", "checkpoint_step": 0}
    rows["vector"] = vecs.tolist()
    write_shard(storage, "directions", part, "lists", rows, d_model=4)
    rows["vector"] = vecs
    write_shard(storage, "directions", {**part, "checkpoint_step": 1}, "arrays", rows, d_model=4)
    t = read_table(storage, "directions").sort_by("checkpoint_step")
    assert t.column("vector").to_pylist()[:5] == t.column("vector").to_pylist()[5:]
    rows["vector"] = vecs[:, :3]
    with pytest.raises(ValueError, match=r"expected a \(rows, 4\) array, got shape \(5, 3\)"):
        write_shard(storage, "directions", part, "bad", rows, d_model=4)


def test_a_truncated_shard_is_named_on_read(storage):
    from plasticity.storage.shards import CorruptShardError

    paths = [
        write_shard(storage, "directions", {"run_id": "r", "checkpoint_step": s}, "h", _directions(3), d_model=4)
        for s in (0, 1)
    ]
    data = storage.read_bytes(paths[1])
    with open(paths[1], "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=r"table directions: .*checkpoint_step=1/h.parquet"):
        read_table(storage, "directions")


def test_rows_take_their_columns_from_the_schema():
    from plasticity.storage import Rows

    rows = Rows("direction_similarity")
    rows.add(concept="h", layer=1, step_a=0, step_b=5, cosine=0.5)
    assert rows.columns == {"concept": ["h"], "layer": [1], "step_a": [0], "step_b": [5], "cosine": [0.5]}
    with pytest.raises(ValueError, match=r"row missing \['cosine'\], unknown \['cos'\]"):
        rows.add(concept="h", layer=1, step_a=0, step_b=5, cos=0.5)
