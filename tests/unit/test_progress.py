"""Progress artefacts (tasks.progress, and how the stage tasks feed them) with a fake clock
and a fake artefact sink: no Prefect server, no Ray."""

from __future__ import annotations

import re
import threading

import pytest

from tasks.progress import PROGRESS_POLL_S, Progress, UnitProgress, count_text, duration


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeSink:
    """Records what a progress artefact would show: its creation, then every update."""

    def __init__(self):
        self.created: list[tuple[float, str]] = []
        self.updates: list[tuple[float, str]] = []
        self.times: list[float] = []
        self.clock: FakeClock | None = None

    def create(self, percent: float, description: str) -> str:
        self.created.append((percent, description))
        return "artefact-id"

    def update(self, handle, percent: float, description: str) -> None:
        assert handle == "artefact-id"
        self.updates.append((percent, description))
        if self.clock is not None:
            self.times.append(self.clock())


class BrokenSink:
    def create(self, percent, description):
        raise ConnectionError("API away")

    def update(self, handle, percent, description):
        raise ConnectionError("API away")


def counts(updates: list[tuple[float, str]]) -> list[int]:
    return [int(re.search(r": (\d+)/", d).group(1)) for _, d in updates]


def test_duration():
    assert [duration(s) for s in (0.4, 42, 185, 3725)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_train_progress_counts_steps_and_estimates_the_time_left(tmp_path):
    import tasks.stages as stages
    from plasticity.config import StorageConfig
    from plasticity.storage import Storage

    sink, clock = FakeSink(), FakeClock(1000.0)
    updates = sink.updates
    storage = Storage.from_config(StorageConfig(uri=f"file://{tmp_path}"))
    p = stages.TrainProgress(storage, "r1", 100, sink=sink, clock=clock)
    assert sink.created == [(0.0, "Fine-tuning of run r1: step 0/100")]
    clock.t += 5  # the actor starts up
    p.rows([{"step": 1, "step_time_s": 0.5}, {"step": 2, "step_time_s": 0.5}])
    p.tick()
    assert updates[-1] == (2.0, "Fine-tuning of run r1: step 2/100, about 49 s left")
    clock.t += 10
    p.rows([{"step": 12, "step_time_s": 0.4}])
    p.tick()
    # 10 steps in 10 s since the first rows: 88 s for the 88 steps left
    assert updates[-1] == (12.0, "Fine-tuning of run r1: step 12/100, about 1 min 28 s left")
    clock.t += 1
    p.rows([{"step": 13, "step_time_s": 0.4}])
    p.tick()  # within PROGRESS_POLL_S of the last update: not sent
    assert len(updates) == 2
    clock.t += PROGRESS_POLL_S
    p.tick()
    assert updates[-1][0] == 13.0 and len(updates) == 3
    clock.t += PROGRESS_POLL_S
    p.tick()  # no new step: not sent again
    assert len(updates) == 3
    p.done()
    assert updates[-1] == (100.0, "Fine-tuning of run r1: step 100/100")


def test_progress_never_goes_back_and_estimates_from_its_first_advance():
    sink, clock = FakeSink(), FakeClock()
    p = Progress(sink, "Work", 10, count=count_text("items"), clock=clock)
    assert sink.created == [(0.0, "Work: 0/10 items")]
    clock.t = 3.0
    p.advance(2)  # the first report: no rate yet, no hint
    assert p.tick() and sink.updates[-1] == (20.0, "Work: 2/10 items")
    clock.t = 7.0
    p.advance(4)  # 2 items in 4 s since the first report: 12 s for the 6 left
    p.advance(3)  # late and lower: ignored
    assert p.tick() and sink.updates[-1] == (40.0, "Work: 4/10 items, about 12 s left")
    p.advance(11)  # beyond the total: capped
    assert p.done == 10 and p.left_s() is None


def test_a_sink_that_fails_never_fails_the_caller():
    clock = FakeClock()
    p = UnitProgress(BrokenSink(), "Extraction of run r", ["step=0", "step=5"], "checkpoints",
                     clock=clock)
    p.start("step=0")
    clock.t = 5
    p.part("step=0", 0.5)
    assert p.tick() is False
    p.finish()
    assert p.units_done() == 2


def test_units_of_a_stage_run_at_once_are_counted_with_the_time_left():
    """Two of six targets committed by an earlier attempt, two running at once on two
    workers reporting their forward passes, then the rest; the artefact updates often,
    never more than once per PROGRESS_POLL_S, with monotone counts and a right estimate."""
    import tasks.stages as stages

    sink, clock = FakeSink(), FakeClock(100.0)
    sink.clock = clock
    p = stages.open_stage_progress("r1", "plasticity", [0, 2, 4, 6, 8, 10], sink=sink, clock=clock)
    key = lambda step: stages.unit_key("plasticity", step)  # noqa: E731
    assert stages._OPEN_PROGRESS[("r1", "plasticity")] is p
    assert sink.created == [(0.0, "Plasticity grid of run r1: 0/6 target checkpoints")]

    # Committed before: done at once, not in the rate (no estimate from them).
    for step in (0, 2):
        p.finish_unit(key(step))
    p.tick()  # within PROGRESS_POLL_S of the artefact's creation
    assert sink.updates == []
    p.start(key(4))
    p.start(key(6))
    rows_4 = stages.batch_fractions(p, key(4))
    rows_6 = stages.batch_fractions(p, key(6))
    clock.t = 110.0
    rows_4([{"done": 16, "total": 64}, {"done": 32, "total": 64}])  # half of target 4
    p.tick()
    # 0.5 unit in 10 s: 20 s a unit, 3.5 units left
    assert sink.updates[-1] == (pytest.approx(250 / 6), "Plasticity grid of run r1: 2/6 target "
                                "checkpoints, about 1 min 10 s left")
    clock.t = 111.0
    rows_6([{"done": 32, "total": 64}])
    p.tick()  # 1 s after the last update: held back
    assert len(sink.updates) == 1
    clock.t = 112.0
    p.tick()  # one unit in 12 s, three left
    assert sink.updates[-1] == (50.0, "Plasticity grid of run r1: 2/6 target checkpoints, "
                                "about 36 s left")
    # Every pass of target 4 done: not counted done until its task has written it.
    rows_4([{"done": 64, "total": 64}])
    rows_4([{"done": 10, "total": 64}])  # a resubmitted call starts again: never goes back
    assert p.units_done() == 2 and p.done == pytest.approx(2 + 0.99 + 0.5)
    clock.t = 120.0
    p.finish_unit(key(4))  # the task committed it
    p.tick()
    # 1.5 units in 20 s: 13.3 s a unit, 2.5 units left
    assert sink.updates[-1] == (pytest.approx(350 / 6), "Plasticity grid of run r1: 3/6 target "
                                "checkpoints, about 33 s left")
    clock.t = 121.0
    p.tick()  # nothing moved: not sent
    n = len(sink.updates)
    for step, t in ((6, 130.0), (8, 140.0), (10, 150.0)):
        clock.t = t
        p.finish_unit(key(step))
        p.finish_unit(key(step))  # the task and the flow both say so: counted once
        p.tick()
    assert len(sink.updates) == n + 3 and p.units_done() == 6
    p.finish()
    assert sink.updates[-1] == (100.0, "Plasticity grid of run r1: 6/6 target checkpoints")

    # Updated more than once before the end, counts and percent never going back, at most
    # once per PROGRESS_POLL_S but the last.
    assert len(sink.updates) >= 5
    assert counts(sink.updates) == sorted(counts(sink.updates))
    assert [u for u, _ in sink.updates] == sorted(u for u, _ in sink.updates)
    gaps = [b - a for a, b in zip(sink.times[:-1], sink.times[1:-1], strict=False)]
    assert all(g >= PROGRESS_POLL_S for g in gaps)
    stages.close_stage_progress("r1")
    assert ("r1", "plasticity") not in stages._OPEN_PROGRESS


def test_tasks_in_threads_report_to_one_artefact():
    import tasks.stages as stages

    sink, clock = FakeSink(), FakeClock()
    steps = list(range(8))
    p = stages.open_stage_progress("r2", "extract", steps, sink=sink, clock=clock)

    def unit(step: int) -> None:
        key = stages.unit_key("extract", step)
        p.start(key)
        on_rows = stages.batch_fractions(p, key)
        for done in range(1, 101):
            on_rows([{"done": done, "total": 100}])
            clock.t += 0.01
            p.tick()
        p.finish_unit(key)
        p.tick()

    threads = [threading.Thread(target=unit, args=(s,)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.units_done() == 8 and p.done == 8
    assert counts(sink.updates) == sorted(counts(sink.updates))
    stages.close_stage_progress("r2")


def test_train_progress_publishes_the_loss_table_rate_limited(tmp_path):
    import tasks.stages as stages
    from plasticity.config import StorageConfig
    from plasticity.storage import Storage

    tables, clock = [], FakeClock(1000.0)
    storage = Storage.from_config(StorageConfig(uri=f"file://{tmp_path}"))
    p = stages.TrainProgress(storage, "r1", 30, sink=FakeSink(), clock=clock,
                             loss_sink=lambda rows: tables.append(list(rows)))
    p.tick()
    assert tables == []  # no rows yet: nothing to show
    p.rows([{"step": 1, "loss": 4.0, "lr": 1e-4, "grad_norm": 2.0, "tokens_seen": 128,
             "step_time_s": 0.5, "epoch": 0, "optimizer": "adamw4bit"}])
    p.tick()
    assert tables == [[{"step": 1, "loss": 4.0, "lr": 1e-4, "grad_norm": 2.0,
                        "tokens_seen": 128, "step_time_s": 0.5}]]
    for step in range(2, 6):
        clock.t += 1
        p.rows([{"step": step, "loss": 4.0 - step / 10}])
        p.tick()
    assert len(tables) == 1  # within LOSS_TABLE_S of the first table
    clock.t += stages.LOSS_TABLE_S
    p.tick()
    assert len(tables) == 2 and [r["step"] for r in tables[-1]] == [1, 2, 3, 4, 5]
    assert tables[-1][-1]["loss"] == 3.5
    clock.t += 1
    p.rows([{"step": 6, "loss": 3.3}])
    p.done()  # the last rows go out at the end, whatever the time
    assert len(tables) == 3 and tables[-1][-1] == {**dict.fromkeys(stages.LOSS_COLUMNS),
                                                   "step": 6, "loss": 3.3}
    p.done()
    assert len(tables) == 3  # nothing new: not sent again


def test_a_failing_loss_table_never_fails_the_stage(tmp_path):
    import tasks.stages as stages
    from plasticity.config import StorageConfig
    from plasticity.storage import Storage

    def broken(rows):
        raise RuntimeError("API down")

    storage = Storage.from_config(StorageConfig(uri=f"file://{tmp_path}"))
    p = stages.TrainProgress(storage, "r1", 3, sink=FakeSink(), clock=FakeClock(), loss_sink=broken)
    p.rows([{"step": 1, "loss": 1.0}])
    p.publish_loss(force=True)  # logged at debug level, not raised
