"""POST /api/v1/ingest: storage, idempotency, ack semantics, non-finite round trips, bad input."""

from __future__ import annotations

import csv
import io
import json
import math

import pyarrow.parquet as pq

from gradwatch.agent import wire

SPECIAL = [math.nan, math.inf, -math.inf, 1.5]


def _special(s: int, i: int) -> float:
    return SPECIAL[(s + i) % len(SPECIAL)]


def test_batch_is_stored_and_readable(client, mk, post):
    r = post(client, mk(1, range(1, 6)))
    assert r.status_code == 200, r.text
    assert r.json() == {"run_id": "run1", "source": 0, "seq": 1, "acked": 1, "duplicate": False, "rows": 20}
    run = client.get("/api/v1/runs/run1").json()
    assert run["name"] == "test run" and run["last_step"] == 5 and run["layer_count"] == 4
    assert run["config"] == {"lr": 0.1} and run["tags"] == ["t"]
    page = client.get("/api/v1/runs/run1/layers").json()
    layers = page["data"]
    assert page["count"] == 4
    assert [la["name"] for la in layers] == ["layer.0", "layer.1", "layer.2", "layer.3"]
    assert layers[1]["shape"] == [2, 2] and layers[1]["dtype"] == "float32"
    s = client.get("/api/v1/runs/run1/stats", params={"layer": "layer.2", "stat": "l2"}).json()
    assert [p["value"] for p in s["series"][0]["points"]] == [1.2, 2.2, 3.2, 4.2, 5.2]
    ev = client.get("/api/v1/runs/run1/events").json()
    assert ev["count"] == 1 and ev["data"][0]["data"]["layers"] == ["layer.1"]


def test_nonfinite_values_round_trip_everywhere(client, mk, post):
    b = mk(1, range(1, 5), values=_special)
    steps = [wire.StepRecord(**{**{f: getattr(s, f) for f in s.__slots__}, "total_norm": SPECIAL[k],
                                "clip_coef": SPECIAL[(k + 1) % 4], "loss_scale": SPECIAL[(k + 2) % 4]})
             for k, s in enumerate(b.steps)]
    scal = [wire.ScalarRecord(s.step, s.time, {"loss": SPECIAL[k]}) for k, s in enumerate(b.steps)]
    b = wire.Batch(run=b.run, seq=1, layers=b.layers, steps=steps, scalars=scal)
    assert post(client, b).status_code == 200
    enc = wire.encode_float
    def derived(stat: str, v: float, n: int) -> float:  # var = m2/numel, std = sqrt(var), m2 = |v|·numel
        var = abs(v) * n / n
        return var if stat == "var" else math.sqrt(var) if var == var else var

    for stat in ("mean", "var", "std", "l2", "maxabs", "l2_post", "wnorm"):
        series = client.get("/api/v1/runs/run1/stats", params={"layer": "all", "stat": stat}).json()["series"]
        for ser in series:
            i = ser["layer"]
            want = [_special(s, i) if stat not in ("var", "std") else derived(stat, _special(s, i), 10 * (i + 1))
                    for s in range(1, 5)]
            assert [p["value"] for p in ser["points"]] == [enc(x) for x in want], (stat, i)
    pts = client.get("/api/v1/runs/run1/steps").json()["points"]
    assert [p["total_norm"] for p in pts] == [enc(x) for x in SPECIAL]
    assert [p["loss_scale"] for p in pts] == [enc(SPECIAL[(k + 2) % 4]) for k in range(4)]
    sc = client.get("/api/v1/runs/run1/scalars", params={"key": "loss"}).json()
    assert [p["value"] for p in sc["points"]] == [enc(x) for x in SPECIAL]
    # CSV spells them like the wire; Parquet holds IEEE values.
    text = client.get("/api/v1/runs/run1/export", params={"format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 16
    for row in rows:
        want = enc(_special(int(row["step"]), int(row["layer"])))
        assert row["l2"] == str(want) and row["l2_post"] == str(want)
    raw = client.get("/api/v1/runs/run1/export", params={"format": "parquet"}).content
    t = pq.read_table(io.BytesIO(raw)).to_pylist()
    assert len(t) == 16
    for row in t:
        want = _special(row["step"], row["layer"])
        got = row["mean"]
        assert (math.isnan(got) and math.isnan(want)) or got == want


def test_resent_batch_changes_nothing(client, mk, post):
    b = mk(1, range(1, 4))
    assert post(client, b).json()["duplicate"] is False
    before = client.get("/api/v1/runs/run1/export", params={"table": "layer_stats"}).text
    r = post(client, b)
    assert r.status_code == 200
    assert r.json() == {"run_id": "run1", "source": 0, "seq": 1, "acked": 1, "duplicate": True, "rows": 0}
    assert client.get("/api/v1/runs/run1/export", params={"table": "layer_stats"}).text == before
    assert client.get("/api/v1/runs/run1/events").json()["count"] == 1
    assert "gradwatch_ingest_duplicate_batches_total 1" in client.get("/metrics").text


def test_acked_is_highest_contiguous_seq_per_source(client, mk, post):
    assert post(client, mk(2, [4, 5])).json()["acked"] == 0
    assert post(client, mk(3, [6])).json()["acked"] == 0
    assert client.get("/api/v1/ingest/ack", params={"run_id": "run1", "source": 0}).json()["acked"] == 0
    assert post(client, mk(1, [1, 2, 3])).json()["acked"] == 3
    assert post(client, mk(5, [9])).json()["acked"] == 3
    # another source has its own sequence
    assert post(client, mk(1, [1], source=1)).json()["acked"] == 1
    assert client.get("/api/v1/ingest/ack", params={"run_id": "run1", "source": 0}).json() == {
        "run_id": "run1", "source": 0, "acked": 3}
    assert client.get("/api/v1/ingest/ack", params={"run_id": "nope", "source": 0}).json()["acked"] == 0


def test_overlapping_rows_under_a_new_seq_keep_the_first_write(client, mk, post):
    assert post(client, mk(1, [1, 2], values=lambda s, i: 1.0)).status_code == 200
    r = post(client, mk(2, [2, 3], values=lambda s, i: 2.0))
    assert r.status_code == 200 and r.json()["acked"] == 2
    pts = client.get("/api/v1/runs/run1/stats", params={"layer": "0"}).json()["series"][0]["points"]
    assert [(p["step"], p["value"]) for p in pts] == [(1, 1.0), (2, 1.0), (3, 2.0)]


def test_status_and_explicit_run_creation(client, mk, post):
    r = client.post("/api/v1/runs", json={"run_id": "explicit", "project": "p", "name": "n", "tags": ["a"]})
    assert r.status_code == 201 and r.json()["status"] == "running"
    assert client.post("/api/v1/runs", json={"run_id": "explicit"}).status_code == 409
    assert post(client, mk(1, [1], run_id="explicit", project="p", status="finished")).status_code == 200
    assert client.get("/api/v1/runs/explicit").json()["status"] == "finished"
    r = post(client, mk(2, [2], run_id="explicit", project="other"))
    assert r.status_code == 409 and "project" in r.json()["detail"]


def test_malformed_payloads_get_4xx_and_lose_nothing(client, mk, post):
    assert post(client, mk(1, [1, 2])).status_code == 200
    before = client.get("/api/v1/runs/run1/export").text
    good = wire.batch_to_dict(mk(2, [3]))
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 422, "batch: expected an object"),
        (json.dumps({**good, "wire_version": 99}).encode(), 422, "wire version"),
        (json.dumps({**good, "seq": "two"}).encode(), 422, "batch.seq"),
        (json.dumps({**good, "steps": [{**good["steps"][0], "layers": {**good["steps"][0]["layers"],
                                                                      "l2": [1.0]}}]}).encode(),
         422, "batch.steps[0].layers.l2"),
        (json.dumps({**good, "steps": [{**good["steps"][0], "step": -1}]}).encode(), 422, "batch.steps[0].step"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
    ]
    for body, status, needle in cases:
        r = client.post("/api/v1/ingest", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body[:60], r.text)
        assert needle in r.json()["detail"], (needle, r.json())
    assert client.get("/api/v1/runs/run1/export").text == before
    m = client.get("/metrics").text
    assert 'gradwatch_ingest_errors_total{kind="json"} 3' in m
    assert 'gradwatch_ingest_errors_total{kind="schema"} 5' in m


def test_oversized_body_is_413(make_settings, mk):
    from fastapi.testclient import TestClient

    from gradwatch.server.app import create_app

    with TestClient(create_app(make_settings(max_body_bytes=2000))) as c:
        big = wire.encode_batch(mk(1, range(1, 50)))
        assert len(big) > 2000
        r = c.post("/api/v1/ingest", content=big)
        assert r.status_code == 413 and "limit of 2000" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while streaming
            yield big[:1500]
            yield big[1500:]

        r = c.post("/api/v1/ingest", content=chunks())
        assert r.status_code == 413
        assert c.get("/api/v1/runs").json()["count"] == 0
