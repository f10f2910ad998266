"""Faults survived and bad storage refused: the S3 server dying mid-run, a second
attempt of a running run id, other run ids on the same root, a misspelled bucket, bad
credentials and an endpoint that is not there."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from plasticity.config import StorageConfig
from plasticity.storage import Storage, read_table
from tests.integration.conftest import FAST, ROOT, assert_whole_and_unique, free_port, run_cli

pytestmark = pytest.mark.integration
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


# -- bad storage input ------------------------------------------------------------------


@pytest.fixture
def s3_with_auth():
    """A real S3 server (moto's) on loopback that checks credentials: one IAM user with
    an S3 policy and a bucket. Yields (endpoint, bucket, good credential env)."""
    import boto3

    port = free_port()
    # The first 4 requests (set-up below) are unauthenticated; every later one is checked.
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="lab")
        key = iam.create_access_key(UserName="lab")["AccessKey"]
        iam.put_user_policy(UserName="lab", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }))
        good = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"], aws_session_token=None)
        s3.create_bucket(Bucket="lab")
        yield endpoint, "lab", good, s3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run_env(creds: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AWS_SESSION_TOKEN"}
    return {**env, **creds}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plasticity.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_storage_is_refused_before_any_work_and_writes_nothing(s3_with_auth, monkeypatch):
    endpoint, bucket, good, s3 = s3_with_auth
    common = ["run", "--config", SMOKE, "--run-id", "bad", "--set", f"storage.endpoint_url={endpoint}"]
    wrong_secret = "plasticity-wrong-secret-0123456789"
    cases = [
        # (storage uri, credentials, what the message must say)
        (f"s3://{bucket}-typo/lab", good, f"storage.uri: bucket '{bucket}-typo' does not exist"),
        (f"s3://{bucket}/lab", {**good, "AWS_ACCESS_KEY_ID": "AKIAPLASTICITYUNKNOWN"},
         "storage credentials: " + endpoint + " refused them (InvalidAccessKeyId)"),
        (f"s3://{bucket}/lab", {**good, "AWS_SECRET_ACCESS_KEY": wrong_secret},
         "storage credentials: " + endpoint + " refused them (SignatureDoesNotMatch)"),
    ]
    for uri, creds, expected in cases:
        started = time.time()
        out = _cli(*common, "--storage", uri, env=_run_env(creds))
        assert out.returncode == 2, (uri, out.stdout[-2000:], out.stderr[-3000:])
        assert expected in out.stderr, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        assert wrong_secret not in out.stdout + out.stderr
        assert good["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr
        assert time.time() - started < 60  # refused before Prefect or Ray start
        assert "Starting temporary server" not in out.stderr
    # Nothing was written: the bucket is as empty as it was made.
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

    # An endpoint where nothing listens: named, quickly, exit 2.
    dead = f"http://127.0.0.1:{free_port()}"
    out = _cli("run", "--config", SMOKE, "--run-id", "bad", "--storage", f"s3://{bucket}/lab",
               "--set", f"storage.endpoint_url={dead}", env=_run_env(good))
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"storage.endpoint_url: cannot reach {dead}" in out.stderr

    # The same settings with the right credentials pass the check (the refusals above are
    # about the input, not about this server), and its probe leaves nothing behind.
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for key, value in good.items():
        monkeypatch.setenv(key, value)
    Storage.from_config(StorageConfig(uri=f"s3://{bucket}/lab", endpoint_url=endpoint)).check_writable()
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


# -- the S3 server dies mid-run ---------------------------------------------------------


def _s3_json(s3, bucket: str, key: str) -> dict:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception:
        return {}


def test_s3_server_dies_mid_run_then_comes_back_and_the_runs_finish_whole(tmp_path):
    """Two runs with different run ids share one S3 root; a second attempt of one of them
    is refused while it runs. Then the S3 server (moto's, in this process so its data
    outlives the restart) stops while checkpoints are being extracted and comes back on
    the same port 20 s later. Storage errors are retried with backoff; a run that still
    fails is resumed by re-running its run id. Either way both runs end done, each table
    whole, committed, without duplicate keys, and holding only its own run's rows."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="lab")
    base = ["run", "--config", SMOKE, "--storage", "s3://lab/root",
            "--set", f"storage.endpoint_url={endpoint}", "--set", "storage.lock_stale_s=20", *FAST]
    run_ids = ("s3-outage", "neighbour")
    logs = {rid: open(tmp_path / f"{rid}.log", "w") for rid in run_ids}
    procs = {
        rid: subprocess.Popen([sys.executable, "-m", "plasticity.cli", *base, "--run-id", rid],
                              cwd=ROOT, stdout=logs[rid], stderr=subprocess.STDOUT, text=True)
        for rid in run_ids
    }
    outage: dict = {}
    try:
        # A second attempt of a running run id is refused, naming the holder and the lock.
        lock_key = "root/runs/s3-outage/lock.json"
        deadline = time.time() + 180
        while not _s3_json(s3, "lab", lock_key) and time.time() < deadline:
            time.sleep(0.2)
        holder = _s3_json(s3, "lab", lock_key)
        assert holder, "run s3-outage never took its lock"
        second = run_cli(*base, "--run-id", "s3-outage", timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        assert "run s3-outage is already running" in second.stderr
        assert f"pid {holder['owner']['pid']}" in second.stderr
        # The holder is alive on this host: the refusal says so (a lock of a process
        # gone from this host would be taken over at once instead).
        assert "That process is alive on this host" in second.stderr

        deadline = time.time() + 300
        while time.time() < deadline and procs["s3-outage"].poll() is None:
            manifest = _s3_json(s3, "lab", "root/runs/s3-outage/manifest.json")
            stages = manifest.get("stages", {})
            if "finetune" in stages and len(stages.get("extract", {})) < 3:
                server.stop()
                outage = {"extract_done": len(stages.get("extract", {}))}
                time.sleep(20)
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
                server.start()
                break
            time.sleep(0.2)
        assert outage, "run s3-outage never reached the extraction stage"
        assert outage["extract_done"] < 3
        for rid, proc in procs.items():
            rc = proc.wait(timeout=480)
            logs[rid].close()
            out = (tmp_path / f"{rid}.log").read_text(errors="replace")
            # The run saw the outage: a storage call failed (and was retried), or it failed.
            assert rc != 0 or "lock heartbeat failed" in out or "retrying" in out, (rid, out[-3000:])
            if rc != 0:
                # The failure names the stage and the cause, then the run id resumes.
                assert f"plasticity: run {rid} failed: StageFailed: stage " in out, out[-3000:]
                again = run_cli(*base, "--run-id", rid, timeout=480)
                assert again.returncode == 0, again.stderr[-4000:]

        storage = Storage.from_config(StorageConfig(uri="s3://lab/root", endpoint_url=endpoint))
        counts = {}
        for rid in run_ids:
            manifest = json.loads(storage.read_bytes(storage.path("runs", rid, "manifest.json")))
            assert manifest["status"] == "done"
            counts[rid] = assert_whole_and_unique(storage, rid)
            assert counts[rid]["checkpoints"] == 3 and counts[rid]["train_metrics"] == 6
            assert not storage.exists(storage.path("runs", rid, "lock.json"))
            table = read_table(storage, "plasticity", [rid])
            assert set(table.column("run_id").to_pylist()) == {rid}
        assert counts["s3-outage"] == counts["neighbour"]  # same config: the same tables
        # pandas reads both runs' tables from the S3 server (through s3fs).
        import pandas as pd

        for name in ("plasticity", "train_metrics"):
            df = pd.read_parquet(f"s3://lab/root/tables/{name}",
                                 storage_options={"client_kwargs": {"endpoint_url": endpoint}})
            per_run = df["run_id"].astype(str).value_counts().to_dict()
            assert per_run == {rid: counts[rid][name] for rid in run_ids}, name
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for fh in logs.values():
            fh.close()
        server.stop()
