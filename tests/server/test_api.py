"""The REST API: runs, series with downsampling, heatmap, events, export, auth, health, metrics."""

from __future__ import annotations

import io
import math

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from gradwatch.agent import wire
from gradwatch.server.app import create_app


def _spiky(s: int, i: int) -> float:
    return 1000.0 if (s == 4321 and i == 1) else 1.0 + (s % 7) / 10


@pytest.fixture
def long_run(client, mk, post):
    """5,000 steps × 4 layers, one spike at step 4321 on layer 1, skipped steps every 1000."""
    for k, start in enumerate(range(1, 5001, 500)):
        r = post(client, mk(k + 1, range(start, start + 500), values=_spiky, events=False,
                            skipped=lambda s: s % 1000 == 0))
        assert r.status_code == 200
    return client


def test_downsampling_keeps_spikes_min_max_and_mean(long_run):
    c = long_run
    r = c.get("/api/v1/runs/run1/stats", params={"layer": ["layer.1", "0"], "stat": "l2", "max_points": 100})
    assert r.status_code == 200
    s1, s0 = r.json()["series"]
    assert s1["name"] == "layer.1" and s0["layer"] == 0
    b = s1["buckets"]
    assert s1["downsampled"] and len(b) == 100 and s1["bucket_width"] == 50
    assert sum(x["count"] for x in b) == 5000
    spike = [x for x in b if x["step_min"] <= 4321 <= x["step_max"]][0]
    assert spike["max"] == 1000.0 and spike["min"] == 1.0
    vals = [_spiky(s, 1) for s in range(spike["step_min"], spike["step_max"] + 1)]
    assert spike["mean"] == pytest.approx(sum(vals) / len(vals))
    assert max(x["max"] for x in s0["buckets"]) < 2
    # a range that fits returns raw points
    r = c.get("/api/v1/runs/run1/stats", params={"layer": "1", "start": 4320, "end": 4322, "max_points": 10})
    pts = r.json()["series"][0]["points"]
    assert [(p["step"], p["value"]) for p in pts] == [(4320, _spiky(4320, 1)), (4321, 1000.0),
                                                     (4322, _spiky(4322, 1))]


def test_heatmap_many_layers_at_once(long_run):
    r = long_run.get("/api/v1/runs/run1/heatmap", params={"layers": "all", "stat": "l2", "max_points": 50})
    h = r.json()
    assert [la["name"] for la in h["layers"]] == ["layer.0", "layer.1", "layer.2", "layer.3"]
    nb = len(h["steps"])
    assert 0 < nb <= 50 and all(len(row) == nb for row in h["values"]) and h["steps"][0] == 1
    col = [k for k, s in enumerate(h["steps"]) if s <= 4321 < s + h["bucket_width"]][0]
    assert h["values"][1][col] == 1000.0 and h["values"][0][col] < 2
    r = long_run.get("/api/v1/runs/run1/heatmap", params={"layers": ["layer.3", "layer.2"], "agg": "mean",
                                                          "max_points": 10, "start": 1, "end": 100})
    h = r.json()
    assert [la["index"] for la in h["layers"]] == [3, 2] and len(h["values"][0]) == 10


def test_steps_series_and_skipped_filter(long_run):
    c = long_run
    sk = c.get("/api/v1/runs/run1/steps", params={"skipped": "true"}).json()
    assert [p["step"] for p in sk["points"]] == [1000, 2000, 3000, 4000, 5000]
    ds = c.get("/api/v1/runs/run1/steps", params={"fields": "total_norm,loss_scale", "max_points": 10}).json()
    assert ds["downsampled"] and len(ds["buckets"]) == 10
    b0 = ds["buckets"][0]
    assert b0["total_norm"]["min"] == 1.0 and b0["total_norm"]["max"] == 500.0 and b0["skipped"] == 0
    assert sum(b["skipped"] for b in ds["buckets"]) == 5 and "clip_coef" not in b0
    assert c.get("/api/v1/runs/run1/steps", params={"fields": "bogus"}).status_code == 422


def test_events_by_kind_and_range(client, mk, post):
    b = mk(1, range(1, 20), events=False)
    evs = [wire.Event(k, s, float(s), data={"layers": [f"layer.{s % 4}"]})
           for s, k in [(2, "overflow"), (5, "clip"), (9, "overflow"), (15, "spike")]]
    post(client, wire.Batch(run=b.run, seq=1, layers=b.layers, steps=b.steps, events=evs))
    r = client.get("/api/v1/runs/run1/events", params={"kind": "overflow"}).json()
    assert [e["step"] for e in r["data"]] == [2, 9] and r["data"][1]["data"]["layers"] == ["layer.1"]
    r = client.get("/api/v1/runs/run1/events", params={"kind": ["clip", "spike"], "start": 6}).json()
    assert [e["kind"] for e in r["data"]] == ["spike"]
    r = client.get("/api/v1/runs/run1/events", params={"limit": 2, "offset": 1}).json()
    assert r["count"] == 4 and [e["step"] for e in r["data"]] == [5, 9]
    # end is inclusive, alone or with start and kind
    r = client.get("/api/v1/runs/run1/events", params={"end": 9}).json()
    assert r["count"] == 3 and [e["step"] for e in r["data"]] == [2, 5, 9]
    r = client.get("/api/v1/runs/run1/events", params={"end": 8}).json()
    assert [e["step"] for e in r["data"]] == [2, 5]
    r = client.get("/api/v1/runs/run1/events", params={"start": 5, "end": 9, "kind": "overflow"}).json()
    assert r["count"] == 1 and [e["step"] for e in r["data"]] == [9]
    assert client.get("/api/v1/runs/run1/events", params={"end": 1}).json() == {
        "data": [], "count": 0, "limit": 1000, "offset": 0}


def test_runs_list_filter_page_patch_delete(client, mk, post):
    for k, (rid, proj) in enumerate([("a1", "alpha"), ("a2", "alpha"), ("b1", "beta")]):
        post(client, mk(1, [1], run_id=rid, project=proj, name=f"Name-{rid}", status="finished" if k == 2 else None))
    page = client.get("/api/v1/runs", params={"project": "alpha"}).json()
    assert page["count"] == 2 and {r["run_id"] for r in page["data"]} == {"a1", "a2"}
    assert client.get("/api/v1/runs", params={"status": "finished"}).json()["data"][0]["run_id"] == "b1"
    assert client.get("/api/v1/runs", params={"name": "name-A2"}).json()["data"][0]["run_id"] == "a2"
    assert client.get("/api/v1/runs", params={"name": "%"}).json()["count"] == 0
    p1 = client.get("/api/v1/runs", params={"limit": 2}).json()
    p2 = client.get("/api/v1/runs", params={"limit": 2, "offset": 2}).json()
    assert p1["count"] == 3 and len(p1["data"]) == 2 and len(p2["data"]) == 1
    r = client.patch("/api/v1/runs/a1", json={"name": "renamed", "tags": ["x", "y"], "notes": "hello"})
    assert r.status_code == 200 and r.json()["name"] == "renamed" and r.json()["tags"] == ["x", "y"]
    r = client.patch("/api/v1/runs/a1", json={"notes": "only notes"}).json()
    assert r["name"] == "renamed" and r["notes"] == "only notes"
    assert client.patch("/api/v1/runs/a1", json={"bogus": 1}).status_code == 422
    assert client.patch("/api/v1/runs/zz", json={"name": "x"}).status_code == 404
    assert client.delete("/api/v1/runs/a1").status_code == 204
    assert client.get("/api/v1/runs/a1").status_code == 404
    assert client.get("/api/v1/ingest/ack", params={"run_id": "a1"}).json()["acked"] == 0
    assert client.delete("/api/v1/runs/a1").status_code == 404
    assert client.get("/api/v1/runs").json()["count"] == 2
    # a deleted run can be streamed again from scratch
    assert post(client, mk(1, [1], run_id="a1", project="alpha")).json()["duplicate"] is False


@pytest.mark.parametrize("path,params,status", [
    ("/api/v1/runs/nope", {}, 404),
    ("/api/v1/runs/nope/layers", {}, 404),
    ("/api/v1/runs/nope/stats", {}, 404),
    ("/api/v1/runs/run1/stats", {"max_points": -1}, 422),
    ("/api/v1/runs/run1/stats", {"max_points": 0}, 422),
    ("/api/v1/runs/run1/stats", {"stat": "bogus"}, 422),
    ("/api/v1/runs/run1/stats", {"layer": "no.such.layer"}, 404),
    ("/api/v1/runs/run1/stats", {"start": "x"}, 422),
    ("/api/v1/runs/run1/heatmap", {"agg": "median"}, 422),
    ("/api/v1/runs/run1/events", {"limit": 0}, 422),
    ("/api/v1/runs/run1/export", {"format": "xlsx"}, 422),
    ("/api/v1/runs/bad%20id", {}, 422),
    ("/api/v1/runs", {"project": "a\x00b"}, 422),
])
def test_bad_queries_are_4xx_with_a_message(client, mk, post, path, params, status):
    post(client, mk(1, [1, 2]))
    r = client.get(path, params=params)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]


@pytest.mark.parametrize("table", ["layer_stats", "steps", "events", "scalars"])
def test_export_tables_csv_and_parquet(client, mk, post, table):
    post(client, mk(1, range(1, 11)))
    csv_text = client.get("/api/v1/runs/run1/export", params={"table": table}).text
    lines = csv_text.strip().splitlines()
    want = {"layer_stats": 40, "steps": 10, "events": 1, "scalars": 20}[table]
    assert len(lines) == want + 1
    r = client.get("/api/v1/runs/run1/export", params={"table": table, "format": "parquet"})
    assert r.headers["content-type"].startswith("application/vnd.apache.parquet")
    t = pq.read_table(io.BytesIO(r.content))
    assert t.num_rows == want and t.column_names == lines[0].split(",")


def test_export_streams_in_chunks(make_settings, mk, post):
    with TestClient(create_app(make_settings(export_chunk_rows=7))) as c:
        post(c, mk(1, range(1, 26)))
        with c.stream("GET", "/api/v1/runs/run1/export", params={"table": "layer_stats"}) as r:
            parts = list(r.iter_raw())
        body = b"".join(parts).decode().strip().splitlines()
        assert len(body) == 101
        assert [int(x.split(",")[2]) for x in body[1:26]] == list(range(1, 26))


def test_auth_tokens_401_403_and_open_health(make_settings, mk, post):
    with TestClient(create_app(make_settings(token="w-tok", read_token="r-tok"))) as c:
        w = {"Authorization": "Bearer w-tok"}
        r_ = {"Authorization": "Bearer r-tok"}
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/api/v1/runs").status_code == 401
        assert c.get("/api/v1/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert post(c, mk(1, [1])).status_code == 401
        assert post(c, mk(1, [1]), headers=r_).status_code == 403
        assert c.delete("/api/v1/runs/run1", headers=r_).status_code == 403
        assert post(c, mk(1, [1]), headers=w).status_code == 200
        assert c.get("/api/v1/runs/run1", headers=r_).status_code == 200
        assert c.patch("/api/v1/runs/run1", json={"name": "x"}, headers=r_).status_code == 403
        assert c.patch("/api/v1/runs/run1", json={"name": "x"}, headers=w).status_code == 200
        m = c.get("/metrics", headers=r_)
        assert m.status_code == 200 and "gradwatch_ingest_rows_total 4" in m.text
        assert "gradwatch_ingest_seconds_count 1" in m.text
        assert 'gradwatch_ingest_errors_total{kind="schema"}' not in m.text
        # a rejected batch shows up as a labelled sample, and counts up
        for n in (1, 2):
            assert c.post("/api/v1/ingest", content=b'{"wire_version": 1}', headers=w).status_code == 422
            assert f'\ngradwatch_ingest_errors_total{{kind="schema"}} {n}\n' in c.get("/metrics", headers=r_).text
        m = c.get("/metrics", headers=r_).text
        assert "gradwatch_ingest_rows_total 4" in m and "gradwatch_ingest_seconds_count 1" in m


def test_openapi_lists_the_contract_paths(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/v1/runs", "/api/v1/runs/{run_id}", "/api/v1/runs/{run_id}/layers", "/api/v1/runs/{run_id}/steps",
              "/api/v1/runs/{run_id}/stats", "/api/v1/runs/{run_id}/events", "/api/v1/runs/{run_id}/export",
              "/api/v1/ingest", "/healthz", "/metrics"):
        assert p in paths, p
    assert set(paths["/api/v1/runs/{run_id}"]) == {"get", "patch", "delete"}


def test_step_nan_flags_are_not_confused_with_missing(client, mk, post):
    b = mk(1, [1, 2])
    st = [wire.StepRecord(step=1, time=1.0, total_norm=math.nan), wire.StepRecord(step=2, time=2.0)]
    post(client, wire.Batch(run=b.run, seq=1, steps=st))
    pts = client.get("/api/v1/runs/run1/steps").json()["points"]
    assert pts[0]["total_norm"] == "NaN" and pts[1]["total_norm"] is None
