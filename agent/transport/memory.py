"""An in-memory sink: records kept in lists, for tests and notebooks."""

from __future__ import annotations

import threading

from ..wire import Event, ScalarRecord, StepRecord
from .base import Item, LayerTable, Pending, Sink

__all__ = ["MemorySink"]


class MemorySink(Sink):
    """Keeps every record in memory. Pending device copies are resolved at :meth:`flush` (and
    when a record list is read), never inside :meth:`put`, so putting stays sync-free."""

    def __init__(self, run, layers: LayerTable | None = None) -> None:
        self.run = run
        self._layers = layers or (lambda: [])
        self._lock = threading.Lock()
        self._pending: list[Pending] = []
        self._steps: list[StepRecord] = []
        self._scalars: list[ScalarRecord] = []
        self._events: list[Event] = []
        self.status: str | None = None
        self.closed = False

    def put(self, item: Item) -> None:
        with self._lock:
            if isinstance(item, StepRecord):
                self._steps.append(item)
            elif isinstance(item, ScalarRecord):
                self._scalars.append(item)
            elif isinstance(item, Event):
                self._events.append(item)
            else:
                self._pending.append(item)

    def flush(self, timeout: float | None = None) -> bool:
        with self._lock:
            pending, self._pending = self._pending, []
        for p in pending:
            for rec in p.resolve():
                self.put(rec)
        return True

    def close(self, timeout: float | None = None, status: str = "finished") -> None:
        self.flush(timeout)
        self.status = status
        self.closed = True

    def stats(self) -> dict[str, int]:
        with self._lock:
            n = len(self._steps) + len(self._scalars) + len(self._events)
            return {"sent": n, "spooled": 0, "dropped": 0, "pending": len(self._pending)}

    @property
    def layers(self):
        return self._layers()

    @property
    def steps(self) -> list[StepRecord]:
        self.flush()
        return list(self._steps)

    @property
    def scalars(self) -> list[ScalarRecord]:
        self.flush()
        return list(self._scalars)

    @property
    def events(self) -> list[Event]:
        self.flush()
        return list(self._events)
