"""Parquet shards: written whole under a deterministic name, read back with Hive partitions."""

from __future__ import annotations

import io
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from plasticity.storage.fs import Storage
from plasticity.storage.schemas import SCHEMA_VERSION, TABLES


class CorruptShardError(RuntimeError):
    """A shard that exists but cannot be read whole."""


def _column(values: Any, tp: pa.DataType) -> pa.Array:
    """A column from a Python list, or for fixed-size vector columns from a 2-D array
    (built from one flat buffer, without a Python float per element)."""
    if pa.types.is_fixed_size_list(tp) and hasattr(values, "ndim"):
        import numpy as np

        arr = np.ascontiguousarray(values, dtype=tp.value_type.to_pandas_dtype())
        if arr.ndim != 2 or arr.shape[1] != tp.list_size:
            raise ValueError(f"expected a (rows, {tp.list_size}) array, got shape {arr.shape}")
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), tp.list_size)
    return pa.array(values, tp)


class Rows:
    """Column lists of one table's rows, with the columns taken from its schema.

    `add(**values)` must name every column, so a row cannot silently miss one.
    """

    def __init__(self, table: str):
        self.table = table
        self.columns: dict[str, list] = {name: [] for name, _ in TABLES[table].columns}

    def add(self, **values: Any) -> None:
        if values.keys() != self.columns.keys():
            missing = sorted(self.columns.keys() - values.keys())
            extra = sorted(values.keys() - self.columns.keys())
            raise ValueError(f"table {self.table}: row missing {missing}, unknown {extra}")
        for name, value in values.items():
            self.columns[name].append(value)


def shard_path(storage: Storage, table: str, partitions: dict[str, Any], name: str) -> str:
    spec = TABLES[table]
    keys = [n for n, _ in spec.partitions]
    if set(partitions) != set(keys):
        raise ValueError(f"table {table}: partitions must be {keys}, got {sorted(partitions)}")
    parts = [f"{k}={partitions[k]}" for k in keys]
    return storage.path("tables", table, *parts, f"{name}.parquet")


def write_shard(
    storage: Storage,
    table: str,
    partitions: dict[str, Any],
    name: str,
    rows: dict[str, list] | pa.Table,
    d_model: int | None = None,
) -> str:
    """Write one shard of `table`; a retry with the same name replaces it, never adds to it."""
    schema = TABLES[table].schema(d_model)
    if isinstance(rows, pa.Table):
        data = rows
        if "schema_version" not in data.column_names:
            data = data.append_column(
                "schema_version", pa.array([SCHEMA_VERSION] * data.num_rows, pa.int32())
            )
        data = data.select(schema.names).cast(schema)
    else:
        n = len(next(iter(rows.values()))) if rows else 0
        columns = dict(rows)
        columns["schema_version"] = [SCHEMA_VERSION] * n
        missing = set(schema.names) - set(columns)
        if missing:
            raise ValueError(f"table {table}: missing columns {sorted(missing)}")
        extra = set(columns) - set(schema.names)
        if extra:
            raise ValueError(f"table {table}: unknown columns {sorted(extra)}")
        data = pa.table({k: _column(columns[k], schema.field(k).type) for k in schema.names})
    buf = io.BytesIO()
    # Dictionaries and min/max statistics pay off for strings and scalars; on vector
    # columns (float16 activations) they cost 4x the write time and grow the file.
    scalar = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    pq.write_table(
        data, buf, compression="zstd", use_dictionary=strings, write_statistics=scalar
    )
    path = shard_path(storage, table, partitions, name)
    storage.write_bytes(path, buf.getvalue())
    return path


def read_table(
    storage: Storage,
    table: str,
    run_ids: list[str] | None = None,
    paths: list[str] | None = None,
) -> pa.Table:
    """Read a table (all runs, or `run_ids`) with its partition columns restored."""
    import pyarrow.dataset as ds

    spec = TABLES[table]
    base = storage.path("tables", table)
    if paths is None:
        if run_ids is None:
            pattern = posixpath.join(base, "**", "*.parquet")
            paths = sorted(storage.fs.glob(pattern))
        else:
            paths = []
            for rid in run_ids:
                paths += sorted(storage.fs.glob(posixpath.join(base, f"run_id={rid}", "**", "*.parquet")))
    if not paths:
        raise FileNotFoundError(f"table {table}: no shards under {storage.full_uri(base)}")
    try:
        dataset = ds.dataset(
            paths,
            filesystem=storage.fs,
            format="parquet",
            partitioning=ds.partitioning(spec.partition_schema(), flavor="hive"),
            partition_base_dir=base,
        )
        data = dataset.to_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptShardError(
            f"table {table}: a shard cannot be read (truncated, or not Parquet): {exc}"
        ) from exc
    # Partition columns first, as the table list documents them.
    return data.select([n for n in spec.column_names if n in data.column_names])
