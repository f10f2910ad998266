"""Stage logs from the Ray actors into the Prefect task run that drives them.

In the actor process a logging handler copies every record into a bounded in-memory
buffer, tagged with the id of the stage call being run; the task drains that buffer
(through an actor method in its own concurrency group, so it runs while the stage is
busy) and re-emits each record to the Prefect API with its level, logger name and
original time. The actor keeps logging to stderr as before; the copy is what reaches
the UI. Nothing here imports Ray, and Prefect only where records are re-emitted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# The most records an actor holds for calls not yet drained (the task drains every
# second or so; the bound only matters when no task drains, e.g. its driver died).
MAX_RECORDS = 10_000
# A record's text beyond this is cut (a traceback fits; a dumped tensor does not).
MAX_MESSAGE_CHARS = 32_000
# Progress rows (train metrics) kept per call between drains; the newest are kept.
MAX_METRICS = 5_000


@dataclass
class LogEntry:
    seq: int
    created: float
    level: int
    name: str
    message: str


@dataclass
class Drained:
    """What a drain returns for one call: its new records in order, the progress rows
    recorded since the last drain, and how many records the bound threw away."""

    records: list[LogEntry] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0


class CallLogs:
    """Records and progress rows per call id, bounded in all; safe across threads."""

    def __init__(self, max_records: int = MAX_RECORDS, max_metrics: int = MAX_METRICS,
                 max_chars: int = MAX_MESSAGE_CHARS):
        self.max_records = max(1, max_records)
        self.max_metrics = max_metrics
        self.max_chars = max_chars
        self._lock = threading.Lock()
        self._records: dict[str, deque[LogEntry]] = {}
        self._metrics: dict[str, deque[dict[str, Any]]] = {}
        self._dropped: dict[str, int] = {}
        self._size = 0
        self._seq = 0
        # Stage calls on one actor run one at a time, so one current id per process is
        # enough, and it also tags records from threads the stage starts (storage I/O).
        self.current: str | None = None

    @contextmanager
    def running(self, call_id: str | None) -> Iterator[None]:
        previous, self.current = self.current, call_id
        try:
            yield
        finally:
            self.current = previous

    def add(self, created: float, level: int, name: str, message: str,
            call_id: str | None = None) -> None:
        call_id = call_id or self.current
        if call_id is None:
            return
        if len(message) > self.max_chars:
            message = message[: self.max_chars] + f"\n... ({len(message) - self.max_chars} characters cut)"
        with self._lock:
            if self._size >= self.max_records:
                self._evict_oldest()
            self._seq += 1
            self._records.setdefault(call_id, deque()).append(
                LogEntry(self._seq, created, level, name, message)
            )
            self._size += 1

    def _evict_oldest(self) -> None:
        owner, oldest = min(((k, q) for k, q in self._records.items() if q),
                            key=lambda kq: kq[1][0].seq)
        oldest.popleft()
        if not oldest:
            del self._records[owner]
        self._size -= 1
        self._dropped[owner] = self._dropped.get(owner, 0) + 1

    def add_metric(self, row: dict[str, Any], call_id: str | None = None) -> None:
        call_id = call_id or self.current
        if call_id is None:
            return
        with self._lock:
            q = self._metrics.get(call_id)
            if q is None:
                q = self._metrics[call_id] = deque(maxlen=self.max_metrics)
            q.append(dict(row))

    def drain(self, call_id: str) -> Drained:
        with self._lock:
            records = list(self._records.pop(call_id, ()))
            self._size -= len(records)
            return Drained(records, list(self._metrics.pop(call_id, ())),
                           self._dropped.pop(call_id, 0))

    def __len__(self) -> int:
        return self._size


class BufferHandler(logging.Handler):
    """Copies records (message with its traceback, if any) into a CallLogs."""

    def __init__(self, buffer: CallLogs):
        super().__init__()
        self.buffer = buffer
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.buffer.current is None:
            return  # forwarding is off for this call, or no call is running
        try:
            self.buffer.add(record.created, record.levelno, record.name, self.format(record))
        except Exception:
            self.handleError(record)


_PROCESS_BUFFER: CallLogs | None = None
_INSTALL_LOCK = threading.Lock()


def install(logger: logging.Logger | None = None) -> CallLogs:
    """The process's buffer, its handler on the root logger added once per process."""
    global _PROCESS_BUFFER
    with _INSTALL_LOCK:
        if _PROCESS_BUFFER is None:
            _PROCESS_BUFFER = CallLogs()
            (logger or logging.getLogger()).addHandler(BufferHandler(_PROCESS_BUFFER))
        return _PROCESS_BUFFER


def record_failure(buffer: CallLogs, what: str, exc: BaseException) -> None:
    """The cause and traceback of a failed call, into the buffer only: the actor's stderr
    and the driver already show the exception, the Prefect task run would not."""
    record = logging.LogRecord(
        "tasks.actors", logging.ERROR, __file__, 0, "%s failed: %s: %s",
        (what, type(exc).__name__, exc), (type(exc), exc, exc.__traceback__),
    )
    message = logging.Formatter("%(message)s").format(record)
    buffer.add(record.created, record.levelno, record.name, message)


# -- the task's side: re-emit drained records to the Prefect API --------------------------


def to_log_record(entry: LogEntry, **extra: Any) -> logging.LogRecord:
    """A LogRecord that carries the actor record's time, level and logger name."""
    record = logging.LogRecord(entry.name, entry.level, "", 0, entry.message, None, None)
    record.created = entry.created
    record.msecs = (entry.created - int(entry.created)) * 1000
    record.__dict__.update(extra)
    return record


class RunLogSink:
    """Sends records to the Prefect API as logs of the current task run.

    Records go straight to Prefect's API handler rather than through the run logger,
    whose console handler would print them a second time in the terminal (Ray already
    forwards the actor's stderr there). Prefect's logging level and its
    PREFECT_LOGGING_TO_API_ENABLED setting apply as for any run log."""

    def __init__(self) -> None:
        from prefect import get_run_logger
        from prefect.context import TaskRunContext
        from prefect.logging.handlers import APILogHandler

        ctx = TaskRunContext.get()
        self.extra = (
            {"task_run_id": ctx.task_run.id, "flow_run_id": ctx.task_run.flow_run_id}
            if ctx is not None and ctx.task_run is not None else {}
        )
        self.logger = get_run_logger()
        self.handler = APILogHandler()

    def __call__(self, drained: Drained) -> int:
        sent = 0
        entries = list(drained.records)
        if drained.dropped:
            first = entries[0].created if entries else time.time()
            entries.insert(0, LogEntry(0, first, logging.WARNING, "tasks.logs",
                                       f"{drained.dropped} log records of the actor were "
                                       "dropped (its buffer was full)"))
        for entry in entries:
            if self.logger.isEnabledFor(entry.level):
                self.handler.handle(to_log_record(entry, **self.extra))
                sent += 1
        return sent
