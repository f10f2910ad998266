"""Progress artefacts: a count of units done, the percent, and an estimate of the time left.

`Progress` holds the count and the estimate and sends them to a sink (a Prefect progress
artefact in a run, anything with `create`/`update` in tests) at most once every
`min_interval_s`, and only when the count moved; its clock is injectable. `UnitProgress`
counts the units of one stage (checkpoints, targets) that several tasks run at once, each
done or partly done. Nothing here imports Ray; Prefect only in `PrefectProgressSink`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

# At most one artefact update every this many seconds (the last one is always sent).
PROGRESS_POLL_S = 2.0


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressSink(Protocol):
    def create(self, percent: float, description: str) -> Any: ...

    def update(self, handle: Any, percent: float, description: str) -> None: ...


class PrefectProgressSink:
    """A Prefect progress artefact under `key`, linked to the current flow or task run."""

    def __init__(self, key: str):
        self.key = key

    def create(self, percent: float, description: str) -> Any:
        from prefect.artifacts import create_progress_artifact

        return create_progress_artifact(progress=percent, key=self.key, description=description)

    def update(self, handle: Any, percent: float, description: str) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(handle, percent, description)


def count_text(unit: str) -> Callable[[float, int], str]:
    """`3/6 checkpoints`: the units fully done of the total."""
    return lambda done, total: f"{math.floor(done)}/{total} {unit}"


class Progress:
    """`done` of `total` units, shown as `<title>: <count>, about <time> left`.

    The estimate counts from the first `advance` (or `begin`), past the units it reported:
    the time since, over the units done since, times the units left; before any unit is done since, `hint_s` (a
    unit's time, if the caller knows one) times the units left, else no estimate. `tick`
    sends what changed, at most once every `min_interval_s`; `finish` sends the end at
    once. A sink that fails never fails the caller (it is logged at debug level)."""

    def __init__(self, sink: ProgressSink, title: str, total: int, done: float = 0.0,
                 count: Callable[[float, int], str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 min_interval_s: float = PROGRESS_POLL_S):
        self.sink, self.title, self.total = sink, title, max(0, int(total))
        self.count = count or count_text("units")
        self.clock, self.min_interval_s = clock, min_interval_s
        self.done = min(float(done), float(self.total))
        self.hint_s: float | None = None
        self._origin: tuple[float, float] | None = None  # (time, done) the rate counts from
        self._lock = threading.RLock()
        self._sent = self.done
        self._at = clock()
        self.handle = None
        try:
            self.handle = sink.create(self.percent(), self.describe())
        except Exception as exc:
            log.debug("progress artefact not created: %s", exc)

    def units_done(self) -> float:
        """What the count shows as done."""
        return self.done

    def percent(self) -> float:
        return 100.0 if self.total == 0 else 100.0 * self.done / self.total

    def begin(self) -> None:
        """Count the rate from now (if it is not counted yet)."""
        with self._lock:
            if self._origin is None:
                self._origin = (self.clock(), self.done)

    def advance(self, done: float, hint_s: float | None = None) -> None:
        """`done` units are done (the count never goes back); `hint_s`: a unit's time."""
        with self._lock:
            self.done = max(self.done, min(float(done), float(self.total)))
            self.begin()  # the first units seen include the start-up: the rate counts past them
            if hint_s:
                self.hint_s = hint_s

    def left_s(self) -> float | None:
        with self._lock:
            if self._origin is None or self.done >= self.total:
                return None
            t0, d0 = self._origin
            since = self.done - d0
            per_unit = (self.clock() - t0) / since if since > 1e-9 else self.hint_s
            return None if per_unit is None else per_unit * (self.total - self.done)

    def describe(self) -> str:
        left = self.left_s()
        text = f"{self.title}: {self.count(self.units_done(), self.total)}"
        return text + (f", about {duration(left)} left" if left is not None else "")

    def tick(self) -> bool:
        """Send the count if it moved and the last send is `min_interval_s` old."""
        with self._lock:
            if self.done == self._sent or self.clock() - self._at < self.min_interval_s:
                return False
            return self._send()

    def finish(self) -> None:
        """All units done: sent at once."""
        with self._lock:
            self.done = float(self.total)
            self._send()

    def _send(self) -> bool:
        self._at = self.clock()
        self._sent = self.done
        if self.handle is None:
            return False
        try:
            self.sink.update(self.handle, self.percent(), self.describe())
            return True
        except Exception as exc:  # a progress display never fails the stage
            log.debug("progress not updated: %s", exc)
            return False


# The most a unit's reported passes count for before its task has finished it (its
# results are still to be written).
PART_MAX = 0.99


class UnitProgress(Progress):
    """The units of one stage (keyed: `step=10`, `target=10`), run by several tasks at once.

    `start(key)` when a task starts its unit (the rate counts from the first start),
    `part(key, fraction)` as the unit's actor reports its batches, `finish_unit(key)` when
    it is done. A unit finished without having been started here (committed by an earlier
    attempt, or a cached task run) counts as done but not in the rate. Safe across threads.
    """

    def __init__(self, sink: ProgressSink, title: str, keys: list[str], unit: str, **kw):
        kw.setdefault("count", count_text(unit))
        self.keys = list(keys)
        self._fraction: dict[str, float] = {}
        self._started: set[str] = set()
        self._skipped = 0.0
        super().__init__(sink, title, len(keys), **kw)

    def start(self, key: str) -> None:
        with self._lock:
            if self._origin is None:
                self._origin = (self.clock(), self.done - self._skipped)
            self._started.add(key)

    def part(self, key: str, fraction: float) -> None:
        with self._lock:
            if key not in self._started:
                self.start(key)
            # a unit counts as done when its task says so, not when its passes are
            f = max(self._fraction.get(key, 0.0), min(PART_MAX, max(0.0, float(fraction))))
            self._fraction[key] = f
            self._update()

    def finish_unit(self, key: str) -> None:
        with self._lock:
            if self._fraction.get(key) == 1.0:
                return
            if key not in self._started:
                self._skipped += 1.0 - self._fraction.get(key, 0.0)
            self._fraction[key] = 1.0
            self._update()

    def units_done(self) -> int:
        return sum(1 for f in self._fraction.values() if f == 1.0)

    def finish(self) -> None:
        with self._lock:
            for key in self.keys:
                self._fraction[key] = 1.0
            super().finish()

    def _update(self) -> None:
        self.done = min(float(self.total), sum(self._fraction.values()))

    def left_s(self) -> float | None:
        with self._lock:
            if self._origin is None or self.done >= self.total:
                return None
            t0, d0 = self._origin
            since = self.done - self._skipped - d0
            if since <= 1e-9:
                return None
            return (self.clock() - t0) / since * (self.total - self.done)
