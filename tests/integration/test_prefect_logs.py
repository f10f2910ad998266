"""Stage logs from the Ray actors in the Prefect task runs, read back from a real
`prefect server start` on loopback: every fine-tuning step's loss, extraction and the
plasticity slopes under their own loggers, and a failed stage's cause and traceback."""

from __future__ import annotations

import json
import re

import pytest

from tests.integration.conftest import FAST, FAST_STEPS, ROOT, run_cli

pytestmark = pytest.mark.integration
SMOKE = str(ROOT / "configs" / "smoke.yaml")
STEPS = FAST_STEPS[-1]


def _run_logs(env: dict[str, str], run_id: str):
    """The timeline flow run of `run_id`, its task runs by id, and all its logs in time order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(
        sync_client=True
    ) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name={"any_": [f"timeline {run_id}"]}))
        tasks = {t.id: t for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))}
        logs = []
        while True:  # the API returns a page at a time
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])),
                offset=len(logs), limit=200)
            logs += page
            if len(page) < 200:
                break
    return flow_run, tasks, logs


def _task_of(tasks, log) -> str | None:
    task = tasks.get(log.task_run_id)
    return task.name if task is not None else None


def test_actor_logs_reach_the_task_runs(prefect_server, tmp_path):
    run_id = "forwarded"
    out = run_cli("run", "--config", SMOKE, "--storage", f"file://{tmp_path / 'store'}",
                  "--run-id", run_id, *FAST, env=prefect_server, timeout=420)
    assert out.returncode == 0, out.stderr[-4000:]
    flow_run, tasks, logs = _run_logs(prefect_server, run_id)
    assert flow_run.state.is_completed()

    # Every step's loss, in order, in the fine-tuning task run, under the stage's logger,
    # with the level it was logged at.
    steps = [lg for lg in logs if re.match(r"step \d+/\d+ loss ", lg.message)]
    assert [int(re.match(r"step (\d+)/", lg.message).group(1)) for lg in steps] == list(
        range(1, STEPS + 1)), [lg.message for lg in steps]
    assert all(lg.message.startswith(f"step {i + 1}/{STEPS} loss ") for i, lg in enumerate(steps))
    assert {lg.name for lg in steps} == {"plasticity.stages.finetune"}
    assert {lg.level for lg in steps} == {20}
    assert {_task_of(tasks, lg) for lg in steps} == {
        f"finetune tiny-gpt2 snapshots {list(FAST_STEPS)}"}
    # Each keeps the time the actor logged it at (they were sent in batches).
    times = [lg.timestamp for lg in steps]
    assert times == sorted(times) and len(set(times)) == len(times)
    # The terminal shows them as before, once each (the forwarded copy goes to the API only).
    terminal = out.stdout + out.stderr
    assert terminal.count(f"step 1/{STEPS} loss ") == 1, terminal[-3000:]

    # Extraction, in the task run of each checkpoint.
    extract = [lg for lg in logs if lg.name == "plasticity.stages.extract"]
    assert {_task_of(tasks, lg) for lg in extract} == {
        f"extract checkpoint step={s}" for s in FAST_STEPS}
    assert any(re.match(rf"extract step {STEPS}: \d+ pairs, \d+ layers", lg.message) for lg in extract)

    # Every plasticity slope in the task run of its target.
    sources = ",".join(str(s) for s in FAST_STEPS)
    slopes = [lg for lg in logs if lg.name == "plasticity.stages.plasticity" and "slope of" in lg.message]
    for target in FAST_STEPS:
        mine = [lg for lg in slopes if lg.message.startswith(f"plasticity target {target} <- ")]
        assert {_task_of(tasks, lg) for lg in mine} == {
            f"plasticity target step={target} <- sources {sources}"}
        assert {int(re.search(r"<- source (\d+),", lg.message).group(1)) for lg in mine} == set(FAST_STEPS)
    # Vocabulary read-outs too: each stage's actor records land in its own task run.
    vocab = [lg for lg in logs if lg.name == "plasticity.stages.vocab"]
    assert vocab and all(_task_of(tasks, lg).startswith("vocab checkpoint step=") for lg in vocab)

    # The progress artefacts: fine-tuning counts steps, the other long stages their units;
    # each ends at its full count.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    n = len(FAST_STEPS)
    expected = {
        "finetune": f"Fine-tuning of run {run_id}: step {STEPS}/{STEPS}",
        "extract": f"Extraction of run {run_id}: {n}/{n} checkpoints",
        "plasticity": f"Plasticity grid of run {run_id}: {n}/{n} target checkpoints",
        "vocab": f"Vocabulary read-outs of run {run_id}: {n}/{n} checkpoints",
    }
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}), get_client(
        sync_client=True
    ) as client:
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"{stage}-progress-{run_id}" for stage in expected])))}
        # The loss table: its latest version holds every step's loss, in order.
        loss = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"finetune-loss-{run_id}"])))
    assert loss and loss[0].type == "table", loss
    table = loss[0].data if isinstance(loss[0].data, list) else json.loads(loss[0].data)
    assert [r["step"] for r in table] == list(range(1, STEPS + 1))
    assert all(isinstance(r["loss"], float) for r in table)
    for stage, description in expected.items():
        progress = found[f"{stage}-progress-{run_id}"]
        assert progress.type == "progress"
        assert float(progress.data) == pytest.approx(100.0)
        assert progress.description == description
        assert progress.updated > progress.created  # moved after it was made


def test_a_failed_stage_leaves_its_cause_and_traceback_in_its_task_run(prefect_server, tmp_path):
    run_id = "broken-corpus"
    broken = tmp_path / "corpus.jsonl"  # a file, so the run starts; unreadable when read
    broken.write_text("this is not json\n")
    out = run_cli("run", "--config", SMOKE, "--storage", f"file://{tmp_path / 'store'}",
                  "--run-id", run_id, *FAST, "--set", f"data.corpus={broken}",
                  env=prefect_server, timeout=300)
    assert out.returncode == 1, out.stderr[-4000:]
    assert "stage finetune failed: ValueError" in out.stderr
    flow_run, tasks, logs = _run_logs(prefect_server, run_id)
    assert flow_run.state.is_failed()
    (failure,) = [lg for lg in logs if lg.name == "tasks.actors" and "finetune failed" in lg.message]
    assert _task_of(tasks, failure).startswith("finetune tiny-gpt2")
    assert failure.level == 40
    assert failure.message.startswith(
        f"finetune failed: ValueError: {broken}:1: not a JSON line")
    assert "Traceback (most recent call last)" in failure.message
    assert "in load_corpus" in failure.message  # where it was raised, inside the actor


def test_logs_and_progress_reach_the_api_while_the_stage_runs(prefect_server, tmp_path):
    """Watched as a user watches it: the fine-tuning task run's loss lines and its
    progress artefact, read from the API every half second while the run trains."""
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        LogFilter,
        LogFilterTaskRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run_id, steps = "watched", 80
    proc = subprocess.Popen(
        [sys.executable, "-m", "plasticity.cli", "run", "--config", SMOKE, "--storage",
         f"file://{tmp_path / 'store'}", "--run-id", run_id, *FAST, "--set", f"train.max_steps={steps}",
         "--set", f"train.snapshot_steps=[0,{steps}]"],
        cwd=ROOT, env=prefect_server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[tuple[str, int, str]] = []  # (finetune task state, loss lines, progress description)
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}), get_client(
        sync_client=True
    ) as client:
        deadline = time.time() + 420
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name={"any_": [f"timeline {run_id}"]}))
            if not runs:
                continue
            task = next((t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [runs[0].id]}))
                         if t.name.startswith("finetune")), None)
            if task is None or task.state is None:
                continue
            logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task.id])),
                                    limit=200)
            progress = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"finetune-progress-{run_id}"])))
            seen.append((task.state.type.value, sum(bool(re.match(r"step \d+/\d+ loss ", lg.message)) for lg in logs),
                         progress[0].description if progress else ""))
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-4000:]
    running = [s for s in seen if s[0] == "RUNNING"]
    # The loss lines came in while fine-tuning ran, in more than one batch, not all at its end.
    partial = sorted({n for _, n, _ in running if 0 < n < steps})
    assert len(partial) >= 2, seen
    # The progress artefact moved more than once before training was done.
    moving = {d for _, _, d in running if re.search(rf"step (\d+)/{steps}", d)
              and int(re.search(rf"step (\d+)/{steps}", d).group(1)) < steps}
    assert len(moving) >= 2, seen
    print(f"while running: loss lines {partial}, progress {sorted(moving)}")
