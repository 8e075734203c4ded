"""Frame decoding for the websocket ingest, in a worker process or in threads."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal

import numpy as np
import pytest

from gradwatch.agent import wire
from gradwatch.server.decode import Decoder, decode
from gradwatch.server.repo.frame import LayerFrame


def _batch(mk) -> wire.Batch:
    return mk(3, range(10, 20), values=lambda s, i: math.nan if (s + i) % 7 == 0 else s * 0.5 + i)


def _same_frame(a: LayerFrame, b: LayerFrame) -> None:
    assert len(a) == len(b)
    for (x, nx), (y, ny) in zip(a.columns(), b.columns()):
        np.testing.assert_array_equal(x, y)
        assert (nx is None) == (ny is None) and (nx is None or np.array_equal(nx, ny))


def test_decode_gives_the_batch_and_its_rows_by_layer_index(mk):
    b = _batch(mk)
    d = decode(wire.encode_batch(b))
    assert d.status == 0 and d.batch is not None and d.frame is not None
    assert d.batch.seq == 3 and [s.step for s in d.batch.steps] == list(range(10, 20))
    assert all(s.layers == {} for s in d.batch.steps)  # the columns travel as the frame only
    assert d.batch.row_count == b.row_count
    _same_frame(d.frame, LayerFrame.from_batch(b, {la.index: la.index for la in b.layers}))


@pytest.mark.parametrize("data, status, kind, needle", [
    (b"{broken", 400, "json", "not valid JSON"),
    (b"\xff\xfe", 400, "json", "not valid JSON"),
    (b"[]", 422, "schema", "batch: expected an object"),
    (json.dumps({"wire_version": 99, "seq": 4}).encode(), 422, "schema", "wire version"),
    (json.dumps({"wire_version": 1, "run": {"run_id": "r"}, "seq": 5, "steps": [{"step": 1}]}).encode(), 422,
     "schema", "time: missing"),
])
def test_decode_reports_bad_frames_without_raising(data, status, kind, needle):
    d = decode(data)
    assert d.batch is None and d.status == status and d.kind == kind and needle in d.message, d
    if b'"seq": 5' in data:
        assert d.seq == 5


def test_hello_passes_through():
    d = decode(json.dumps({"type": "hello", "run_id": "r", "source": 2}))
    assert d.hello == {"type": "hello", "run_id": "r", "source": 2} and d.batch is None


def test_worker_process_decodes_like_a_thread_and_survives_a_killed_worker(mk):
    b = _batch(mk)
    raw = wire.encode_batch(b)

    async def go() -> None:
        threads, procs = Decoder(0), Decoder(1)
        try:
            t = await threads.decode(raw)
            p = await procs.decode(raw)
            assert procs._pool is not None and threads._pool is None
            assert p.batch == t.batch and p.frame is not None and t.frame is not None
            _same_frame(p.frame, t.frame)
            assert (await procs.decode(b"{broken")).status == 400
            for pid in list(procs._pool._processes):  # the worker dies (OOM killer, say)
                os.kill(pid, signal.SIGKILL)
            again = [await procs.decode(raw) for _ in range(3)]  # no error reaches the stream
            assert all(a.batch == t.batch for a in again)
        finally:
            threads.close()
            procs.close()
        assert procs._pool is None

    asyncio.run(go())
