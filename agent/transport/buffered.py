"""The buffered sink: the training thread appends to a bounded buffer; a background thread
resolves, batches, numbers and writes.

Threads:

- the **training thread** calls :meth:`BufferedSink.put`: one lock-protected append to a
  bounded deque, O(1), no I/O, never blocks on anything but that lock (held only for O(1) by
  either side), never raises;
- the **drainer** (one daemon thread per sink) wakes every ``flush_interval`` seconds, or as soon
  as ``batch_max_steps`` items wait, swaps the buffer out, resolves :class:`Pending` device copies
  (the only place that may wait on a device), cuts the records into :class:`Batch` es of at most
  ``batch_max_steps`` steps, numbers them (``seq``) and appends each, encoded, to an append-only
  JSON-lines log (:mod:`.spool`). Subclasses decide what happens next (the file sink: nothing;
  the network sink: its sender thread streams the log to the server).

Memory bound: the buffer holds at most ``buffer_max`` items. The drainer empties it every
``flush_interval`` whatever the network does (writing to local disk is the only I/O it waits
on), so the buffer only fills when the drainer itself is wedged (a device copy that never
completes, a stalled disk). Then the *oldest* item is dropped and counted: training never waits,
memory stays bounded, and what survives is the most recent history, which is what shows how a run
went wrong. Dropped counts are reported by :meth:`stats`, once as a warning, and at close.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._warn import warn
from ..wire import Batch, Event, LayerInfo, RunInfo, ScalarRecord, StepRecord, encode_batch
from .base import Item, LayerTable, Sink
from .spool import Segment, SegmentWriter

__all__ = ["BufferedSink", "TransportWarning", "WarnOnce", "DEFAULTS"]

logger = logging.getLogger("gradwatch.agent.transport")

#: Defaults of the options ``watch(...)`` passes through ``make_sink``.
DEFAULTS: dict[str, Any] = {
    "flush_interval": 0.2,
    "batch_max_steps": 64,
    "batch_max_rows": 50_000,
    "buffer_max": 10_000,
    "close_timeout": 10.0,
}


class TransportWarning(RuntimeWarning):
    """Monitoring data could not be delivered as asked (the run itself is unaffected)."""


class WarnOnce:
    """Emit each kind of warning once per sink, through :mod:`warnings` (and the debug log)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str) -> bool:
        with self._lock:
            if kind in self._seen:
                logger.debug("%s (repeated)", message)
                return False
            self._seen.add(kind)
        logger.debug(message)
        try:
            warn(message, TransportWarning)
        except Exception:  # a warnings filter set to "error" must not kill the sender thread
            logger.warning(message)
        return True

    @property
    def seen(self) -> set[str]:
        return set(self._seen)


def _say(line: str) -> None:
    """The agent's end-of-run line (STYLE §3 allows this one print)."""
    try:
        sys.stderr.write(line.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:
        logger.warning(line)


# every live sink, so interpreter exit can close the ones never closed
_LIVE: weakref.WeakSet[BufferedSink] = weakref.WeakSet()
_ATEXIT = False


def _close_all_at_exit() -> None:
    crashed = hasattr(sys, "last_value") or hasattr(sys, "last_exc")
    for s in list(_LIVE):
        try:
            s.close(status="crashed" if crashed else "finished")
        except Exception:  # pragma: no cover - exit must go on
            pass


class BufferedSink(Sink):
    """Base of the file and network sinks (see the module docstring for the threads)."""

    #: label of this sink in messages
    kind = "buffered"

    def __init__(self, run: RunInfo, layers: LayerTable | None = None, *, rank: int = 0,
                 flush_interval: float = DEFAULTS["flush_interval"],
                 batch_max_steps: int = DEFAULTS["batch_max_steps"],
                 batch_max_rows: int = DEFAULTS["batch_max_rows"],
                 buffer_max: int = DEFAULTS["buffer_max"],
                 close_timeout: float = DEFAULTS["close_timeout"],
                 send_status: bool | None = None) -> None:
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0, got {flush_interval}")
        if batch_max_steps < 1 or buffer_max < 1 or batch_max_rows < 1:
            raise ValueError("batch_max_steps, batch_max_rows and buffer_max must be >= 1")
        self.run = run
        self.rank = rank
        self.source = rank
        self._layers: LayerTable = layers or (lambda: [])
        self.flush_interval = float(flush_interval)
        self.batch_max_steps = int(batch_max_steps)
        self.batch_max_rows = int(batch_max_rows)
        self.buffer_max = int(buffer_max)
        self.close_timeout = float(close_timeout)
        # Only rank 0 says how the run ended (a rank finishing early must not end the run).
        self.send_status = (rank == 0) if send_status is None else bool(send_status)
        self.warn = WarnOnce()

        self._lock = threading.Lock()
        self._q: deque[Item] = deque()
        self._wake = threading.Event()
        self._wake_at = self.batch_max_steps
        self._n_put = 0  # items accepted by put (dropped ones included)
        self._n_done = 0  # items taken off the buffer and written (or dropped)
        self._n_dropped = 0
        self._n_records = 0  # records written to the log
        self._n_failed = 0  # items whose resolve() or encoding failed
        self._lost: dict[str, int] = {}  # records lost after they were batched, by reason (ENOSPC, ...)
        self._seq = 0  # last seq written
        self._items_done = 0  # items of the current _process call marked done
        self._done_cv = threading.Condition()
        self._closing = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._final_status: str | None = None
        self._drainer_done = threading.Event()
        self._started = False
        self._sync_requested = False
        self.writer: SegmentWriter | None = None

    # ------------------------------------------------------------------ training thread

    def put(self, item: Item) -> None:
        try:
            with self._lock:
                if self._closed:
                    self._n_dropped += 1
                    return
                q = self._q
                if len(q) >= self.buffer_max:
                    q.popleft()
                    self._n_dropped += 1
                    self._n_done += 1
                    full = True
                else:
                    full = False
                q.append(item)
                self._n_put += 1
                n = len(q)
            if n >= self._wake_at:
                self._wake.set()
            if full and self._n_dropped == 1:
                # Warned from the training thread only once (no I/O besides the warning itself).
                self.warn("dropped", f"gradwatch: the monitoring buffer is full ({self.buffer_max} items) because "
                                     f"the {self.kind} sink's writer is stalled; dropping the oldest records "
                                     f"(see Watcher.stats()['dropped']). Training is not affected.")
        except Exception:  # pragma: no cover - put must never raise
            pass

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BufferedSink:
        """Start the background thread(s); called by :func:`make_sink`."""
        global _ATEXIT
        if self._started:
            return self
        self._started = True
        _LIVE.add(self)
        if not _ATEXIT:
            atexit.register(_close_all_at_exit)
            _ATEXIT = True
        self._drainer = threading.Thread(target=self._drain_main, name=f"gradwatch-{self.kind}-drainer",
                                         daemon=True)
        self._drainer.start()
        return self

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything put so far is written (and fsynced); subclasses also wait for
        delivery. Returns False when ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._wait_written(deadline) and self._wait_delivered(deadline)

    def _wait_written(self, deadline: float | None) -> bool:
        with self._lock:
            target = self._n_put
        self._sync_requested = True
        self._wake.set()
        with self._done_cv:
            while self._n_done < target or self._sync_requested:
                if self._drainer_done.is_set() or not self._started:
                    return self._n_done >= target
                if self._n_done < target:
                    self._sync_requested = True  # sync again after the last of them is written
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._done_cv.wait(0.05 if left is None else min(left, 0.05))
                self._wake.set()
        return True

    def _wait_delivered(self, deadline: float | None) -> bool:
        return True

    def close(self, timeout: float | None = None, status: str = "finished") -> None:
        with self._close_lock:
            if self._closed:
                return
            timeout = self.close_timeout if timeout is None else timeout
            deadline = time.monotonic() + max(0.0, timeout)
            self._final_status = status
            with self._lock:
                self._closing = True
            self._wake.set()
            try:
                if self._started:
                    self._drainer.join(max(0.0, deadline - time.monotonic()))
                with self._lock:
                    self._closed = True
                    lost = len(self._q)
                self._finish(deadline, lost_in_memory=lost if self._drainer.is_alive() else 0)
            except Exception as e:  # close must not raise into user code either
                logger.debug("close failed: %r", e)
                self._closed = True
            _LIVE.discard(self)

    def _finish(self, deadline: float, lost_in_memory: int) -> None:
        """Subclass hook: deliver what is left until ``deadline`` and print the one line."""

    def __enter__(self) -> BufferedSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(status="crashed" if exc[0] is not None else "finished")

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"sent": 0, "spooled": self._n_records, "dropped": self._n_dropped, "rejected": 0,
                    "lost": sum(self._lost.values()), "pending": max(0, self._n_put - self._n_done),
                    "failed": self._n_failed, "batches": self._seq, "acked": 0, "reconnects": 0}

    def lost_reasons(self) -> dict[str, int]:
        """Records lost after they were batched, by reason (``ENOSPC``: the disk was full...)."""
        with self._lock:
            return dict(self._lost)

    def loss_accounting(self) -> dict[str, int]:
        """What the end-of-run record tells the server this source lost, by reason: records the
        spool could not take (:meth:`lost_reasons`) and items dropped from a full buffer
        (``buffer_full``)."""
        with self._lock:
            out = dict(self._lost)
            if self._n_dropped:
                out["buffer_full"] = out.get("buffer_full", 0) + self._n_dropped
        return out

    def _count_lost(self, n: int, reason: str) -> None:
        if n:
            with self._lock:
                self._lost[reason] = self._lost.get(reason, 0) + n

    # ------------------------------------------------------------------ drainer thread

    def _open_writer(self) -> tuple[SegmentWriter, int]:
        """Subclass hook, on the drainer thread: the writer and the last seq already used."""
        raise NotImplementedError

    def _on_written(self, seq: int, seg: Segment, off: int, length: int, records: int, raw: bytes) -> None:
        """Subclass hook: one batch reached the log."""

    def _drain_main(self) -> None:
        try:
            self.writer, self._seq = self._open_writer()
        except Exception as e:
            self.warn("writer", f"gradwatch: cannot open the {self.kind} sink's output ({e}); monitoring data "
                                f"of run {self.run.run_id} will be dropped. Training is not affected.")
            self.writer = None
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                with self._lock:
                    items, self._q = self._q, deque()
                    closing = self._closing
                if items:
                    try:
                        self._process(items)
                    except Exception as e:  # a bug in one batch must not end monitoring for the run
                        self.warn("drainer", f"gradwatch: the {self.kind} sink could not write a batch ({e!r}); "
                                             "its records are skipped. Training is not affected.")
                if self._sync_requested:
                    self._sync_requested = False
                    self._sync()
                    with self._done_cv:
                        self._done_cv.notify_all()
                if closing:
                    with self._lock:
                        more = bool(self._q)
                    if more:
                        continue
                    # the end-of-run record, with what this source lost (every rank reports its
                    # losses; only rank 0 says how the run ended); a sink that recorded nothing
                    # sends nothing (so a sink replaced at resume does not create an empty run)
                    status = self._final_status if self.send_status else None
                    lost = self.loss_accounting()
                    if (status or lost) and self.writer is not None and self._n_records:
                        self._write_batch([], [], [], status=status, lost=lost or None)
                    self._sync()
                    break
        except Exception as e:  # pragma: no cover - never let the thread die silently
            self.warn("drainer", f"gradwatch: the {self.kind} sink's writer failed ({e!r}); monitoring stopped. "
                                 "Training is not affected.")
        finally:
            try:
                if self.writer is not None:
                    self.writer.close()
            except Exception:
                pass
            self._drainer_done.set()
            with self._done_cv:
                self._done_cv.notify_all()

    def _sync(self) -> None:
        if self.writer is not None:
            self.writer.sync()

    def _process(self, items: deque[Item]) -> None:
        self._items_done = 0
        try:
            self._process_items(items)
        finally:
            self._mark_done(len(items) - self._items_done)  # whatever an exception left unaccounted

    def _process_items(self, items: deque[Item]) -> None:
        """Batch and write ``items`` (``_items_done`` counts those marked done)."""
        steps: list[StepRecord] = []
        scalars: list[ScalarRecord] = []
        events: list[Event] = []
        rows = 0
        taken = 0
        for it in items:
            taken += 1
            if isinstance(it, (StepRecord, ScalarRecord, Event)):
                recs: list[Any] = [it]
            else:
                try:
                    recs = list(it.resolve())
                except Exception as e:
                    self._n_failed += 1
                    self.warn("resolve", f"gradwatch: could not read a step's statistics back ({e!r}); "
                                         "that step is skipped.")
                    recs = []
            for r in recs:
                if isinstance(r, StepRecord):
                    steps.append(r)
                    rows += len(r.layer_ids)
                elif isinstance(r, ScalarRecord):
                    scalars.append(r)
                elif isinstance(r, Event):
                    events.append(r)
            if (len(steps) >= self.batch_max_steps or rows >= self.batch_max_rows
                    or len(scalars) + len(events) >= 4 * self.batch_max_steps):
                self._write_batch(steps, scalars, events)
                self._mark_done(taken)
                self._items_done += taken
                steps, scalars, events, rows, taken = [], [], [], 0, 0
        if steps or scalars or events:
            self._write_batch(steps, scalars, events)
        self._mark_done(taken)
        self._items_done += taken

    def _mark_done(self, n: int) -> None:
        if n:
            with self._lock:
                self._n_done += n
            with self._done_cv:
                self._done_cv.notify_all()

    def _layer_table(self) -> list[LayerInfo]:
        try:
            return list(self._layers())
        except Exception:
            return []

    def _write_batch(self, steps: list[StepRecord], scalars: list[ScalarRecord], events: list[Event],
                     status: str | None = None, lost: dict[str, int] | None = None) -> None:
        if self.writer is None:
            with self._lock:
                self._n_dropped += len(steps) + len(scalars) + len(events)
            return
        seq = self._seq + 1
        b = Batch(run=self.run, seq=seq, source=self.source, sent_at=time.time(), layers=self._layer_table(),
                  steps=steps, scalars=scalars, events=events, status=status, lost=lost)
        try:
            raw = encode_batch(b)
        except Exception as e:
            self._n_failed += 1
            self.warn("encode", f"gradwatch: could not encode a batch ({e!r}); its records are skipped.")
            return
        self._seq = seq
        n = len(steps) + len(scalars) + len(events)
        with self._lock:
            self._n_records += n
        self._append(seq, raw, n)

    def _append(self, seq: int, raw: bytes, n: int) -> None:
        """Write one encoded batch to the log. A write that fails (full disk, read-only or vanished
        directory) loses this batch, counted under its reason; the next batch tries the disk again.
        The network sink overrides this to hold batches in memory instead."""
        assert self.writer is not None
        try:
            seg, off, length = self.writer.append(seq, raw)
        except OSError as e:
            with self._lock:
                self._n_records -= n
            self._count_lost(n, os_reason(e))
            self.warn("disk", f"gradwatch: cannot write monitoring data of run {self.run.run_id} ({e}); "
                              "those records are lost (counted in stats()['lost']); the next batch tries again. "
                              "Training is not affected.")
            return
        self._on_written(seq, seg, off, length, n, raw)


def os_reason(e: OSError) -> str:
    """A short name for why a write failed: the errno's symbol (``ENOSPC``) when there is one."""
    import errno

    return errno.errorcode.get(e.errno or 0, type(e).__name__)


def _path_str(p: Path | str) -> str:
    s = str(p)
    return f'"{s}"' if " " in s else s


def upload_hint(path: Path | str) -> str:
    return f"gradwatch upload {_path_str(path)}"


Callback = Callable[[], None]
