"""The interface between the watcher (training thread) and whatever delivers its records.

The watcher only ever calls :meth:`Sink.put`, which must not block and must not raise. Items are
wire records, or :class:`Pending` objects whose device→host copy may not have finished yet: a
sink resolves them off the training thread (on its sender thread, or at ``flush`` for the
in-memory sink), so a CUDA training stream never waits for monitoring.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol, Union, runtime_checkable

from ..wire import Event, LayerInfo, RunInfo, ScalarRecord, StepRecord

__all__ = ["Pending", "Item", "Sink", "LayerTable"]


@runtime_checkable
class Pending(Protocol):
    """A step whose numbers are still on their way from the device."""

    def resolve(self) -> list[StepRecord | Event]:
        """Wait for the copy (may block on the device) and build the records. Never call this
        on the training thread."""
        ...


Item = Union[StepRecord, ScalarRecord, Event, Pending]  # noqa: UP007 (runtime alias, py3.10)

#: Returns the run's current layer table (the watcher's registry; grows if params are added).
LayerTable = Callable[[], list[LayerInfo]]


class Sink(abc.ABC):
    """Where a watcher's records go. Implementations: memory (tests), file, network."""

    run: RunInfo

    @abc.abstractmethod
    def put(self, item: Item) -> None:
        """Queue one item. Non-blocking; never raises into the training loop."""

    @abc.abstractmethod
    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything put so far; True when all of it was delivered (or durably
        spooled) within ``timeout`` seconds."""

    @abc.abstractmethod
    def close(self, timeout: float | None = None, status: str = "finished") -> None:
        """Flush within ``timeout``, mark the run ``status``, release resources, and say in one
        line where anything undelivered was left. Idempotent."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters: at least ``sent``, ``spooled``, ``dropped``, ``pending``."""
