"""End to end with real uvicorn processes: websocket ingest, and live fan-out across two processes."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gradwatch.agent import wire

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(db_url: str, log: Path, **env: str) -> Iterator[str]:
    port = _free_port()
    e = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    e.update(env)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gradwatch.cli", "serve", "--port", str(port), "--db", db_url,
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=e)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_websocket_ingest_through_uvicorn(db_url, tmp_path, mk):
    with serve(db_url, tmp_path / "server.log") as base:
        ws_url = base.replace("http", "ws") + "/api/v1/ingest/ws"
        with connect(ws_url) as ws:
            for seq in range(1, 6):
                ws.send(wire.encode_batch(mk(seq, range(seq * 10, seq * 10 + 10))).decode())
                ack = json.loads(ws.recv(timeout=30))
                assert ack["type"] == "ack" and ack["acked"] == seq, ack
        with connect(ws_url) as ws:
            ws.send("{broken")
            err = json.loads(ws.recv(timeout=30))
            assert err["type"] == "error" and err["status"] == 400
            with pytest.raises(ConnectionClosed) as ei:
                ws.recv(timeout=30)
            assert ei.value.rcvd is not None and ei.value.rcvd.code == 1007
            assert "not valid JSON" in ei.value.rcvd.reason
        # unharmed: a new stream and the REST API still work, nothing was lost
        with connect(ws_url) as ws:
            ws.send(json.dumps({"type": "hello", "run_id": "run1", "source": 0}))
            assert json.loads(ws.recv(timeout=30))["acked"] == 5
        pts = _get(base + "/api/v1/runs/run1/steps")["points"]
        assert len(pts) == 50


def test_hostile_frames_and_hellos_get_a_close_frame_through_uvicorn(db_url, tmp_path, mk, hostile):
    """Over a real socket: each bad frame or hello is answered with an error message and a close
    frame carrying a code and a reason (not a dropped connection), and the server keeps serving."""
    frames = [(label, body, needle) for label, body, _, needle in hostile]
    frames += [("hello source 2**70", json.dumps({"type": "hello", "run_id": "run1", "source": 2**70}).encode(),
                "hello.source"),
               ("hello NUL run_id", json.dumps({"type": "hello", "run_id": "r\x00", "source": 0}).encode(),
                "hello.run_id: contains a NUL character")]
    with serve(db_url, tmp_path / "server.log") as base:
        ws_url = base.replace("http", "ws") + "/api/v1/ingest/ws"
        with connect(ws_url) as ws:
            ws.send(wire.encode_batch(mk(1, [1, 2])).decode())
            assert json.loads(ws.recv(timeout=30))["acked"] == 1
        for label, body, needle in frames:
            with connect(ws_url) as ws:
                ws.send(body)
                err = json.loads(ws.recv(timeout=30))
                assert err["type"] == "error" and needle in err["error"], (label, err)
                with pytest.raises(ConnectionClosed) as ei:
                    ws.recv(timeout=30)
                rcvd = ei.value.rcvd
                assert rcvd is not None and rcvd.code == 1007 and rcvd.reason, (label, rcvd)
                assert err["error"].startswith(rcvd.reason), (label, rcvd.reason)
        with connect(ws_url) as ws:
            ws.send(wire.encode_batch(mk(2, [3])).decode())
            assert json.loads(ws.recv(timeout=30))["acked"] == 2
        assert [p["step"] for p in _get(base + "/api/v1/runs/run1/steps")["points"]] == [1, 2, 3]


def test_live_fan_out_across_two_processes_on_postgresql(tmp_path, mk, fresh_pg):
    url = fresh_pg
    with serve(url, tmp_path / "a.log") as a, serve(url, tmp_path / "b.log") as b:
        with connect(a.replace("http", "ws") + "/api/v1/runs/run1/live") as live:
            assert json.loads(live.recv(timeout=30))["type"] == "subscribed"
            # ingest into process B, over HTTP and over its websocket
            # the agent's source is not always its rank: source 4097 sends rank 1's rows
            first = dataclasses.replace(mk(1, [1, 2, 3], source=1), source=4097)
            assert _post(b + "/api/v1/ingest", wire.encode_batch(first))["acked"] == 1
            msg = json.loads(live.recv(timeout=30))
            assert msg["type"] == "batch" and msg["seq"] == 1 and msg["source"] == 4097
            assert [(s["step"], s["rank"]) for s in msg["steps"]] == [(1, 1), (2, 1), (3, 1)]
            assert msg["events"][0]["data"]["layers"] == ["layer.1"]
            assert {s["step"]: s["values"]["lr"] for s in msg["scalars"]} == {1: 0.1, 2: 0.1, 3: 0.1}
            with connect(b.replace("http", "ws") + "/api/v1/ingest/ws") as ws:
                ws.send(wire.encode_batch(dataclasses.replace(mk(2, [4], source=1), source=4097)).decode())
                assert json.loads(ws.recv(timeout=30))["acked"] == 2
            msg = json.loads(live.recv(timeout=30))
            assert msg["seq"] == 2 and msg["steps"][0]["total_norm"] == 4.0
            # and data ingested into A itself arrives too (in-process path)
            _post(a + "/api/v1/ingest", wire.encode_batch(mk(3, [5])))
            assert json.loads(live.recv(timeout=30))["seq"] == 3
        # per-layer statistics on request, read back from the database by the other process
        with connect(a.replace("http", "ws") + "/api/v1/runs/run1/live?layers=l2,mean") as live:
            assert json.loads(live.recv(timeout=30))["type"] == "subscribed"
            nan = float("nan")
            _post(b + "/api/v1/ingest", wire.encode_batch(mk(4, [6, 7], values=lambda s, i: nan if i == 1 else s + i)))
            msg = json.loads(live.recv(timeout=30))
            assert msg["seq"] == 4 and [st["step"] for st in msg["steps"]] == [6, 7]
            blk = msg["steps"][1]["layers"]
            assert blk == {"index": [0, 1, 2, 3], "l2": [7.0, "NaN", 9.0, 10.0], "mean": [7.0, "NaN", 9.0, 10.0]}


def test_server_never_imports_torch():
    code = "import sys, gradwatch.server.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_pipelined_stream_on_postgresql_acks_in_order_and_rollups_stay_exact(tmp_path, mk, fresh_pg):
    """On PostgreSQL the server writes two batches of a stream side by side. Sent without waiting:
    acks come in seq order, ``acked`` never goes back and ends at the last seq, and the rows and
    rollup blocks equal a recomputation from the rows, an overlapping resend (new seq, old steps)
    in the middle of the stream included."""
    import math

    import psycopg

    from gradwatch.agent.spec import ROLLUP_STATS
    from gradwatch.server.db.models import BLOCK_STEPS
    from gradwatch.server.repo.ingest import stat_sql

    def vals(s: int, i: int) -> float:
        return math.nan if (s * 7 + i) % 23 == 0 else ((s * 31 + i * 17) % 101) / 7.0

    batches = [mk(k + 1, range(1 + 20 * k, 21 + 20 * k), values=vals, events=False, layers=40) for k in range(30)]
    resend = mk(31, range(250, 291), values=lambda s, i: 12345.5, events=False, layers=40)  # steps stored by seqs 13-15
    order = batches[:16] + [resend] + batches[16:]
    with serve(fresh_pg, tmp_path / "server.log") as base:
        with connect(base.replace("http", "ws") + "/api/v1/ingest/ws", max_size=None) as ws:
            for b in order:
                ws.send(wire.encode_batch(b))
            acks = [json.loads(ws.recv(timeout=60)) for _ in order]
    assert [a["type"] for a in acks] == ["ack"] * len(order), acks
    assert [a["seq"] for a in acks] == [b.seq for b in order]
    acked = [a["acked"] for a in acks]
    assert acked == sorted(acked) and acked[-1] == 31
    assert all(a >= b.seq for a, b in zip(acked, order) if b.seq <= 30)  # no gaps: each ack covers its seq
    with psycopg.connect(fresh_pg.replace("postgresql+psycopg://", "postgresql://", 1)) as con:
        n, fives = con.execute("SELECT count(*), count(*) FILTER (WHERE l2 = 12345.5) FROM layer_stat").fetchone()
        assert n == 30 * 20 * 40 and fives == 0  # first write wins
        aggs = []
        for st in ROLLUP_STATS:
            v, nan = stat_sql(st)
            aggs += [f"min({v})", f"max({v})", f"sum({v})", f"count({v})", f"sum({nan})"]
        want = con.execute(f"SELECT layer_id, step / {BLOCK_STEPS}, rank, min(step), max(step), count(*), "
                           f"{', '.join(aggs)} FROM layer_stat GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").fetchall()
        cols = [f"{st}_{a}" for st in ROLLUP_STATS for a in ("min", "max", "sum", "cnt", "nan")]
        got = con.execute(f"SELECT layer_id, block, rank, step_min, step_max, n, {', '.join(cols)} "
                          "FROM layer_stat_block ORDER BY 1, 2, 3").fetchall()
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        for x, y in zip(g, w):
            if isinstance(x, float) and y is not None:
                assert x == pytest.approx(float(y), rel=1e-12), (g[:3], x, y)
            else:
                assert x == (int(y) if y is not None and not isinstance(y, float) else y), (g[:3], x, y)
