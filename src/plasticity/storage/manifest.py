"""The run manifest: resolved config, versions, and each stage's committed shards.

Only the orchestrating process writes it (workers return the shards they wrote), so a
process-wide lock is enough to keep read-modify-write updates whole. `RunLock` keeps a
second attempt of the same run (another process or machine) from running alongside.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import subprocess
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from plasticity.storage.fs import Storage
from plasticity.storage.schemas import SCHEMA_VERSION

log = logging.getLogger(__name__)
_LOCK = threading.RLock()
PACKAGES = ("plasticity", "torch", "transformers", "safetensors", "pyarrow", "prefect", "ray", "s3fs")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class ConfigMismatchError(ValueError):
    """A run id that already exists with a different configuration."""


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {a!r} (stored) != {b!r} (given)"]


# Keys that may differ between attempts of the same run without changing its results.
_VOLATILE = ("storage", "compute")


class Manifest:
    def __init__(self, storage: Storage, run_id: str):
        self.storage = storage
        self.run_id = run_id
        self.path = storage.path("runs", run_id, "manifest.json")

    def read(self) -> dict[str, Any] | None:
        if not self.storage.exists(self.path):
            return None
        return json.loads(self.storage.read_bytes(self.path))

    def _write(self, data: dict[str, Any]) -> None:
        data["updated_at"] = now_iso()
        self.storage.write_bytes(self.path, json.dumps(data, indent=2, sort_keys=True).encode())

    def check_config(self, config: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        """Refuse a config that differs from the stored one (storage and compute aside)."""
        data = self.read() if data is None else data
        if data is None:
            return
        stored = {k: v for k, v in data["config"].items() if k not in _VOLATILE}
        given = {k: v for k, v in config.items() if k not in _VOLATILE}
        diffs = _diff(stored, given)
        if diffs:
            raise ConfigMismatchError(
                f"run {self.run_id} already exists with a different config:\n  "
                + "\n  ".join(diffs)
                + "\nuse a new --run-id, or the stored config to resume"
            )

    def open(self, config: dict[str, Any]) -> dict[str, Any]:
        """Create the manifest, or check that an existing one has the same config."""
        with _LOCK:
            data = self.read()
            if data is not None:
                self.check_config(config, data)
                data["attempts"] = data.get("attempts", 1) + 1
            else:
                data = {
                    "run_id": self.run_id,
                    "schema_version": SCHEMA_VERSION,
                    "created_at": now_iso(),
                    "config": config,
                    "versions": package_versions(),
                    "git_commit": git_commit(),
                    "status": "running",
                    "attempts": 1,
                    "stages": {},
                }
            data["status"] = "running"
            self._write(data)
            return data

    def unit(self, stage: str, key: str) -> dict[str, Any] | None:
        data = self.read() or {}
        return data.get("stages", {}).get(stage, {}).get(key)

    def is_done(self, stage: str, key: str) -> bool:
        unit = self.unit(stage, key)
        return bool(unit and unit.get("status") == "done")

    def commit(self, stage: str, key: str, shards: list[str], **info: Any) -> None:
        """Record a finished unit of work and the shards it wrote."""
        with _LOCK:
            data = self.read()
            if data is None:
                raise FileNotFoundError(f"no manifest at {self.path}: open the run first")
            units = data.setdefault("stages", {}).setdefault(stage, {})
            units[key] = {"status": "done", "shards": sorted(shards), "finished_at": now_iso(), **info}
            self._write(data)

    def set_status(self, status: str, error: str | None = None) -> None:
        with _LOCK:
            data = self.read()
            if data is None:
                return
            data["status"] = status
            if error:
                data["error"] = error
            else:
                data.pop("error", None)
            self._write(data)

    def committed_shards(self, table: str | None = None) -> list[str]:
        data = self.read() or {}
        out = []
        for units in data.get("stages", {}).values():
            for unit in units.values():
                out += unit.get("shards", [])
        if table is not None:
            out = [p for p in out if f"/tables/{table}/" in p]
        return sorted(out)


# -- the run lock ---------------------------------------------------------------------


class RunLockedError(RuntimeError):
    """Another live attempt holds the run's lock."""


def _owner() -> dict[str, Any]:
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": user, **_process_identity()}


def _read_proc(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _stat_of(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks after boot) from /proc/<pid>/stat."""
    text = _read_proc(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_space() -> dict[str, str] | None:
    """What makes a pid mean the same process to two readers: the same boot of the same
    kernel and the same pid namespace. A pid of another container (another namespace)
    or of the machine before a reboot tells nothing here."""
    import os

    boot_id = _read_proc("/proc/sys/kernel/random/boot_id")
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    if not boot_id:
        return None
    return {"boot_id": boot_id.strip(), "pid_ns": pid_ns}


def _process_identity() -> dict[str, Any]:
    """`boot_id`, `pid_ns` and `pid_start` of this process (Linux), so that a later attempt
    can tell whether it still runs even after its pid was given to another process; empty
    where /proc does not tell (the heartbeat rule then decides alone)."""
    import os

    space = _pid_space()
    stat = _stat_of(os.getpid())
    if space is None or stat is None:
        return {}
    return {**space, "pid_start": stat[1]}


def _checkable_here(owner: dict[str, Any]) -> bool:
    """Whether this process can tell from the lock's owner fields if the owner runs: the
    same host, boot and pid namespace, and a lock that records the pid's start time."""
    import socket

    return (
        owner.get("host") == socket.gethostname()
        and isinstance(owner.get("pid"), int)
        and isinstance(owner.get("pid_start"), int)
        and _pid_space() == {"boot_id": owner.get("boot_id"), "pid_ns": owner.get("pid_ns")}
    )


def owner_gone(owner: dict[str, Any]) -> str | None:
    """Why the lock's owner process certainly no longer runs, or None when it runs or this
    process cannot tell (another host, container or boot; a lock without the identity)."""
    import os

    # A lock written without the identity (by an older version): its pid alone could
    # have been reused, so only the heartbeat decides.
    if not _checkable_here(owner) or owner["pid"] <= 0:
        return None
    pid, start = owner["pid"], owner["pid_start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not running"
    except PermissionError:
        pass  # another user's process exists under that pid; /proc tells which
    stat = _stat_of(pid)
    if stat is None:
        # Gone since the check above, or hidden (/proc mounted with hidepid): tell only
        # when signalling it still fails.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} is not running"
        except PermissionError:
            pass
        return None
    state, now_start = stat
    if now_start != start:
        return f"pid {pid} now belongs to another process (started at tick {now_start}, not {start})"
    if state in ("Z", "X", "x"):
        return f"pid {pid} has exited (state {state}: not yet reaped by its parent)"
    return None


class RunLock:
    """One live attempt per run id: `runs/<run_id>/lock.json` in the run's storage.

    The lock file names its owner (host, pid, user and, on Linux, what tells that pid's
    process from a later one with the same pid: the boot id, the pid namespace and the
    process's start time) and carries a heartbeat time that the owner refreshes every
    `stale_after / 10` seconds from a background thread. A lock is taken over

    - at once when its owner ran on this host, in this pid namespace and boot, and that
      process is gone (no such pid, a zombie, or the pid now names a process that started
      at another time): an attempt killed outright can be restarted straight away;
    - else when its heartbeat is older than `stale_after` (a crashed attempt on another
      host or in another container, or a lock written without the identity).

    A live owner makes `acquire` raise `RunLockedError` with the owner, the heartbeat's
    age and what to do. The file is created exclusively (O_EXCL on a local folder, a
    conditional PUT with If-None-Match on S3), and a takeover goes through `_take_over`,
    so two attempts that start together cannot both win. Clocks of the machines are
    assumed to agree (NTP); two machines or containers may share a host name, which is
    why the pid is believed only within the same boot and pid namespace.
    """

    FILE = "lock.json"

    def __init__(self, storage: Storage, run_id: str, stale_after: float = 600.0):
        if stale_after <= 0:
            raise ValueError(f"stale_after: expected a positive number of seconds, got {stale_after}")
        self.storage = storage
        self.run_id = run_id
        self.stale_after = float(stale_after)
        self.path = storage.path("runs", run_id, self.FILE)
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- file operations ---------------------------------------------------------------

    def _payload(self, acquired_at: str | None = None) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "run_id": self.run_id, "token": self.token, "owner": _owner(),
                "acquired_at": acquired_at or now_iso(), "heartbeat_at": now,
                "heartbeat_iso": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
                "stale_after_s": self.stale_after,
            },
            indent=2, sort_keys=True,
        ).encode()

    def _create(self) -> bool:
        """Create the lock file if there is none; False when one exists."""
        return self._create_exclusive(self.path, self._payload())

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Write `path` whole unless it exists; False when it does."""
        if self.storage.is_local:
            import os

            # Written whole under a private name, then linked: the link appears atomically
            # with its content, and fails when the file exists.
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.new-{self.token}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
            return True
        if self.storage.uri.startswith("s3://"):
            try:
                self.storage.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        if self.storage.exists(path):  # other filesystems: best effort
            return False
        self.storage.write_bytes(path, data)
        return True

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as stale
            return {"heartbeat_at": 0.0, "owner": {}, "token": None}

    def _remove(self) -> None:
        try:
            self.storage.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Replace a stale lock; of several takers of the same stale lock, one succeeds.

        A taker first creates `lock.json.takeover-<stale token>` exclusively; only its
        creator may replace the stale file, and only while the file still holds that
        token (a taker that arrives late finds a new token and gives up)."""
        marker = f"{self.path}.takeover-{stale.get('token')}"
        if not self._create_exclusive(marker, self.token.encode()):
            return False
        try:
            current = self.read()
            if current is None or current.get("token") != stale.get("token"):
                return False
            self._remove()
            return self._create()
        finally:
            try:
                self.storage.fs.rm_file(marker)
            except FileNotFoundError:
                pass

    # -- public ------------------------------------------------------------------------

    def describe(self, data: dict[str, Any]) -> str:
        owner = data.get("owner") or {}
        age = time.time() - float(data.get("heartbeat_at") or 0.0)
        return (
            f"host {owner.get('host')}, pid {owner.get('pid')}, user {owner.get('user')}, "
            f"acquired {data.get('acquired_at')}, last heartbeat {age:.0f} s ago"
        )

    def acquire(self) -> RunLock:
        """Take the lock, or raise `RunLockedError` when a live attempt holds it."""
        for _ in range(3):
            if self._create():
                self.held = True
                log.info("run %s: lock taken (%s)", self.run_id, self.storage.full_uri(self.path))
                return self
            data = self.read()
            if data is None:
                continue  # released meanwhile; try again
            age = time.time() - float(data.get("heartbeat_at") or 0.0)
            stale = age >= self.stale_after
            gone = None if stale else owner_gone(data.get("owner") or {})
            if not stale and gone is None:
                raise RunLockedError(self._refusal(data, age))
            if gone is not None:
                log.warning(
                    "run %s: taking over the lock of an attempt that is gone (%s: %s)",
                    self.run_id, self.describe(data), gone,
                )
            else:
                log.warning(
                    "run %s: taking over a stale lock (%s)", self.run_id, self.describe(data)
                )
            if self._take_over(data):
                self.held = True
                return self
        raise RunLockedError(f"run {self.run_id}: another attempt took the lock at the same time")

    def _refusal(self, data: dict[str, Any], age: float) -> str:
        head = f"run {self.run_id} is already running ({self.describe(data)})."
        owner = data.get("owner") or {}
        if _checkable_here(owner):
            return (
                f"{head} That process is alive on this host: wait for it to finish, or "
                f"stop it; once it is gone the next attempt takes the lock over at once"
            )
        uri = self.storage.full_uri(self.path)
        return (
            f"{head} Wait for it to finish. If that attempt crashed: restarted on its own "
            f"host ({owner.get('host')}), the run takes the lock over at once; from here "
            f"the lock is stale after {self.stale_after:.0f} s without a heartbeat "
            f"(storage.lock_stale_s), {max(0.0, self.stale_after - age):.0f} s from now, "
            f"and is then taken over; to break it sooner, make sure no process of the run "
            f"is alive and delete {uri}"
        )

    def heartbeat(self) -> bool:
        """Refresh the heartbeat; False (and `lost`) when another attempt took the lock."""
        data = self.read()
        if data is None or data.get("token") != self.token:
            self.lost = True
            log.error(
                "run %s: lost its lock to another attempt (%s)",
                self.run_id, self.describe(data) if data else "lock removed",
            )
            return False
        self.storage.write_bytes(self.path, self._payload(data.get("acquired_at")))
        return True

    def _beat(self) -> None:
        interval = self.stale_after / 10
        while not self._stop.wait(interval):
            try:
                if not self.heartbeat():
                    return
            except Exception as exc:  # storage briefly unreachable: try again next time
                log.warning("run %s: lock heartbeat failed: %s", self.run_id, exc)

    def start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.run_id}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.held:
            return
        self.held = False
        try:
            data = self.read()
            if data is not None and data.get("token") == self.token:
                self._remove()
        except Exception as exc:  # the lock then goes stale on its own
            log.warning("run %s: could not remove its lock: %s", self.run_id, exc)

    def __enter__(self) -> RunLock:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
