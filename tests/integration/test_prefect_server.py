"""The deployments of prefect.yaml against a real `prefect server start` on loopback:
deploy, run the smoke deployment on a process worker, check the artefacts via the API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import FAST, FAST_STEPS, ROOT, stop_group

pytestmark = pytest.mark.integration
PREFECT = str(Path(sys.executable).parent / "prefect")


def _cli(env: dict[str, str], *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    out = subprocess.run([PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_deploy_run_the_smoke_deployment_and_read_its_artefacts(prefect_server, tmp_path):
    env = {**prefect_server, "PWD": str(ROOT)}
    _cli(env, "work-pool", "create", "plasticity-process", "--type", "process")
    _cli(env, "deploy", "--name", "smoke", "--name", "gpt2-medium-nightly")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run_id = "deployed"
    store = tmp_path / "store"
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "plasticity-process", "--type", "process",
         "--limit", "1"],
        cwd=tmp_path, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(
            sync_client=True
        ) as client:
            nightly = client.read_deployment_by_name("plasticity-scheduled/gpt2-medium-nightly")
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
            assert nightly.parameters["config_path"] == "configs/gpt2-medium.yaml"
            assert nightly.work_pool_name == "plasticity-process"
            assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                "directory": str(ROOT)}}]

            smoke = client.read_deployment_by_name("plasticity-scheduled/smoke")
            flow_run = client.create_flow_run_from_deployment(
                smoke.id,
                parameters={
                    "storage": f"file://{store}", "run_id": run_id,
                    "overrides": [FAST[i] for i in range(1, len(FAST), 2)],
                },
            )
            deadline = time.time() + 420
            while time.time() < deadline:
                state = client.read_flow_run(flow_run.id).state
                if state is not None and state.is_final():
                    break
                assert worker.poll() is None, "the worker exited"
                time.sleep(3)
            else:
                pytest.fail("the deployed run did not finish in time")
            worker_out = (tmp_path / "worker.log").read_text(errors="replace")
            assert state.is_completed(), f"{state.type}: {state.message}\n{worker_out[-5000:]}"

            # The timeline ran as a sub-flow run of the deployment's flow run.
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name={"any_": [f"timeline {run_id}"]}))
            assert len(runs) == 1 and runs[0].state.is_completed()
            tasks = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
                id={"any_": [runs[0].id]}))}
            for name in ("extract checkpoint step=0", "extract checkpoint step=6",
                         "plasticity target step=3 <- sources 0,3,6", "vocab checkpoint step=6",
                         "detection accuracy by layer"):
                assert name in tasks, sorted(tasks)
            assert any(t.startswith("finetune tiny-gpt2") for t in tasks)

            keys = {k: f"{k}-{run_id}" for k in (
                "finetune-progress", "train-metrics", "detection-by-layer", "plasticity-summary",
                "plasticity-matrix")}
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys.values()))))
            by_key = {a.key: a for a in arts}
            assert set(by_key) == set(keys.values()), sorted(by_key)
            assert by_key[keys["finetune-progress"]].type == "progress"
            assert float(by_key[keys["finetune-progress"]].data) == pytest.approx(100.0)

            train = _table(by_key[keys["train-metrics"]].data)
            manifest = json.loads((store / "runs" / run_id / "manifest.json").read_text())
            assert [r["step"] for r in train] == list(range(1, FAST_STEPS[-1] + 1))
            detection = _table(by_key[keys["detection-by-layer"]].data)
            assert {r["layer"] for r in detection} == set(range(4))
            assert all(0.0 <= r[f"step_{s}"] <= 1.0 for r in detection for s in FAST_STEPS)
            assert by_key[keys["plasticity-summary"]].type == "markdown"
            # The summary: its figures inline, and where its files and tables are.
            page = by_key[keys["plasticity-summary"]].data
            assert page.count("](data:image/png;base64,") >= 5
            for rel in ("report/summary.md", "report/plasticity_matrix.csv", "manifest.json"):
                assert f"`file://{store}/runs/{run_id}/{rel}`" in page, rel
            for table in ("plasticity", "activations", "train_metrics", "vocab_topk"):
                n = len(list((store / "tables" / table / f"run_id={run_id}").rglob("*.parquet")))
                assert n and f"| `{table}` | {n} | `file://{store}/tables/{table}/run_id={run_id}/` |" in page
            assert manifest["status"] == "done"
            assert not (store / "runs" / run_id / "lock.json").exists()
    finally:
        stop_group(worker)
        worker_log.close()


def _table(data) -> list[dict]:
    rows = json.loads(data) if isinstance(data, str) else data
    return rows


def test_s3_credentials_from_an_aws_credentials_block(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import AwsCredentials

    from flows.scheduled import credentials_from_block
    from plasticity.config import ConfigError

    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        AwsCredentials(
            aws_access_key_id="AKIAPLASTICITYBLOCK1", aws_secret_access_key="block-secret-0123",
            region_name="eu-west-1",
        ).save("plasticity-lab", overwrite=True)
        assert credentials_from_block("plasticity-lab") == {
            "AWS_ACCESS_KEY_ID": "AKIAPLASTICITYBLOCK1",
            "AWS_SECRET_ACCESS_KEY": "block-secret-0123",
            "AWS_DEFAULT_REGION": "eu-west-1",
        }
        with pytest.raises(ConfigError, match="aws_credentials_block: no AwsCredentials block named 'nope'"):
            credentials_from_block("nope")
