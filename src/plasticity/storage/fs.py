"""A storage root on any fsspec filesystem: `file://PATH` or `s3://bucket/prefix`.

Credentials for S3 come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_PROFILE) through botocore, never from a config file.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plasticity.config import StorageConfig


def _split_uri(uri: str) -> tuple[str, str]:
    if "://" not in uri:
        raise ValueError(f"storage uri {uri!r}: expected file://PATH or s3://bucket/prefix")
    scheme, rest = uri.split("://", 1)
    return scheme, rest


@dataclass
class Storage:
    """The filesystem and root path of a storage URI; every path below is root-relative."""

    uri: str
    fs: Any
    root: str

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        scheme, rest = _split_uri(cfg.uri)
        if scheme == "file":
            import fsspec

            root = str(Path(rest).expanduser().resolve())
            return cls(uri=f"file://{root}", fs=fsspec.filesystem("file"), root=root)
        if scheme == "memory":
            import fsspec

            return cls(uri=cfg.uri, fs=fsspec.filesystem("memory"), root="/" + rest.strip("/"))
        if scheme == "s3":
            import s3fs  # only needed for S3 roots

            bucket_prefix = rest.strip("/")
            if not bucket_prefix:
                raise ValueError(f"storage uri {cfg.uri!r}: missing the bucket name")
            client_kwargs: dict[str, Any] = {}
            endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL"
            )
            if endpoint:
                client_kwargs["endpoint_url"] = endpoint
            if cfg.region:
                client_kwargs["region_name"] = cfg.region
            fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True)
            return cls(uri=f"s3://{bucket_prefix}", fs=fs, root=bucket_prefix)
        raise ValueError(f"storage uri {cfg.uri!r}: unsupported scheme {scheme!r} (file, s3)")

    @property
    def is_local(self) -> bool:
        return self.uri.startswith("file://")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def full_uri(self, path: str) -> str:
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{path}"

    def check_writable(self) -> None:
        """Fail early, with the cause, when the root cannot be written."""
        probe = self.path(f"_probe-{uuid.uuid4().hex}")
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise OSError(f"storage {self.uri} is not writable: {exc}") from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        """Make `path` appear whole or not at all (rename locally, one PUT on S3)."""
        if self.is_local:
            directory = posixpath.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = posixpath.join(directory, f"_tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def put_file(self, local: str | Path, path: str) -> None:
        self.write_bytes(path, Path(local).read_bytes())

    def get_dir(self, path: str, local: str | Path) -> Path:
        """Copy a remote folder to a local one (the folder itself when already local)."""
        if self.is_local:
            return Path(path)
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        for remote in self.fs.ls(path, detail=False):
            self.fs.get_file(remote, str(local / posixpath.basename(remote)))
        return local
