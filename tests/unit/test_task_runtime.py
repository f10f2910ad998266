"""Which failures the stage tasks retry, their cache keys, and the artefact tables."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from plasticity.config import StorageConfig, config_from_dict
from plasticity.storage import Storage, write_shard
from plasticity.storage.fs import StorageAccessError
from tasks.runtime import (
    artifact_key,
    config_digest,
    detection_rows,
    is_transient,
    thin,
    trained_steps,
    unit_cache_key,
)


class EndpointConnectionError(Exception):
    """Stands for botocore's class of that name (matched by name, like a Ray-wrapped one)."""


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionResetError("reset"), True),
        (TimeoutError("slow"), True),
        (OSError(errno.EBUSY, "SlowDown"), True),
        (EndpointConnectionError("http://127.0.0.1:9"), True),
        (_chained(RuntimeError("write failed"), ConnectionRefusedError()), True),
        (FileNotFoundError("no checkpoint"), False),
        (PermissionError("403"), False),
        (StorageAccessError("storage.uri: bucket 'x' does not exist"), False),
        (ValueError("plasticity.layers: bad"), False),
        (RuntimeError("nan loss"), False),
        (_chained(RuntimeError("wrapper"), ValueError("bad")), False),
        (None, False),
    ],
)
def test_only_storage_and_network_faults_are_retried(exc, expected):
    assert is_transient(exc) is expected


def test_a_ray_task_error_counts_as_its_cause():
    from ray.exceptions import RayTaskError

    err = RayTaskError("StageWorker.extract", "traceback", ConnectionResetError("reset"))
    wrapped = err.as_instanceof_cause()
    assert is_transient(wrapped)
    bad = RayTaskError("StageWorker.extract", "traceback", ValueError("x")).as_instanceof_cause()
    assert not is_transient(bad)


def test_cache_keys_name_the_unit_and_change_with_the_config_but_not_storage_or_compute():
    cfg = config_from_dict({"name": "a"})
    ctx = SimpleNamespace(task=SimpleNamespace(name="plasticity"))
    ckpt = SimpleNamespace(step=5)
    sources = [SimpleNamespace(step=s) for s in (0, 5, 10)]
    key = unit_cache_key(ctx, {"cfg": cfg, "run_id": "r1", "target": ckpt, "sources": sources,
                               "worker": "w0"})
    assert key.startswith("plasticity-r1-target5-sources0-5-10-")
    # The worker does not matter; storage and compute do not change results.
    other_worker = unit_cache_key(ctx, {"cfg": cfg, "run_id": "r1", "target": ckpt,
                                        "sources": sources, "worker": "w1"})
    moved = config_from_dict({"name": "a", "storage": {"uri": "file:///elsewhere"},
                              "compute": {"num_workers": 3}})
    assert other_worker == key == unit_cache_key(
        ctx, {"cfg": moved, "run_id": "r1", "target": ckpt, "sources": sources})
    changed = config_from_dict({"name": "a", "train": {"lr": 0.5}})
    assert config_digest(changed) != config_digest(cfg)
    assert unit_cache_key(ctx, {"cfg": changed, "run_id": "r1", "target": ckpt,
                                "sources": sources}) != key
    extract = SimpleNamespace(task=SimpleNamespace(name="extract"))
    assert unit_cache_key(extract, {"cfg": cfg, "run_id": "r2", "ckpt": ckpt}).startswith(
        "extract-r2-step5-")


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("train-metrics", "Smoke_2026.11.27") == "train-metrics-smoke-2026-11-27"


def test_thin_keeps_first_last_and_spacing():
    rows = [{"step": i} for i in range(1001)]
    out = thin(rows, 11)
    assert [r["step"] for r in out] == list(range(0, 1001, 100))
    assert thin(rows[:5], 11) == rows[:5]


def test_trained_steps_and_detection_rows_from_shards(tmp_path):
    storage = Storage.from_config(StorageConfig(uri=f"file://{tmp_path}"))
    assert trained_steps(storage, "r1") == 0
    cols = {k: [] for k in ("step", "epoch", "loss", "lr", "grad_norm", "tokens_seen",
                            "step_time_s", "optimizer", "optimizer_state_bytes", "wall_time")}
    write_shard(storage, "train_metrics", {"run_id": "r1"}, "part-000001-000005", cols)
    write_shard(storage, "train_metrics", {"run_id": "r1"}, "part-000006-000010", cols)
    write_shard(storage, "train_metrics", {"run_id": "r2"}, "part-000001-000020", cols)
    assert trained_steps(storage, "r1") == 10

    import numpy as np

    shards, expected = [], {}
    rng = np.random.default_rng(0)
    for step in (0, 5):
        rows = {"concept": [], "layer": [], "method": [], "sign": [], "explained_variance": [],
                "detection_accuracy": [], "residual_norm": [], "vector": []}
        for layer in (0, 1):
            for method in ("pca", "random"):
                acc = float(rng.uniform(0.4, 1.0))
                expected[(method, layer, step)] = round(acc, 4)
                for k, v in (("concept", "honesty"), ("layer", layer), ("method", method),
                             ("sign", 1), ("explained_variance", 0.5), ("detection_accuracy", acc),
                             ("residual_norm", 1.0)):
                    rows[k].append(v)
                rows["vector"].append([0.0, 1.0])
        shards.append(write_shard(storage, "directions", {"run_id": "r1", "checkpoint_step": step},
                                  "honesty", {**rows, "vector": np.array(rows["vector"])}, d_model=2))
    table = detection_rows(storage, shards)
    assert len(table) == 4
    for row in table:
        for step in (0, 5):
            assert row[f"step_{step}"] == expected[(row["method"], row["layer"], step)]
    assert [(r["method"], r["layer"]) for r in table] == [("pca", 0), ("pca", 1), ("random", 0), ("random", 1)]
    assert detection_rows(storage, []) == []


def test_a_failing_stage_names_the_stage_and_the_actors_exception():
    from ray.exceptions import RayTaskError

    from flows.timeline import StageFailed, _stage

    def boom():
        cause = ValueError("plasticity.layers: layer 7 was not extracted\n(details)")
        raise RayTaskError("StageWorker.plasticity", "Traceback ...\nValueError", cause).as_instanceof_cause()

    with pytest.raises(StageFailed) as err:
        _stage("plasticity (target step=10)", boom)
    assert str(err.value) == (
        "stage plasticity (target step=10) failed: ValueError: plasticity.layers: layer 7 was "
        "not extracted ... (details)"
    )
    assert isinstance(err.value.__cause__, ValueError)

    class Lost:
        lost, run_id = True, "r1"

    with pytest.raises(StageFailed, match="stage report not started: run r1 lost its lock"):
        _stage("report", lambda: 1, Lost())


def test_runtime_env_carries_no_secret_and_ships_code_only_when_asked(monkeypatch):
    from tasks.actors import WORKING_DIR_EXCLUDES, runtime_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = runtime_env()
    assert set(env) == {"env_vars"}  # no code shipped to a local or image-based cluster
    assert env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert "s3cr3t" not in repr(env) and "AKIA" not in repr(env) and "tok" not in repr(env)
    shipped = runtime_env("/repo")
    assert shipped["working_dir"] == "/repo"
    assert {".venv", ".env", "runs", ".git"} <= set(shipped["excludes"]) == set(WORKING_DIR_EXCLUDES)
