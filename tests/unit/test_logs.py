"""The actors' log buffer (tasks.logs) and the task side that re-emits its records; no Ray."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from tasks.logs import (
    BufferHandler,
    CallLogs,
    Drained,
    LogEntry,
    RunLogSink,
    record_failure,
    to_log_record,
)


@pytest.fixture
def logger():
    """A logger of its own whose records go to a fresh buffer only."""
    buffer = CallLogs(max_records=1000)
    log = logging.getLogger(f"test.logs.{id(buffer)}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = BufferHandler(buffer)
    log.addHandler(handler)
    yield log, buffer
    log.removeHandler(handler)


def messages(drained: Drained) -> list[str]:
    return [e.message for e in drained.records]


def test_records_are_kept_per_call_and_drained_once_in_order(logger):
    log, buffer = logger
    log.info("before any call")  # no call running: nothing kept
    with buffer.running("a"):
        log.info("a %d", 1)
        log.warning("a %d", 2)
    with buffer.running("b"):
        log.info("b 1")
    log.info("after the calls")
    assert len(buffer) == 3
    a = buffer.drain("a")
    assert messages(a) == ["a 1", "a 2"]
    assert [e.level for e in a.records] == [logging.INFO, logging.WARNING]
    assert [e.name for e in a.records] == [log.name, log.name]
    assert a.records[0].seq < a.records[1].seq and a.dropped == 0
    assert buffer.drain("a") == Drained()  # drained once
    assert messages(buffer.drain("b")) == ["b 1"]
    assert len(buffer) == 0
    assert buffer.drain("never") == Drained()


def test_running_restores_the_previous_call_and_none_keeps_nothing(logger):
    log, buffer = logger
    with buffer.running("outer"):
        with buffer.running(None):
            log.info("forwarding off for this call")
        log.info("outer again")
        with pytest.raises(RuntimeError), buffer.running("inner"):
            log.info("inner")
            raise RuntimeError("boom")
        log.info("outer after the failure")
    assert buffer.current is None
    assert messages(buffer.drain("outer")) == ["outer again", "outer after the failure"]
    assert messages(buffer.drain("inner")) == ["inner"]


def test_the_bound_evicts_the_oldest_record_of_any_call_and_counts_it():
    buffer = CallLogs(max_records=3)
    buffer.add(1.0, logging.INFO, "x", "old a", call_id="a")
    buffer.add(2.0, logging.INFO, "x", "b1", call_id="b")
    buffer.add(3.0, logging.INFO, "x", "a2", call_id="a")
    buffer.add(4.0, logging.INFO, "x", "b2", call_id="b")  # evicts "old a"
    buffer.add(5.0, logging.INFO, "x", "b3", call_id="b")  # evicts "b1"
    assert len(buffer) == 3
    a, b = buffer.drain("a"), buffer.drain("b")
    assert (messages(a), a.dropped) == (["a2"], 1)
    assert (messages(b), b.dropped) == (["b2", "b3"], 1)
    assert len(buffer) == 0
    # The count is reported once, then starts again.
    buffer.add(6.0, logging.INFO, "x", "a3", call_id="a")
    assert buffer.drain("a").dropped == 0


def test_a_call_that_floods_the_buffer_keeps_its_newest_records():
    buffer = CallLogs(max_records=10)
    for i in range(1000):
        buffer.add(float(i), logging.INFO, "x", f"line {i}", call_id="flood")
    out = buffer.drain("flood")
    assert messages(out) == [f"line {i}" for i in range(990, 1000)]
    assert out.dropped == 990


def test_a_long_message_is_cut():
    buffer = CallLogs(max_chars=100)
    buffer.add(0.0, logging.INFO, "x", "y" * 250, call_id="c")
    (entry,) = buffer.drain("c").records
    assert entry.message.startswith("y" * 100 + "\n... (150 characters cut)")


def test_metrics_rows_are_kept_per_call_bounded_to_the_newest():
    buffer = CallLogs(max_metrics=3)
    buffer.add_metric({"step": 0})  # no call: dropped
    with buffer.running("train"):
        for step in range(1, 6):
            row = {"step": step}
            buffer.add_metric(row)
            row["step"] = -1  # the buffer keeps a copy
    buffer.add_metric({"step": 9}, call_id="other")
    out = buffer.drain("train")
    assert out.metrics == [{"step": 3}, {"step": 4}, {"step": 5}]
    assert out.records == []
    assert buffer.drain("train").metrics == []
    assert buffer.drain("other").metrics == [{"step": 9}]


def test_records_from_threads_the_stage_starts_are_tagged_with_its_call(logger):
    log, buffer = logger

    def work(k: int) -> None:
        for i in range(50):
            log.info("thread %d line %d", k, i)

    with buffer.running("stage"):
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out = buffer.drain("stage")
    assert len(out.records) == 200 and out.dropped == 0
    assert [e.seq for e in out.records] == sorted(e.seq for e in out.records)
    for k in range(4):  # each thread's lines in its own order
        mine = [m for m in messages(out) if m.startswith(f"thread {k} ")]
        assert mine == [f"thread {k} line {i}" for i in range(50)]


def test_draining_while_another_thread_logs_loses_nothing():
    buffer = CallLogs(max_records=100_000)
    done = threading.Event()

    def produce() -> None:
        for i in range(5000):
            buffer.add(float(i), logging.INFO, "x", str(i), call_id="c")
        done.set()

    got: list[str] = []
    t = threading.Thread(target=produce)
    t.start()
    while not done.is_set():
        got += messages(buffer.drain("c"))
    t.join()
    got += messages(buffer.drain("c"))
    assert got == [str(i) for i in range(5000)]


def test_a_failure_is_recorded_with_its_traceback():
    buffer = CallLogs()

    def stage() -> None:
        raise ValueError("corpus.jsonl:1: not a JSON line")

    with buffer.running("f"):
        try:
            stage()
        except ValueError as exc:
            record_failure(buffer, "finetune", exc)
    (entry,) = buffer.drain("f").records
    assert entry.level == logging.ERROR and entry.name == "tasks.actors"
    assert entry.message.startswith("finetune failed: ValueError: corpus.jsonl:1: not a JSON line")
    assert "Traceback (most recent call last)" in entry.message
    assert "in stage" in entry.message and 'raise ValueError("corpus.jsonl' in entry.message


def test_a_logged_exception_keeps_its_traceback(logger):
    log, buffer = logger
    with buffer.running("e"):
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.exception("step %d failed", 3)
    (entry,) = buffer.drain("e").records
    assert entry.message.startswith("step 3 failed\nTraceback")
    assert "ZeroDivisionError: division by zero" in entry.message


def test_to_log_record_keeps_time_level_name_and_the_text_as_is():
    created = time.time() - 3600.25
    entry = LogEntry(7, created, logging.WARNING, "plasticity.stages.finetune",
                     "loss 100% of 5 %s %d")
    record = to_log_record(entry, task_run_id="t", flow_run_id="f")
    assert record.created == created
    assert record.msecs == pytest.approx((created % 1) * 1000)
    assert (record.levelno, record.levelname) == (logging.WARNING, "WARNING")
    assert record.name == "plasticity.stages.finetune"
    assert record.getMessage() == "loss 100% of 5 %s %d"  # not %-formatted again
    assert (record.task_run_id, record.flow_run_id) == ("t", "f")
    assert record.exc_info is None


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_sink_sends_records_the_run_logger_level_lets_through_and_says_what_was_dropped():
    sink = RunLogSink.__new__(RunLogSink)  # without a Prefect run context
    sink.extra = {"task_run_id": "t", "flow_run_id": "f"}
    sink.logger = logging.getLogger("test.logs.sink")
    sink.logger.setLevel(logging.INFO)
    sink.handler = _Capture()
    drained = Drained(
        records=[LogEntry(1, 10.0, logging.DEBUG, "a", "debug"),
                 LogEntry(2, 11.0, logging.INFO, "a", "info"),
                 LogEntry(3, 12.0, logging.ERROR, "b", "error")],
        dropped=4,
    )
    assert sink(drained) == 3
    got = sink.handler.records
    assert [r.getMessage() for r in got] == [
        "4 log records of the actor were dropped (its buffer was full)", "info", "error"]
    assert [r.created for r in got] == [10.0, 11.0, 12.0]
    assert [r.name for r in got] == ["tasks.logs", "a", "b"]
    assert all(r.task_run_id == "t" and r.flow_run_id == "f" for r in got)
    assert sink(Drained()) == 0
