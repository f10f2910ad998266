"""The run lock: one live attempt per run id; stale locks of crashed attempts are taken over."""

from __future__ import annotations

import json
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
    assert f"delete file://{lock_file}" in msg and "storage.lock_stale_s" in msg
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
