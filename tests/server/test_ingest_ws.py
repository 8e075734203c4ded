"""WS /api/v1/ingest/ws through the TestClient: acks, hello, bad frames close with a reason."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from gradwatch.agent import wire
from gradwatch.server.app import create_app


def _closed(ws) -> dict:
    msg = ws.receive()
    assert msg["type"] == "websocket.close", msg
    return msg


def test_stream_acks_each_batch_and_hello_reports_progress(client, mk):
    with client.websocket_connect("/api/v1/ingest/ws") as ws:
        ws.send_text(json.dumps({"type": "hello", "run_id": "run1", "source": 0}))
        assert ws.receive_json() == {"type": "ack", "run_id": "run1", "source": 0, "seq": None, "acked": 0,
                                     "duplicate": False}
        ws.send_text(wire.encode_batch(mk(1, [1, 2])).decode())
        assert ws.receive_json() == {"type": "ack", "run_id": "run1", "source": 0, "seq": 1, "acked": 1,
                                     "duplicate": False}
        ws.send_bytes(wire.encode_batch(mk(3, [5])))  # binary UTF-8 frames too; seq 2 missing
        assert ws.receive_json()["acked"] == 1
        ws.send_bytes(wire.encode_batch(mk(2, [3, 4])))
        assert ws.receive_json()["acked"] == 3
        ws.send_bytes(wire.encode_batch(mk(2, [3, 4])))
        a = ws.receive_json()
        assert a["duplicate"] is True and a["acked"] == 3
        ws.send_text(json.dumps({"type": "hello", "run_id": "run1", "source": 0}))
        assert ws.receive_json()["acked"] == 3
    pts = client.get("/api/v1/runs/run1/steps").json()["points"]
    assert [p["step"] for p in pts] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("frame,status,code,needle", [
    ("this is not json", 400, 1007, "not valid JSON"),
    (json.dumps({"wire_version": 7}), 422, 1007, "wire version"),
    (json.dumps({"wire_version": 1, "run": {"run_id": "r"}, "seq": 3, "steps": "x"}), 422, 1007, "batch.steps"),
    (b"\xff\xfe\xfd", 400, 1007, "not valid JSON"),
])
def test_bad_frame_gets_error_then_close_with_reason(client, mk, frame, status, code, needle):
    with client.websocket_connect("/api/v1/ingest/ws") as ws:
        ws.send_text(wire.encode_batch(mk(1, [1])).decode())
        assert ws.receive_json()["acked"] == 1
        if isinstance(frame, bytes):
            ws.send_bytes(frame)
        else:
            ws.send_text(frame)
        err = ws.receive_json()
        assert err["type"] == "error" and err["status"] == status and needle in err["error"]
        if status == 422 and "steps" in needle:
            assert err["seq"] == 3
        closed = _closed(ws)
        assert closed["code"] == code and needle in closed["reason"]
        assert len(closed["reason"].encode()) <= 120
    # the server is unharmed and the stored batch is intact
    with client.websocket_connect("/api/v1/ingest/ws") as ws:
        ws.send_text(wire.encode_batch(mk(2, [2])).decode())
        assert ws.receive_json()["acked"] == 2
    assert len(client.get("/api/v1/runs/run1/steps").json()["points"]) == 2


def test_oversized_frame_closes_1009(make_settings, mk):
    with TestClient(create_app(make_settings(max_body_bytes=1500))) as c:
        with c.websocket_connect("/api/v1/ingest/ws") as ws:
            ws.send_text(wire.encode_batch(mk(1, range(1, 40))).decode())
            err = ws.receive_json()
            assert err["status"] == 413
            closed = _closed(ws)
            assert closed["code"] == 1009 and "exceeds the limit" in closed["reason"]
        assert c.get("/api/v1/runs").json()["count"] == 0


def test_stream_needs_a_write_token(make_settings, mk):
    with TestClient(create_app(make_settings(token="w-secret", read_token="r-secret"))) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer r-secret"}):
            with c.websocket_connect("/api/v1/ingest/ws", headers=headers) as ws:
                closed = _closed(ws)
                assert closed["code"] == 1008 and closed["reason"]
        with c.websocket_connect("/api/v1/ingest/ws", headers={"Authorization": "Bearer w-secret"}) as ws:
            ws.send_text(wire.encode_batch(mk(1, [1])).decode())
            assert ws.receive_json()["acked"] == 1


def test_live_subscriber_receives_ingested_batches(client, mk, post):
    with client.websocket_connect("/api/v1/runs/run1/live") as live:
        assert live.receive_json() == {"type": "subscribed", "run_id": "run1"}
        assert post(client, mk(1, [1, 2])).status_code == 200
        msg = live.receive_json()
        assert msg["type"] == "batch" and msg["run_id"] == "run1" and msg["seq"] == 1
        assert [s["step"] for s in msg["steps"]] == [1, 2]
        assert msg["steps"][0]["total_norm"] == 1.0 and msg["events"][0]["kind"] == "overflow"
        assert msg["scalars"][0]["values"]["lr"] == 0.1
        post(client, mk(1, [1, 2]))  # duplicate: nothing is pushed
        post(client, mk(2, [3], run_id="other"))  # another run: not pushed here
        post(client, mk(2, [3]))
        assert live.receive_json()["seq"] == 2


def test_live_layers_on_request_only(client, mk, post):
    """``?layers=`` adds each step's per-layer statistics (NaN/inf as strings); subscribers that
    did not ask get none, on the same run at the same time; an unknown name closes 1008."""
    nan, inf = float("nan"), float("inf")
    vals = {(2, 1): nan, (2, 2): inf}
    with client.websocket_connect("/api/v1/runs/run1/live?layers=l2,nonfinite") as some, \
            client.websocket_connect("/api/v1/runs/run1/live?layers=all") as every, \
            client.websocket_connect("/api/v1/runs/run1/live") as plain:
        for ws in (some, every, plain):
            assert ws.receive_json()["type"] == "subscribed"
        assert post(client, mk(1, [1, 2], values=lambda s, i: vals.get((s, i), s + i / 10))).status_code == 200
        a, b, c = some.receive_json(), every.receive_json(), plain.receive_json()
        assert all("layers" not in st for st in c["steps"])
        blk = a["steps"][1]["layers"]
        assert set(blk) == {"index", "l2", "nonfinite"} and blk["index"] == [0, 1, 2, 3]
        assert blk["l2"] == [2.0, "NaN", "Infinity", 2.3] and blk["nonfinite"] == [0, 0, 0, 0]
        full = b["steps"][0]["layers"]
        assert set(full) == {"index", "numel", "nonfinite", "mean", "m2", "var", "std", "l2", "maxabs", "l2_post", "wnorm",
                             "noise_scale", "zeros", "headroom", "underflow", "mom_cos", "upd_ratio"}
        assert full["zeros"] == full["upd_ratio"] == [None] * 4  # this batch's agent did not measure them
        assert full["numel"] == [10, 20, 30, 40] and full["mean"] == [1.0, 1.1, 1.2, 1.3]
    with client.websocket_connect("/api/v1/runs/run1/live?layers=l2,bogus") as ws:
        closed = _closed(ws)
        assert closed["code"] == 1008 and "bogus" in closed["reason"]


def test_live_needs_a_token_when_configured(make_settings):
    with TestClient(create_app(make_settings(token="w", read_token="r"))) as c:
        with c.websocket_connect("/api/v1/runs/x/live") as ws:
            assert _closed(ws)["code"] == 1008
        with c.websocket_connect("/api/v1/runs/x/live", headers={"Authorization": "Bearer r"}) as ws:
            assert ws.receive_json()["type"] == "subscribed"


def _export(client) -> str:
    return client.get("/api/v1/runs/run1/export").text


def test_hostile_frames_close_1007_with_a_reason_and_the_server_keeps_serving(client, mk, hostile):
    """Each of these once dropped the connection with no close frame (an exception out of the handler)."""
    with client.websocket_connect("/api/v1/ingest/ws") as ws:
        ws.send_text(wire.encode_batch(mk(1, [1, 2])).decode())
        assert ws.receive_json()["acked"] == 1
    before = _export(client)
    for label, body, status, needle in hostile:
        with client.websocket_connect("/api/v1/ingest/ws") as ws:
            ws.send_bytes(body)
            err = ws.receive_json()
            assert err["type"] == "error" and err["status"] == status and needle in err["error"], (label, err)
            closed = _closed(ws)
            assert closed["code"] == 1007, (label, closed)
            assert closed["reason"] and closed["reason"] in err["error"], (label, closed)
    assert _export(client) == before
    with client.websocket_connect("/api/v1/ingest/ws") as ws:  # a following good batch is stored
        ws.send_text(wire.encode_batch(mk(2, [3])).decode())
        assert ws.receive_json()["acked"] == 2
    assert [p["step"] for p in client.get("/api/v1/runs/run1/steps").json()["points"]] == [1, 2, 3]


@pytest.mark.parametrize("hello,needle", [
    ({"run_id": "run1", "source": 2**70}, "hello.source: expected an integer in [0, 1048576], got 1180591620717411303424"),
    ({"run_id": "run1", "source": -1}, "hello.source: expected an integer in [0, 1048576], got -1"),
    ({"run_id": "run1", "source": "0"}, "hello.source: expected an integer in [0, 1048576], got str"),
    ({"run_id": "ru\x00n1", "source": 0}, "hello.run_id: contains a NUL character"),
    ({"run_id": "a/b", "source": 0}, "hello.run_id: must be 1-64 characters of ASCII letters, digits, '-' or '_'"),
    ({"source": 0}, "hello.run_id: expected a string, got NoneType"),
])
def test_bad_hello_closes_1007_with_a_reason(client, mk, hello, needle):
    with client.websocket_connect("/api/v1/ingest/ws") as ws:
        ws.send_text(wire.encode_batch(mk(1, [1])).decode())
        assert ws.receive_json()["acked"] == 1
        ws.send_text(json.dumps({"type": "hello", **hello}))
        err = ws.receive_json()
        assert err == {"type": "error", "seq": None, "status": 422, "error": needle}
        closed = _closed(ws)
        assert closed["code"] == 1007 and closed["reason"] == needle
    with client.websocket_connect("/api/v1/ingest/ws") as ws:
        ws.send_text(json.dumps({"type": "hello", "run_id": "run1", "source": 0}))
        assert ws.receive_json()["acked"] == 1
        ws.send_text(wire.encode_batch(mk(2, [2])).decode())
        assert ws.receive_json()["acked"] == 2


def test_server_errors_in_a_stream_close_1011_with_a_reason(client, mk, monkeypatch):
    from gradwatch.server.api import ingest

    with client.websocket_connect("/api/v1/ingest/ws") as ws:
        ws.send_text(wire.encode_batch(mk(1, [1])).decode())
        assert ws.receive_json()["acked"] == 1
    before = _export(client)

    def broken_acked(*a, **kw):
        raise ConnectionError("database went away")

    with monkeypatch.context() as m:  # the database fails under a hello: 503, 1011
        m.setattr(ingest, "read_acked", broken_acked)
        with client.websocket_connect("/api/v1/ingest/ws") as ws:
            ws.send_text(json.dumps({"type": "hello", "run_id": "run1", "source": 0}))
            assert ws.receive_json()["error"] == "storage unavailable: ConnectionError"
            closed = _closed(ws)
            assert closed["code"] == 1011 and closed["reason"] == "storage unavailable: ConnectionError"

    def broken_decode(gw, data):
        raise ZeroDivisionError("a bug")

    with monkeypatch.context() as m:  # a bug under a frame: 500, 1011
        m.setattr(ingest, "decode_frame", broken_decode)
        with client.websocket_connect("/api/v1/ingest/ws") as ws:
            ws.send_text(wire.encode_batch(mk(2, [2])).decode())
            err = ws.receive_json()
            assert err["status"] == 500 and err["error"] == "server error while decoding the frame (ZeroDivisionError)"
            closed = _closed(ws)
            assert closed["code"] == 1011 and closed["reason"] == err["error"]
    assert _export(client) == before
    assert 'gradwatch_ingest_errors_total{kind="internal"} 1' in client.get("/metrics").text
    with client.websocket_connect("/api/v1/ingest/ws") as ws:
        ws.send_text(wire.encode_batch(mk(2, [2])).decode())
        assert ws.receive_json()["acked"] == 2


def test_steps_reach_a_live_subscriber_exactly_once_across_two_postgresql_processes(tmp_path, mk, fresh_pg):
    """Batches alternate between processes A and B, and each holds a scalar of the next batch's
    first step (neighbouring batches share a step): a subscriber on A gets each step, scalar and
    event once, whether A stored it (in-process path) or B did (read back by step range)."""
    import dataclasses
    import importlib.util
    import time as _time
    import urllib.request
    from pathlib import Path

    from websockets.sync.client import connect

    spec = importlib.util.spec_from_file_location("gw_test_e2e", Path(__file__).with_name("test_e2e.py"))
    assert spec is not None and spec.loader is not None
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    serve = e2e.serve  # the uvicorn-process helper of the end-to-end tests

    n, per = 40, 10

    def batch(k: int) -> wire.Batch:
        b = mk(k + 1, range(per * k + 1, per * (k + 1) + 1))  # (mk's loss is 1/step: no step 0)
        late = wire.ScalarRecord(per * (k + 1) + 1, 1.0, {"late": float(k)}, rank=0)
        return dataclasses.replace(b, scalars=[*b.scalars, late])

    def post(base: str, b: wire.Batch) -> None:
        req = urllib.request.Request(base + "/api/v1/ingest", wire.encode_batch(b), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["seq"] == b.seq

    with serve(fresh_pg, tmp_path / "a.log") as a, serve(fresh_pg, tmp_path / "b.log") as b:
        with connect(a.replace("http", "ws") + "/api/v1/runs/run1/live") as live:
            assert json.loads(live.recv(timeout=30))["type"] == "subscribed"
            for k in range(n):
                post((a, b)[k % 2], batch(k))
            sentinel = mk(n + 1, [per * n + 5])
            post(b, sentinel)
            steps: dict[int, int] = {}
            scalars: dict[tuple[int, str], int] = {}
            events: dict[int, int] = {}
            deadline = _time.monotonic() + 120
            while per * n + 5 not in steps:
                assert _time.monotonic() < deadline, f"missing {sorted(set(range(1, per * n + 1)) - set(steps))[:10]}"
                msg = json.loads(live.recv(timeout=60))
                for st in msg["steps"]:
                    steps[st["step"]] = steps.get(st["step"], 0) + 1
                for sc in msg["scalars"]:
                    for key in sc["values"]:
                        scalars[(sc["step"], key)] = scalars.get((sc["step"], key), 0) + 1
                for ev in msg["events"]:
                    events[ev["step"]] = events.get(ev["step"], 0) + 1
    want = [*range(1, per * n + 1), per * n + 5]
    assert sorted(steps) == want
    assert [s for s, c in steps.items() if c != 1] == []  # each step exactly once
    assert [k for k, c in scalars.items() if c != 1] == []
    assert {(s + 1, "late") for s in range(per, per * (n + 1), per)} <= set(scalars)
    assert events == {per * k + 1: 1 for k in range(n)} | {per * n + 5: 1}
