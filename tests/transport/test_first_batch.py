"""The sender must not skip a batch the drainer has numbered but not yet indexed.

The drainer numbers a batch before appending it to the spool and its index; a connection whose
sender started in that gap began at the drainer's counter + 1 and never sent the batch while it
lived (under CPU load this lost the run's first batch until close: its steps reached neither the
database nor any live view). The gap is forced here, deterministically, with a real server.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.transport.network import NetworkSink

from .conftest import ServerProc, assert_exactly_once, layers_of, new_run, scalar_record, step_record

pytestmark = pytest.mark.slow

N = 4


class GapSink(NetworkSink):
    """Holds the drainer between numbering batch ``hold`` and indexing it until the sender has
    looked for its next batch on a live connection."""

    def __init__(self, *a: Any, hold: int, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.hold = hold
        self.looked = threading.Event()
        self.held = threading.Event()

    def _next_seq(self, nxt: int) -> int | None:
        if self._connected and self._seq >= self.hold:
            self.looked.set()
        return super()._next_seq(nxt)

    def _append(self, seq: int, raw: bytes, n: int) -> None:
        if seq == self.hold:
            self.held.set()
            assert self.looked.wait(60), "the sender never looked for a batch"
        super()._append(seq, raw, n)


def test_the_first_batch_numbered_while_the_sender_starts_is_sent(server: ServerProc, tmp_path: Path) -> None:
    run = new_run()
    sink = GapSink(server.url, run, lambda: layers_of(N), spool_dir=tmp_path / "spool", hold=1,
                   flush_interval=0.02, batch_max_steps=5, close_timeout=30)
    sink.start()
    for i in range(30):
        sink.put(step_record(i, N))
        sink.put(scalar_record(i))
    assert sink.held.wait(60)
    assert sink.flush(30), f"undelivered: {sink.stats()}"  # every batch, the held first one included
    sink.close()
    assert sink.stats()["batches_unsent"] == 0
    assert_exactly_once(server.db, run.run_id, range(30), N)
