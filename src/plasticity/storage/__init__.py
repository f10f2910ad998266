"""Storage: fsspec filesystems, the run layout, table schemas, Parquet shards, the manifest."""

from plasticity.storage.fs import Storage
from plasticity.storage.manifest import Manifest
from plasticity.storage.schemas import TABLES, TableSpec
from plasticity.storage.shards import Rows, read_table, write_shard

__all__ = ["Storage", "Manifest", "TABLES", "TableSpec", "Rows", "read_table", "write_shard"]
