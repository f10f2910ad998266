"""Readers for downstream analysis of the Parquet tables."""

from __future__ import annotations

from typing import Any

from plasticity.config import StorageConfig
from plasticity.storage.fs import Storage
from plasticity.storage.shards import read_table


def load(
    table: str,
    storage: str | StorageConfig = "file://./runs",
    run_ids: list[str] | None = None,
    as_pandas: bool = False,
) -> Any:
    """Read one table (every run, or `run_ids`) as a pyarrow Table or a pandas DataFrame.

    `storage` is a storage URI or a StorageConfig (for an S3 endpoint_url).
    """
    cfg = storage if isinstance(storage, StorageConfig) else StorageConfig(uri=storage)
    result = read_table(Storage.from_config(cfg), table, run_ids=run_ids)
    return result.to_pandas() if as_pandas else result


__all__ = ["load"]
