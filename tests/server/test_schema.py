"""The declared spec reaches the API: transform values as data, bounded statements for /stats and
/heatmap, response models in /openapi.json, one list envelope, Parquet row groups (both databases)."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import event

from gradwatch.agent import wire
from gradwatch.agent.spec import LAYER_FIELDS, STEP_FIELDS


def _with_transforms(b: wire.Batch) -> wire.Batch:
    steps = []
    for s in b.steps:
        tr = {"zclip": {"threshold": 1.0 + s.step, "coef": math.nan if s.step == 3 else 0.5,
                        "z": math.inf if s.step == 4 else float(s.step)},
              "agc": {"min_coef": [0.5] * len(s.layer_ids)}}
        steps.append(dataclasses.replace(s, transforms=tr))
    return dataclasses.replace(b, steps=steps)


def test_transform_values_are_served_downsampled_live_and_exported(client, mk, post):
    with client.websocket_connect("/api/v1/runs/run1/live") as ws:
        assert ws.receive_json()["type"] == "subscribed"
        assert post(client, _with_transforms(mk(1, range(1, 201)))).status_code == 200
        live = ws.receive_json()
    assert live["steps"][2]["transforms"] == {"zclip": {"threshold": 4.0, "coef": "NaN", "z": 3.0}}
    assert live["steps"][3]["transforms"]["zclip"]["z"] == "Infinity"
    r = client.get("/api/v1/runs/run1/transforms").json()
    assert r == {"run_id": "run1", "transforms": {"zclip": ["coef", "threshold", "z"]}}  # lists stay in the JSON
    raw = client.get("/api/v1/runs/run1/transforms", params={"transform": "zclip", "fields": "coef,z",
                                                            "end": 5}).json()
    coef, z = raw["series"]
    assert coef["field"] == "coef" and not coef["downsampled"]
    assert [p["value"] for p in coef["points"]] == [0.5, 0.5, "NaN", 0.5, 0.5]
    assert [p["value"] for p in z["points"]] == [1.0, 2.0, 3.0, "Infinity", 5.0]
    down = client.get("/api/v1/runs/run1/transforms", params={"transform": "zclip", "fields": "threshold",
                                                             "max_points": 10}).json()["series"][0]
    assert down["downsampled"] and len(down["buckets"]) == 10
    b0 = down["buckets"][0]
    assert (b0["step_min"], b0["step_max"], b0["min"], b0["max"], b0["count"]) == (1, 20, 2.0, 21.0, 20)
    assert b0["mean"] == sum(range(2, 22)) / 20
    bad = client.get("/api/v1/runs/run1/transforms", params={"transform": "zclip", "fields": "nope"})
    assert bad.status_code == 422 and "nope" in bad.json()["detail"]
    text = client.get("/api/v1/runs/run1/export", params={"table": "transforms", "format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 600 and {r["field"] for r in rows} == {"coef", "threshold", "z"}
    assert [r["value"] for r in rows if r["field"] == "coef" and r["step"] == "3"] == ["NaN"]


def _count_statements(client: Any) -> list[str]:
    seen: list[str] = []
    engine = client.app.state.gw.db.engine
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_stats_and_heatmap_take_the_same_statements_for_5_or_200_layers(client, mk, post):
    for run, layers in (("few", 5), ("many", 200)):
        assert post(client, mk(1, range(1, 400), run_id=run, layers=layers, events=False)).status_code == 200
    seen = _count_statements(client)
    counts: dict[tuple[str, str], int] = {}
    for run in ("few", "many"):
        for path, params in (("stats", {"layer": "all", "stat": "var", "max_points": 5}),
                             ("stats", {"layer": "all", "stat": "l2"}),
                             ("stats", {"layer": "all", "stat": "std", "max_points": 50}),
                             ("heatmap", {"stat": "l2", "max_points": 5})):
            del seen[:]
            r = client.get(f"/api/v1/runs/{run}/{path}", params=params)
            assert r.status_code == 200, r.text
            counts[run, f"{path}{sorted(params.items())}"] = len(seen)
    for (run, key), n in counts.items():
        if run == "many":
            assert n == counts["few", key] <= 10, (key, n, counts["few", key])


def test_openapi_describes_every_data_endpoint_with_the_spec(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/v1/runs/{run_id}/stats", "/api/v1/runs/{run_id}/heatmap", "/api/v1/runs/{run_id}/steps",
                 "/api/v1/runs/{run_id}/scalars", "/api/v1/runs/{run_id}/transforms", "/api/v1/runs/{run_id}/layers"):
        ok = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in ok, path
    schemas = spec["components"]["schemas"]
    assert set(schemas["LayerPage"]["properties"]) == {"data", "count"}
    stat_doc = schemas["StatsResponse"]["properties"]["stat"]["description"]
    for f in LAYER_FIELDS:
        if f.name != "m2":
            assert f.doc in stat_doc, f.name
    for f in STEP_FIELDS:
        assert schemas["StepPoint"]["properties"][f.name]["description"].startswith(f.doc)


def test_parquet_export_is_written_in_bounded_row_groups(client, mk, post):
    for k in range(3):  # 3 × 300 steps × 100 layers = 90,000 rows
        assert post(client, mk(k + 1, range(1 + 300 * k, 301 + 300 * k), layers=100, events=False)).status_code == 200
    raw = client.get("/api/v1/runs/run1/export", params={"format": "parquet"}).content
    csv_len = len(client.get("/api/v1/runs/run1/export", params={"format": "csv"}).content)
    meta = pq.ParquetFile(io.BytesIO(raw)).metadata
    assert meta.num_rows == 90_000
    assert meta.num_row_groups == 2  # 50,000 + 40,000 (SQLite's driver hands over one row at a time)
    assert len(raw) < csv_len


def test_a_version_1_batch_uploads_and_reads_back_the_same(client, mk):
    """What an earlier agent spooled or wrote to a .gwrec file (wire version 1: finished var/std)
    still uploads; /stats answers the var and std it was sent with."""
    import json

    d = wire.batch_to_dict(mk(1, range(1, 4), layers=2, events=False))
    d["wire_version"] = 1
    for st in d["steps"]:
        cols = st["layers"]
        n = len(st["layer_ids"])
        cols.pop("m2"), cols.pop("wnorm")
        cols["var"] = [0.25 * (k + 1) for k in range(n)]
        cols["std"] = [math.sqrt(0.25 * (k + 1)) for k in range(n)]
    r = client.post("/api/v1/ingest", content=json.dumps(d))
    assert r.status_code == 200, r.text
    for stat, want in (("var", [0.25, 0.5]), ("std", [0.5, math.sqrt(0.5)]), ("wnorm", [None, None])):
        series = client.get("/api/v1/runs/run1/stats", params={"layer": "all", "stat": stat}).json()["series"]
        for k, ser in enumerate(series):
            got = [p["value"] for p in ser["points"]]
            assert got == [want[k]] * 3 if want[k] is None else got == [pytest.approx(want[k], rel=1e-15)] * 3, stat


def test_a_negative_m2_is_refused_with_a_clear_message(client, mk, post):
    b = mk(1, [1], layers=2)
    s = dataclasses.replace(b.steps[0], layers={**b.steps[0].layers, "m2": [1.0, -2.0]})
    r = post(client, dataclasses.replace(b, steps=[s]))
    assert r.status_code == 422 and "m2" in r.json()["detail"] and "negative" in r.json()["detail"]
