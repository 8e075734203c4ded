"""Decoding ingest frames, optionally in a worker process.

Parsing and validating a frame is about a fifth of the server's work per layer row. In a thread
it gains nothing: the writer calls into sqlite3/psycopg once per row and takes the GIL back each
time, so the two take turns (measured: the decoder thread's work adds to the writer's). A worker
process decodes beside the writer on the other core and hands back the batch (without its
per-layer columns) and the columns as numpy arrays, which pickle as raw bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Any

from starlette.concurrency import run_in_threadpool

from gradwatch.agent.wire import Batch, WireError, batch_from_dict
from gradwatch.server.repo.frame import LayerFrame

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded frame: a batch (``batch`` with empty ``layers`` columns + ``frame`` of layer
    indices), a hello message, or an error with the status it gets."""

    batch: Batch | None = None
    frame: LayerFrame | None = None
    hello: dict[str, Any] | None = None
    status: int = 0
    message: str = ""
    kind: str = ""
    seq: int | None = None


def decode(data: bytes | str) -> Decoded:
    """Parse and validate one frame. Never raises for bad input (the result says what is wrong)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        return Decoded(status=400, message=f"batch: not valid JSON ({e})", kind="json")
    if isinstance(obj, dict) and obj.get("type") == "hello":
        return Decoded(hello=obj)
    try:
        batch = batch_from_dict(obj, packed_as_array=True)
    except WireError as e:
        seq = obj.get("seq") if isinstance(obj, dict) and type(obj.get("seq")) is int else None
        return Decoded(status=422, message=str(e), kind="schema", seq=seq)
    frame = LayerFrame.from_batch(batch, None)
    return Decoded(batch=replace(batch, steps=[replace(s, layers={}) for s in batch.steps]), frame=frame)


class Decoder:
    """Runs :func:`decode` in ``workers`` processes (started on first use), or in threads when
    ``workers`` is 0 or the pool cannot run."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._failed = False

    def _get_pool(self) -> ProcessPoolExecutor | None:
        if self.workers <= 0 or self._failed:
            return None
        if self._pool is None:
            try:  # spawn: forking a process that runs threads and an event loop is unsafe
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            except (OSError, ValueError) as e:
                log.warning("ingest: no decode worker process (%s); decoding in threads", e)
                self._failed = True
                return None
        return self._pool

    async def decode(self, data: bytes | str) -> Decoded:
        pool = self._get_pool()
        if pool is not None:
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, decode, data)
            except BrokenProcessPool:  # a worker died (killed, out of memory): start afresh next time
                log.warning("ingest: the decode worker process died; starting a new one")
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
        return await run_in_threadpool(decode, data)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
