"""Hostile and oversized input answered with a 4xx that names the problem, never a 5xx, and
without losing what was stored before: ingest payloads, bodies, configs, layer specs, series sizes."""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient

from gradwatch.agent import wire
from gradwatch.server.app import create_app


def _errors(client, kind: str) -> int:
    m = re.search(rf'^gradwatch_ingest_errors_total{{kind="{kind}"}} (\d+)$', client.get("/metrics").text, re.M)
    return int(m.group(1)) if m else 0


def test_hostile_batches_are_422_and_lose_nothing(client, mk, post, hostile):
    assert post(client, mk(1, [1, 2])).status_code == 200
    before = client.get("/api/v1/runs/run1/export").text
    for label, body, status, needle in hostile:
        r = client.post("/api/v1/ingest", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (label, r.status_code, r.text[:300])
        assert needle in r.json()["detail"], (label, r.json())
    assert client.get("/api/v1/runs/run1/export").text == before
    assert client.get("/api/v1/ingest/ack", params={"run_id": "run1"}).json()["acked"] == 1
    assert _errors(client, "schema") == len(hostile) and _errors(client, "storage") == 0
    assert post(client, mk(2, [3])).json()["acked"] == 2  # the stream is not wedged


def test_a_wire_bug_is_still_a_422_with_a_message(client, mk, post, monkeypatch):
    """Whatever escapes the wire's own checks while decoding is the payload's 422, not a 500."""
    from gradwatch.server.api import ingest

    def broken(obj, **kw):
        raise KeyError("surprise")

    monkeypatch.setattr(ingest, "batch_from_dict", broken)
    r = post(client, mk(7, [1]))
    assert r.status_code == 422
    assert r.json()["detail"] == "batch: could not be decoded (KeyError: 'surprise')"
    assert _errors(client, "schema") == 1


def test_stored_extremes_of_the_int64_columns_read_back(client, mk, post):
    big = 2**63 - 1  # what BIGINT holds
    b = mk(1, [big])
    cols = {**b.steps[0].layers, "numel": [big] * 4, "nonfinite": [big, 0, 0, 0]}
    step = wire.StepRecord(**{**{f: getattr(b.steps[0], f) for f in b.steps[0].__slots__}, "layers": cols})
    r = post(client, wire.Batch(run=b.run, seq=big, layers=b.layers, steps=[step]))
    assert r.status_code == 200, r.text
    pts = client.get("/api/v1/runs/run1/stats", params={"layer": "0", "stat": "numel"}).json()["series"][0]["points"]
    assert pts == [{"step": big, "rank": 0, "value": big}]


# ---------------------------------------------------------------------------------------------
# request bodies


def test_every_route_refuses_a_body_over_the_limit(make_settings, mk):
    with TestClient(create_app(make_settings(max_body_bytes=4000))) as c:
        big = json.dumps({"run_id": "big", "config": {"blob": "x" * 5000}}).encode()
        r = c.post("/api/v1/runs", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json()["detail"] == f"request body of {len(big)} bytes exceeds the limit of 4000 bytes"

        def chunks():  # no Content-Length: counted as it streams
            yield big[:3000]
            yield big[3000:]

        r = c.post("/api/v1/runs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["detail"] == "request body exceeds the limit of 4000 bytes"
        r = c.patch("/api/v1/runs/big", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.get("/api/v1/runs").json()["count"] == 0
        # bodies within the limit, chunked or not, reach the route whole
        small = json.dumps({"run_id": "small", "config": {"blob": "x" * 3000}}).encode()
        assert c.post("/api/v1/runs", content=small, headers={"Content-Type": "application/json"}).status_code == 201
        r = c.patch("/api/v1/runs/small", content=iter([b'{"notes": ', b'"chunked"}']),
                    headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["notes"] == "chunked"
        assert c.get("/api/v1/runs/small").json()["config"]["blob"] == "x" * 3000
        # ingest keeps its own check, messages and metric
        batch = wire.encode_batch(mk(1, range(1, 50)))
        r = c.post("/api/v1/ingest", content=batch)
        assert r.status_code == 413 and r.json()["detail"] == (
            f"batch: body of {len(batch)} bytes exceeds the limit of 4000")
        assert _errors(c, "too_large") == 1
        assert c.post("/api/v1/ingest", content=wire.encode_batch(mk(1, [1]))).status_code == 200


def test_a_40_mb_run_is_refused_at_the_default_limit(client):
    big = json.dumps({"config": {"blob": "x" * (40 * 1024 * 1024)}}).encode()
    r = client.post("/api/v1/runs", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 33554432 bytes" in r.json()["detail"]
    assert client.get("/api/v1/runs").json()["count"] == 0


def _nested(levels: int) -> object:
    v: object = 1
    for _ in range(levels):
        v = {"a": v}
    return v


def test_deeply_nested_config_is_422_naming_the_field(client, mk, post):
    assert post(client, mk(1, [1])).status_code == 200
    for levels in (9, 900):  # one past wire.MAX_DEPTH, and deep enough to exhaust the recursion limit
        r = client.post("/api/v1/runs", json={"run_id": "deep", "config": {"x": _nested(levels - 1)}})
        assert r.status_code == 422, r.text[:200]
        assert r.json()["detail"].startswith("body.config: ") and "nested too deeply (at most 8 levels)" in r.json()["detail"]
    r = client.post("/api/v1/runs", content=b'{"config": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
                    headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
    # as deep as the wire lets an agent send it is fine, and reads back
    ok = {"x": _nested(wire.MAX_DEPTH - 1)}
    r = client.post("/api/v1/runs", json={"run_id": "ok", "config": ok})
    assert r.status_code == 201 and r.json()["config"] == ok
    for body in ({"config": _nested(900)}, {"notes": _nested(900)}, {"tags": [_nested(900)]}):
        r = client.patch("/api/v1/runs/run1", json=body)
        assert r.status_code == 422 and r.json()["detail"], body.keys()
    assert client.get("/api/v1/runs").json()["count"] == 2
    assert client.get("/api/v1/runs/run1").json()["config"] == {"lr": 0.1}


# ---------------------------------------------------------------------------------------------
# layer specs and series sizes


def test_layer_specs_that_only_look_like_numbers_are_404(client, mk, post):
    post(client, mk(1, [1, 2]))
    for spec in ("²", "--1", "1²", "٣", "+1", " 1", "1.0"):
        for path, key in (("stats", "layer"), ("heatmap", "layers")):
            r = client.get(f"/api/v1/runs/run1/{path}", params={key: spec})
            assert r.status_code == 404, (spec, path, r.text)
            assert r.json()["detail"] == f"layer {spec!r} not found in run 'run1'"
    for spec, idx in (("3", 3), ("-0", 0), ("003", 3)):
        r = client.get("/api/v1/runs/run1/stats", params={"layer": spec})
        assert r.json()["series"][0]["layer"] == idx
    assert client.get("/api/v1/runs/run1/stats", params={"layer": "-1"}).status_code == 404


def test_heatmap_is_bounded_in_buckets_and_cells(client, mk, post, monkeypatch):
    from gradwatch.server.api import runs

    c = client
    post(c, mk(1, range(1, 301), layers=8, events=False))
    # a huge requested range: the buckets span the steps that exist, not 2**62 of them
    r = c.get("/api/v1/runs/run1/heatmap", params={"start": 0, "end": 2**62, "max_points": 10_000})
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["steps"][0] == 1 and len(h["steps"]) == 300 and h["bucket_width"] == 1
    assert all(len(row) == 300 for row in h["values"]) and h["values"][2][0] == 1.2
    r = c.get("/api/v1/runs/run1/heatmap", params={"start": 100, "end": 2**62, "max_points": 50})
    assert r.json()["steps"][0] == 100 and r.json()["steps"][-1] <= 300
    r = c.get("/api/v1/runs/run1/heatmap", params={"start": 301, "end": 2**62})
    assert r.status_code == 200 and r.json()["steps"] == [] and r.json()["values"] == [[]] * 8
    r = c.get("/api/v1/runs/run1/heatmap", params={"max_points": 10_001})
    assert r.status_code == 422 and "max_points" in r.json()["detail"]
    # layers × buckets over the cap: refused before anything is allocated
    monkeypatch.setattr(runs, "MAX_CELLS", 8 * 300 - 1)
    r = c.get("/api/v1/runs/run1/heatmap", params={"max_points": 10_000})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("heatmap: 8 layers × 300 buckets = 2,400 values, more than the 2,399")
    assert c.get("/api/v1/runs/run1/heatmap", params={"max_points": 299}).status_code == 200
    # left out, max_points shrinks to fit the budget instead of failing
    monkeypatch.setattr(runs, "MAX_CELLS", 8 * 100)
    h = c.get("/api/v1/runs/run1/heatmap").json()
    assert len(h["steps"]) == 100 and h["bucket_width"] == 3


def test_series_without_max_points_are_bounded(make_settings, mk, post):
    with TestClient(create_app(make_settings(max_points_limit=100))) as c:
        post(c, mk(1, range(1, 251), layers=4, events=False))
        # within the limit: raw points, as before
        r = c.get("/api/v1/runs/run1/stats", params={"layer": "0", "end": 100}).json()["series"][0]
        assert not r["downsampled"] and len(r["points"]) == 100
        # beyond it: downsampled to the limit instead of every row
        for path, params in (("stats", {"layer": "all"}), ("steps", {}), ("scalars", {"key": "loss"})):
            r = c.get(f"/api/v1/runs/run1/{path}", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            for s in body.get("series", [body]):
                assert s["downsampled"] and 0 < len(s["buckets"]) <= 100 and s["bucket_width"] == 3, path
                assert sum(b["count"] for b in s["buckets"]) == 250
        r = c.get("/api/v1/runs/run1/steps", params={"max_points": 101})
        assert r.status_code == 422 and r.json()["detail"] == "max_points: at most 100 on this server, got 101"


def test_stats_share_the_cell_budget_across_layers(client, mk, post, monkeypatch):
    from gradwatch.server.api import runs

    monkeypatch.setattr(runs, "MAX_CELLS", 200)
    post(client, mk(1, range(1, 101), layers=4, events=False))
    s = client.get("/api/v1/runs/run1/stats", params={"layer": "all"}).json()["series"]
    assert len(s) == 4 and all(x["downsampled"] and len(x["buckets"]) == 50 for x in s)
    r = client.get("/api/v1/runs/run1/stats", params={"layer": "all", "max_points": 51})
    assert r.status_code == 422
    assert r.json()["detail"] == ("max_points: 4 layers × 51 points is more than the 200 values one response holds; "
                                  "ask for at most 50 points or fewer layers")
    assert len(client.get("/api/v1/runs/run1/stats", params={"layer": "0", "max_points": 100}).json()
               ["series"][0]["points"]) == 100


def test_max_points_above_the_hard_cap_is_422(client, mk, post):
    post(client, mk(1, [1, 2]))
    for path in ("stats", "steps", "heatmap"):
        r = client.get(f"/api/v1/runs/run1/{path}", params={"max_points": 10_001})
        assert r.status_code == 422 and "max_points" in r.json()["detail"], path
        assert client.get(f"/api/v1/runs/run1/{path}", params={"max_points": 10_000}).status_code == 200


def test_run_ids_the_rest_api_cannot_address_are_refused_at_ingest(client, mk, post):
    """str.isalnum() takes "²" and "é"; the REST path pattern (and the agent's config) is ASCII only."""
    for rid in ("run²", "café"):
        r = post(client, mk(1, [1], run_id=rid))
        assert r.status_code == 422 and r.json()["detail"].startswith("batch.run.run_id: must be 1-64 characters")
    assert client.get("/api/v1/runs").json()["count"] == 0


# ------------------------------------------------------------------ bounded memory and connections


def test_an_idle_ingest_websocket_is_closed_with_a_reason(make_settings, mk):
    with TestClient(create_app(make_settings(ingest_idle_timeout=0.3))) as client:
        with client.websocket_connect("/api/v1/ingest/ws") as ws:
            ws.send_text(wire.encode_batch(mk(1, [1])).decode())
            assert ws.receive_json()["acked"] == 1
            msg = ws.receive()  # then nothing: the server closes it (bounded by the timeout above)
            assert msg["type"] == "websocket.close" and msg["code"] == 1001, msg
            assert "idle for 0.3 s" in msg["reason"]
        assert _errors(client, "idle") == 1
        with client.websocket_connect("/api/v1/ingest/ws") as ws:  # a new stream goes on
            ws.send_text(json.dumps({"type": "hello", "run_id": "run1", "source": 0}))
            assert ws.receive_json()["acked"] == 1


def test_ingest_websockets_per_client_are_capped(make_settings, mk):
    with TestClient(create_app(make_settings(ingest_max_connections=2))) as client:
        with client.websocket_connect("/api/v1/ingest/ws") as a, client.websocket_connect("/api/v1/ingest/ws") as b:
            for ws in (a, b):
                ws.send_text(json.dumps({"type": "hello", "run_id": "run1", "source": 0}))
                assert ws.receive_json()["type"] == "ack"
            with client.websocket_connect("/api/v1/ingest/ws") as c:
                msg = c.receive()
                assert msg["type"] == "websocket.close" and msg["code"] == 1013, msg
                assert "too many ingest connections from this client (at most 2)" in msg["reason"]
        with client.websocket_connect("/api/v1/ingest/ws") as c:  # room again once they closed
            c.send_text(wire.encode_batch(mk(1, [1])).decode())
            assert c.receive_json()["acked"] == 1


def test_byte_budget_waits_times_out_and_wakes_waiters():
    import asyncio

    from gradwatch.server.api.ingest import ByteBudget

    async def scenario() -> list:
        b = ByteBudget(100)
        got = [await b.take(60), await b.take(500, timeout=0)]  # 60, then no room: None
        waiter = asyncio.ensure_future(b.take(50))
        await asyncio.sleep(0)
        assert not waiter.done()
        b.release(60)
        got.append(await asyncio.wait_for(waiter, 30))
        got.append(await b.take(500, timeout=0))  # 50 held: no room for a capped 100
        b.release(50)
        got.append(await b.take(500))  # alone, an oversized payload takes the whole budget
        got.append(b.used)
        return got

    assert asyncio.run(scenario()) == [60, None, 50, None, 100, 100]


def test_posts_beyond_the_bytes_in_flight_get_503_with_retry_after(make_settings, mk, monkeypatch):
    """While one batch holds the budget, another POST waits ``ingest_wait_seconds`` and is then
    answered 503 with Retry-After (which the agent honours); afterwards it is accepted."""
    import threading

    from gradwatch.server.api import ingest

    entered, release = threading.Event(), threading.Event()
    real = ingest.ingest_bytes

    def slow(gw, data):
        entered.set()
        release.wait(60)
        return real(gw, data)

    monkeypatch.setattr(ingest, "ingest_bytes", slow)
    body = wire.encode_batch(mk(1, [1, 2, 3]))
    with TestClient(create_app(make_settings(ingest_max_inflight_bytes=len(body), ingest_wait_seconds=0.2))) as client:
        first: list = []
        t = threading.Thread(target=lambda: first.append(client.post(
            "/api/v1/ingest", content=body, headers={"Content-Type": "application/json"})))
        t.start()
        assert entered.wait(60)
        r = client.post("/api/v1/ingest", content=wire.encode_batch(mk(2, [4])),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        release.set()
        t.join(60)
        assert first[0].status_code == 200
        r = client.post("/api/v1/ingest", content=wire.encode_batch(mk(2, [4])),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["acked"] == 2
        assert _errors(client, "busy") == 1


def test_the_agent_honours_retry_after():
    from gradwatch.agent.transport.network import _retry_after, classify_http_error

    err = classify_http_error(503, "busy", None, _retry_after({"Retry-After": "7"}))
    assert getattr(err, "kind", None) == "failing" and getattr(err, "retry_after", None) == 7.0
    assert _retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert _retry_after({"Retry-After": "99999"}) == 60.0


def test_wide_heatmap_reads_rollup_blocks_and_agrees_with_the_rows(client, mk, post, monkeypatch):
    """Over more raw rows than ``RAW_ROWS_BUDGET``, buckets are whole 64-step rollup blocks (fewer
    than asked for); each cell is still the max of its steps' rows."""
    from gradwatch.server.repo import series

    post(client, mk(1, range(1, 301), layers=8, events=False))
    raw = client.get("/api/v1/runs/run1/heatmap", params={"max_points": 300}).json()
    assert raw["bucket_width"] == 1
    monkeypatch.setattr(series, "RAW_ROWS_BUDGET", 8 * 300 - 1)
    h = client.get("/api/v1/runs/run1/heatmap", params={"max_points": 300}).json()
    assert h["bucket_width"] == 64 and h["steps"] == [1, 64, 128, 192, 256]
    for row, raw_row in zip(h["values"], raw["values"]):
        for k in range(len(h["steps"])):  # bucket k: steps [64k, 64k + 63] (block-aligned)
            assert row[k] == max(v for s, v in zip(raw["steps"], raw_row) if 64 * k <= s < 64 * (k + 1))
