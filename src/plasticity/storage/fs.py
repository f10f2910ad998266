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


class StorageAccessError(OSError):
    """The storage root cannot be used: a missing bucket, refused credentials, an
    endpoint that cannot be reached, or a folder that cannot be written."""


# S3 error codes that mean the credentials themselves were refused.
_CREDENTIAL_CODES = (
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId", "TokenRefreshRequired",
)


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of `exc` or of an exception in its cause chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        cur = cur.__cause__ or cur.__context__
    return None


def _is_connection_error(exc: BaseException) -> bool:
    names = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
             "ConnectionError", "ClientConnectorError", "ServerDisconnectedError")
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionError | TimeoutError) or any(
            n in c.__name__ for c in type(cur).__mro__ for n in names
        ):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


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
        """Fail early, with the cause, when the root cannot be written.

        Writes and removes one small probe object. On S3 the probe runs with short
        timeouts and few retries, and the failure is named: a missing bucket, refused
        credentials, or an endpoint that cannot be reached (`StorageAccessError`).
        """
        probe = self.path(f"_probe-{uuid.uuid4().hex}")
        fs = self.fs
        if self.uri.startswith("s3://"):
            fs = type(self.fs)(
                client_kwargs=dict(self.fs.client_kwargs),
                config_kwargs={
                    "connect_timeout": 5, "read_timeout": 10,
                    "retries": {"max_attempts": 2, "mode": "standard"},
                },
                skip_instance_cache=True,
            )
            fs.retries = 2  # s3fs's own retries of connection errors (default 5)
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
        except Exception as exc:
            raise StorageAccessError(self._explain(exc)) from exc

    def _explain(self, exc: BaseException) -> str:
        """A message that names the failing part of the storage settings (never a secret)."""
        if not self.uri.startswith("s3://"):
            return f"storage.uri: {self.uri} is not writable: {exc}"
        code = _s3_error_code(exc)
        bucket = self.root.split("/", 1)[0]
        endpoint = self.fs.client_kwargs.get("endpoint_url") or "AWS S3"
        if code == "NoSuchBucket":
            return (
                f"storage.uri: bucket {bucket!r} does not exist at {endpoint} (check the "
                "name in storage.uri, or create the bucket first)"
            )
        if code in _CREDENTIAL_CODES:
            return (
                f"storage credentials: {endpoint} refused them ({code}) for bucket "
                f"{bucket!r}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                "in the environment of every process of the run (never in a config file)"
            )
        if code == "AccessDenied":
            return (
                f"storage.uri: access to bucket {bucket!r} at {endpoint} is denied (AccessDenied): "
                "the credentials lack s3:PutObject/s3:DeleteObject there"
            )
        if _is_connection_error(exc):
            return (
                f"storage.endpoint_url: cannot reach {endpoint} for {self.uri}: "
                f"{type(exc).__name__}: {exc}"
            )
        return f"storage.uri: {self.uri} is not writable: {type(exc).__name__}: {exc}"

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
