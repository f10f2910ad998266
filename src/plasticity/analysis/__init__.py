"""Readers for downstream analysis of the Parquet tables.

    from plasticity.analysis import load
    df = load("plasticity", "file://./runs", run_ids=["quick-20261127"],
              filters={"metric": "facts_logit_gap", "direction": "pca"}, as_pandas=True)

The same files read with DuckDB (local storage; for S3 register an s3fs filesystem with
`con.register_filesystem(s3fs.S3FileSystem(...))` and use s3:// paths):

    import duckdb
    duckdb.sql('''
        SELECT source_step, target_step, any_value(slope) AS slope
        FROM read_parquet('runs/tables/plasticity/**/*.parquet', hive_partitioning = true)
        WHERE metric = 'facts_logit_gap' AND direction = 'pca'
        GROUP BY ALL ORDER BY ALL
    ''')
"""

from __future__ import annotations

from typing import Any

from plasticity.config import StorageConfig
from plasticity.storage.fs import Storage
from plasticity.storage.shards import read_table


def load(
    table: str,
    storage: str | StorageConfig = "file://./runs",
    run_ids: list[str] | None = None,
    filters: dict[str, Any] | None = None,
    as_pandas: bool = False,
) -> Any:
    """Read one table (every run, or `run_ids`) as a pyarrow Table or a pandas DataFrame.

    `storage` is a storage URI or a StorageConfig (for an S3 endpoint_url). `filters`
    keeps the rows whose column equals the value (or is in it, for a list, tuple or set),
    e.g. ``{"metric": "facts_logit_gap", "target_step": [0, 10]}``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from plasticity.storage.schemas import TABLES

    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(sorted(TABLES))}")
    cfg = storage if isinstance(storage, StorageConfig) else StorageConfig(uri=storage)
    result = read_table(Storage.from_config(cfg), table, run_ids=run_ids)
    for column, value in (filters or {}).items():
        if column not in result.column_names:
            raise ValueError(f"filters: table {table} has no column {column!r}; it has {result.column_names}")
        if isinstance(value, list | tuple | set):
            mask = pc.is_in(result[column], value_set=pa.array(list(value), result[column].type))
        else:
            mask = pc.equal(result[column], value)
        result = result.filter(mask)
    return result.to_pandas() if as_pandas else result


__all__ = ["load"]
