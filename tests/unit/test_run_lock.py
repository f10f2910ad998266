"""The run lock: one live attempt per run id; the lock of a crashed attempt is taken over,
at once when its owner process on this host is gone, else once its heartbeat is stale."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from plasticity.config import StorageConfig
from plasticity.storage.fs import Storage
from plasticity.storage.manifest import RunLock, RunLockedError


@pytest.fixture
def storage(tmp_path):
    return Storage.from_config(StorageConfig(uri=f"file://{tmp_path}"))


def test_a_second_attempt_is_refused_with_the_owner_and_how_to_break_it(storage, tmp_path):
    first = RunLock(storage, "r1", stale_after=60).acquire()
    with pytest.raises(RunLockedError) as err:
        RunLock(storage, "r1", stale_after=60).acquire()
    msg = str(err.value)
    lock_file = tmp_path / "runs" / "r1" / "lock.json"
    assert "run r1 is already running" in msg
    assert f"pid {json.loads(lock_file.read_text())['owner']['pid']}" in msg
    # The owner runs on this host and is alive: stopping it is the way out, not deleting.
    assert "alive on this host" in msg and "delete" not in msg
    # The refused attempt did not touch the holder's lock.
    assert json.loads(lock_file.read_text())["token"] == first.token
    first.release()
    assert not lock_file.exists()
    again = RunLock(storage, "r1", stale_after=60).acquire()
    assert json.loads(lock_file.read_text())["token"] == again.token
    again.release()


def test_other_run_ids_do_not_interfere(storage):
    a = RunLock(storage, "a", stale_after=60).acquire()
    b = RunLock(storage, "b", stale_after=60).acquire()
    assert a.held and b.held
    a.release()
    assert b.read()["token"] == b.token
    b.release()


def test_a_stale_lock_is_taken_over_and_its_old_owner_learns_it(storage, tmp_path):
    crashed = RunLock(storage, "r1", stale_after=60).acquire()
    lock_file = tmp_path / "runs" / "r1" / "lock.json"
    data = json.loads(lock_file.read_text())
    data["heartbeat_at"] = time.time() - 61  # no heartbeat for longer than stale_after
    lock_file.write_text(json.dumps(data))
    new = RunLock(storage, "r1", stale_after=60).acquire()
    assert json.loads(lock_file.read_text())["token"] == new.token
    # The old owner, if it was only paused, finds out at its next heartbeat.
    assert crashed.heartbeat() is False and crashed.lost
    crashed.release()  # must not remove the new owner's lock
    assert json.loads(lock_file.read_text())["token"] == new.token
    new.release()


def test_a_live_lock_is_not_stale_just_below_the_limit(storage, tmp_path):
    RunLock(storage, "r1", stale_after=60).acquire()
    lock_file = tmp_path / "runs" / "r1" / "lock.json"
    data = json.loads(lock_file.read_text())
    data["heartbeat_at"] = time.time() - 50
    lock_file.write_text(json.dumps(data))
    with pytest.raises(RunLockedError, match=r"last heartbeat 5\d s ago"):
        RunLock(storage, "r1", stale_after=60).acquire()


def test_the_heartbeat_thread_keeps_a_long_run_alive(storage):
    with RunLock(storage, "r1", stale_after=0.5) as lock:
        first = lock.read()["heartbeat_at"]
        time.sleep(0.8)  # longer than stale_after: only the heartbeat keeps it live
        assert lock.read()["heartbeat_at"] > first
        with pytest.raises(RunLockedError):
            RunLock(storage, "r1", stale_after=0.5).acquire()
    assert lock.read() is None


def test_racing_attempts_get_exactly_one_lock(storage):
    locks = [RunLock(storage, "r1", stale_after=60) for _ in range(8)]
    won, refused = [], []
    barrier = threading.Barrier(len(locks))

    def go(lock: RunLock) -> None:
        barrier.wait()
        try:
            won.append(lock.acquire())
        except RunLockedError:
            refused.append(lock)

    threads = [threading.Thread(target=go, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert won[0].read()["token"] == won[0].token


def test_racing_takeovers_of_a_stale_lock_get_exactly_one(storage, tmp_path):
    RunLock(storage, "r1", stale_after=60).acquire()
    lock_file = tmp_path / "runs" / "r1" / "lock.json"
    data = json.loads(lock_file.read_text())
    data["heartbeat_at"] = 0.0
    lock_file.write_text(json.dumps(data))
    locks = [RunLock(storage, "r1", stale_after=60) for _ in range(6)]
    won = []
    barrier = threading.Barrier(len(locks))

    def go(lock: RunLock) -> None:
        barrier.wait()
        try:
            won.append(lock.acquire())
        except RunLockedError:
            pass

    threads = [threading.Thread(target=go, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert json.loads(lock_file.read_text())["token"] == won[0].token


def test_bad_stale_after_is_named(storage):
    with pytest.raises(ValueError, match="stale_after"):
        RunLock(storage, "r1", stale_after=0)


# -- owners on this host: a gone process's lock is taken over at once -----------------


def _write_lock(storage, tmp_path, run_id: str = "r1", **owner) -> None:
    """A lock as another attempt writes it, with a fresh heartbeat and `owner` fields
    changed from this process's."""
    other = RunLock(storage, run_id, stale_after=600)
    data = json.loads(other._payload())
    data["owner"].update(owner)
    path = tmp_path / "runs" / run_id / "lock.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _start_ticks(pid: int) -> int:
    text = open(f"/proc/{pid}/stat").read()
    return int(text[text.rfind(")") + 2 :].split()[19])


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


linux_only = pytest.mark.skipif(
    not os.path.exists("/proc/self/stat"), reason="process identity is read from /proc"
)


@linux_only
def test_the_lock_records_what_tells_its_process_from_a_later_one(storage):
    lock = RunLock(storage, "r1", stale_after=60).acquire()
    owner = lock.read()["owner"]
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert owner["pid_start"] == _start_ticks(os.getpid())
    assert owner["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()
    assert owner["pid_ns"] == os.readlink("/proc/self/ns/pid")
    lock.release()


@linux_only
def test_a_lock_whose_owner_died_on_this_host_is_taken_over_at_once(storage, tmp_path, caplog):
    child = _sleeper()
    pid, start = child.pid, _start_ticks(child.pid)
    child.kill()
    child.wait()
    _write_lock(storage, tmp_path, pid=pid, pid_start=start)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="plasticity.storage.manifest"):
        lock = RunLock(storage, "r1", stale_after=600).acquire()
    assert time.monotonic() - began < 1.0  # no wait for the 600 s staleness
    assert lock.read()["token"] == lock.token and lock.read()["owner"]["pid"] == os.getpid()
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert f"pid {pid} is not running" in warning[0].getMessage()
    assert "attempt that is gone" in warning[0].getMessage()
    lock.release()


@linux_only
def test_a_zombie_owner_counts_as_gone(storage, tmp_path, caplog):
    child = _sleeper()
    try:
        start = _start_ticks(child.pid)
        child.kill()
        deadline = time.time() + 10  # killed, not yet reaped: a zombie
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.01)
        _write_lock(storage, tmp_path, pid=child.pid, pid_start=start)
        with caplog.at_level(logging.WARNING, logger="plasticity.storage.manifest"):
            lock = RunLock(storage, "r1", stale_after=600).acquire()
        assert f"pid {child.pid} has exited (state Z" in caplog.text
        lock.release()
    finally:
        child.wait()


@linux_only
def test_a_reused_pid_counts_as_gone(storage, tmp_path, caplog):
    # The pid runs, but the process under it started at another time than the owner.
    child = _sleeper()
    try:
        _write_lock(storage, tmp_path, pid=child.pid, pid_start=_start_ticks(child.pid) - 1)
        with caplog.at_level(logging.WARNING, logger="plasticity.storage.manifest"):
            lock = RunLock(storage, "r1", stale_after=600).acquire()
        assert f"pid {child.pid} now belongs to another process" in caplog.text
        lock.release()
    finally:
        child.kill()
        child.wait()


@linux_only
def test_a_live_owner_on_this_host_is_refused(storage, tmp_path):
    child = _sleeper()
    try:
        _write_lock(storage, tmp_path, pid=child.pid, pid_start=_start_ticks(child.pid))
        with pytest.raises(RunLockedError, match=f"pid {child.pid}.*alive on this host"):
            RunLock(storage, "r1", stale_after=600).acquire()
    finally:
        child.kill()
        child.wait()
    # Once it is gone, the next attempt takes the lock over without waiting.
    lock = RunLock(storage, "r1", stale_after=600).acquire()
    assert lock.read()["token"] == lock.token
    lock.release()


def _dead_pid() -> tuple[int, int | None]:
    child = _sleeper()
    start = _start_ticks(child.pid) if os.path.exists("/proc/self/stat") else None
    child.kill()
    child.wait()
    return child.pid, start


@pytest.mark.parametrize(
    "owner",
    [
        {"host": "another-host"},  # the pid means nothing here
        {"pid_ns": "pid:[1]"},  # another container with the same host name
        {"boot_id": "00000000-0000-0000-0000-000000000000"},  # before a reboot, or another machine
    ],
    ids=["another host", "another pid namespace", "another boot"],
)
def test_a_dead_pid_elsewhere_keeps_the_heartbeat_rule(storage, tmp_path, owner):
    pid, start = _dead_pid()
    _write_lock(storage, tmp_path, pid=pid, pid_start=start, **owner)
    with pytest.raises(RunLockedError) as err:
        RunLock(storage, "r1", stale_after=600).acquire()
    msg = str(err.value)
    assert "storage.lock_stale_s" in msg and f"delete file://{tmp_path}/runs/r1/lock.json" in msg
    assert f"restarted on its own host ({owner.get('host', socket.gethostname())})" in msg
    # Without a heartbeat for stale_after, it is taken over as before.
    lock_file = tmp_path / "runs" / "r1" / "lock.json"
    data = json.loads(lock_file.read_text())
    data["heartbeat_at"] = time.time() - 601
    lock_file.write_text(json.dumps(data))
    lock = RunLock(storage, "r1", stale_after=600).acquire()
    assert lock.read()["token"] == lock.token
    lock.release()


def test_a_lock_without_the_process_identity_keeps_the_heartbeat_rule(storage, tmp_path):
    # As written before the lock recorded the start time: its pid alone could be reused.
    pid, _ = _dead_pid()
    _write_lock(storage, tmp_path, pid=pid)
    lock_file = tmp_path / "runs" / "r1" / "lock.json"
    data = json.loads(lock_file.read_text())
    data["owner"] = {k: data["owner"][k] for k in ("host", "pid", "user")}
    lock_file.write_text(json.dumps(data))
    with pytest.raises(RunLockedError, match="stale after 600 s"):
        RunLock(storage, "r1", stale_after=600).acquire()


@linux_only
def test_racing_takeovers_of_a_dead_owners_lock_get_exactly_one(storage, tmp_path):
    pid, start = _dead_pid()
    _write_lock(storage, tmp_path, pid=pid, pid_start=start)
    locks = [RunLock(storage, "r1", stale_after=600) for _ in range(6)]
    won = []
    barrier = threading.Barrier(len(locks))

    def go(lock: RunLock) -> None:
        barrier.wait()
        try:
            won.append(lock.acquire())
        except RunLockedError:
            pass

    threads = [threading.Thread(target=go, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert json.loads((tmp_path / "runs/r1/lock.json").read_text())["token"] == won[0].token
