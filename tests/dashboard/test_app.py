"""The dashboard mounted on the real app (in-process, startup run by ``with TestClient``): unknown
API paths stay JSON, docs load no CDN asset, callbacks read the API and explain errors."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gradwatch.dashboard.app import mount
from gradwatch.server.app import create_app
from gradwatch.server.settings import ServerSettings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(ServerSettings(database_url=f"sqlite:///{tmp_path / 'gw.db'}"), dashboard=mount)
    with TestClient(app) as c:
        yield c


def callback(c: TestClient, outputs: list[tuple[str, str]], inputs: list[tuple[str, str, Any]],
             state: list[tuple[str, str, Any]] = (), changed: str | None = None) -> Any:  # type: ignore[assignment]
    """One Dash callback over HTTP, as the renderer sends it: the callback is found in
    ``/_dash-dependencies`` by its outputs and by the input that fired (``changed``; default the
    first given), and its inputs and state are filled from the values given. ``None`` when the
    callback updated nothing (204)."""
    values = {f"{i}.{p}": v for i, p, v in [*inputs, *state]}
    changed = changed or f"{inputs[0][0]}.{inputs[0][1]}"
    want = "...".join(f"{i}.{p}" for i, p in outputs)
    deps = [d for d in c.get("/_dash-dependencies").json()
            if "...".join(o.split("@")[0] for o in d["output"].strip(".").split("...")) == want
            and any(f"{x['id']}.{x['property']}" == changed for x in d["inputs"])]
    assert len(deps) == 1, (want, changed, len(deps))
    dep = deps[0]

    def fill(xs: list[dict[str, str]]) -> list[dict[str, Any]]:
        return [{"id": x["id"], "property": x["property"], "value": values.get(f"{x['id']}.{x['property']}")}
                for x in xs]

    body = {"output": dep["output"], "inputs": fill(dep["inputs"]), "state": fill(dep["state"]),
            "changedPropIds": [changed]}
    outs = [{"id": o.split("@")[0].rsplit(".", 1)[0], "property": o.split("@")[0].rsplit(".", 1)[1]}
            for o in dep["output"].strip(".").split("...")]
    body["outputs"] = outs if len(outs) > 1 else outs[0]  # a single Output is sent as one object
    r = c.post("/_dash-update-component", json=body)
    if r.status_code == 204:
        return None
    assert r.status_code == 200, r.text
    return r.json()["response"]


@pytest.mark.parametrize("path", ["/api/v1/does-not-exist", "/api/v1/runs/x/nothing", "/api/v2/runs", "/api/"])
def test_unknown_api_paths_answer_404_json_not_the_dashboard(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert "no such API path" in r.json()["detail"]


def test_known_path_wrong_method_keeps_405_and_pages_are_html(client: TestClient) -> None:
    assert client.get("/api/v1/ingest").status_code == 405
    assert client.get("/api/v1/runs").json()["count"] == 0
    for page in ("/", "/runs/abc", "/compare?runs=a,b"):
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "_dash-config" in r.text


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_only_local_assets(client: TestClient, page: str) -> None:
    html = client.get(page).text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url:\s*'([^']+)'", html)
    assert urls, html[:500]
    assert not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
    for u in urls:
        if u.startswith("/static/"):
            assert client.get(u).status_code == 200, u


def test_dashboard_assets_served_locally(client: TestClient) -> None:
    html = client.get("/runs/abc").text  # the first request: a shared run link, not "/"
    assert "/assets/live.js" in html and "/assets/style.css" in html
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert scripts and not [s for s in scripts if s.startswith(("http", "//"))]
    assert "gradwatchLive" in client.get("/assets/live.js").text


def test_runs_callback_empty_state_names_this_server(client: TestClient) -> None:
    out = callback(client, [("runs-table", "data"), ("runs-error", "children"), ("runs-empty", "children")],
                   [("runs-refresh", "n_intervals", 1)])
    assert out["runs-table"]["data"] == []
    text = str(out["runs-empty"]["children"])
    assert "No runs yet" in text and 'server="http://testserver"' in text


def test_run_page_for_a_missing_run_says_so(client: TestClient) -> None:
    out = callback(client, [("run-title", "children"), ("run-status", "children"), ("run-error", "children")],
                   [("status-refresh", "n_intervals", 1), ("run-id", "data", "nope")])
    assert "run 'nope' not found" in str(out["run-error"]["children"])
    for gid in CHARTS:
        got = chart(client, gid, "nope")
        assert "not found" in str(got["layout"]["annotations"]), gid
    got = callback(client, [("step-stat-graph", "figure")], [("step-stat", "value", "noise_scale"), ("run-id", "data", "nope"),
                                                             ("theme", "data", "light"), ("reset-zoom", "n_clicks", None)])
    text = got["step-stat-graph"]["figure"]["layout"]["annotations"][0]["text"]
    assert text == "run 'nope' not found.", text  # not "not recorded in this run"


def _ingest(c: TestClient, steps: int = 5, wnorm: bool = True, run: str = "r1") -> None:
    """One batch of a 3-layer run ``run``: layer 1 holds NaN at step 2, an overflow event there;
    weight norms 10 (``wnorm``) or not measured."""
    from gradwatch.agent import wire

    recs = []
    for s in range(steps):
        v = [1.0, math.nan if s == 2 else 2.0, 10.0 ** s]
        recs.append(wire.StepRecord(step=s, time=1000.0 + s, rank=0, layer_ids=[0, 1, 2],
                                    layers={"numel": [4, 4, 4], "mean": v, "m2": [4 * x for x in v], "l2": v,
                                            "maxabs": v, "nonfinite": [0, 3 if s == 2 else 0, 0], "l2_post": v,
                                            "wnorm": [10.0, 10.0, 10.0] if wnorm else [None] * 3},
                                    total_norm=float(s + 1), total_norm_post=1.0, clip_coef=1.0, loss_scale=1024.0,
                                    skipped=s == 2))
    batch = wire.Batch(run=wire.RunInfo(run_id=run, project="p", name="run one", config={}, tags=[]), seq=1,
                       source=0, sent_at=time.time(),
                       layers=[wire.LayerInfo(i, f"block{i}.weight", [4], "float32") for i in range(3)], steps=recs,
                       scalars=[wire.ScalarRecord(s, 1000.0 + s, {"loss": 1.0 / (s + 1)}, rank=0) for s in range(steps)],
                       events=[wire.Event("overflow", 2, 1002.0, rank=0, data={
                           "layers": ["block1.weight"], "scale_before": 2048.0, "scale_after": 1024.0})])
    r = c.post("/api/v1/ingest", content=wire.encode_batch(batch), headers={"Content-Type": "application/json"})
    assert r.status_code < 300, r.text


def heat(c: TestClient, run: str, stat: str, pattern: str | None = None, theme: str = "light",
         width: int | None = 1400, depth: int = 0, relayout: dict[str, Any] | None = None,
         reset: int | None = None, changed: str | None = None) -> Any:
    """The heatmap callback (outputs: figure, regex error, layer options) in a ``width`` px window."""
    return callback(c, [("heatmap", "figure"), ("regex-error", "children"), ("layer-select", "options")],
                    [("run-id", "data", run), ("heatmap-stat", "value", stat), ("layer-regex", "value", pattern),
                     ("theme", "data", theme), ("reset-zoom", "n_clicks", reset), ("group-depth", "value", depth),
                     ("heatmap-zoom", "data", relayout)], [("viewport", "data", width)], changed)


#: The step-level charts, each its own callback (inputs: run, theme, reset, its zoom store).
CHARTS = ("norm-graph", "scale-graph", "scalars-graph", "transforms-graph")


def chart(c: TestClient, gid: str, run: str, relayout: dict[str, Any] | None = None, reset: int | None = None,
          changed: str | None = None) -> Any:
    out = callback(c, [(gid, "figure")], [("run-id", "data", run), ("theme", "data", "light"),
                                          ("reset-zoom", "n_clicks", reset), (f"{gid}-zoom", "data", relayout)],
                   changed=changed)
    return (out or {}).get(gid, {}).get("figure")  # None: the callback updated nothing


def test_run_page_callbacks_read_the_api(client: TestClient) -> None:
    _ingest(client)
    hm = heat(client, "r1", "l2", theme="dark")
    f = hm["heatmap"]["figure"]
    assert f["data"][0]["y"] == ["block0.weight", "block1.weight", "block2.weight"]
    assert f["data"][1]["z"][2] == [None, 1, None]  # the NaN cell, in its own colour
    assert f["layout"]["meta"]["last_step"] == 4 and f["layout"]["paper_bgcolor"] == "#1c1e24"
    assert [o["value"] for o in hm["layer-select"]["options"]] == f["data"][0]["y"]
    ratio = heat(client, "r1", "ratio")
    # ‖g‖/‖w‖ with ‖w‖ = 10: log10 of l2 / 10; the live script does not extend it
    assert ratio["heatmap"]["figure"]["data"][0]["z"][3] == [-1.0, round(math.log10(0.2), 4), 2.0]
    assert ratio["heatmap"]["figure"]["layout"]["meta"]["live"] is False
    _ingest(client, wnorm=False, run="r2")  # an agent that sent no weight norms: an explanation, not an error
    none = heat(client, "r2", "ratio")
    assert "No weight norms in this run" in str(none["heatmap"]["figure"]["layout"]["annotations"])
    bad = heat(client, "r1", "nonfinite", pattern="(")
    assert "invalid regex" in bad["regex-error"]["children"]
    assert bad["heatmap"]["figure"]["data"][0]["z"][2] == [0, 3, 0]
    out = callback(client, [("events-store", "data"), ("snapshot", "data")],
                   [("run-id", "data", "r1"), ("reset-zoom", "n_clicks", None)])
    assert out["snapshot"]["data"]["last_step"] == 4
    figs = {gid: chart(client, gid, "r1") for gid in CHARTS}
    assert figs["norm-graph"]["data"][0]["y"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    overflow = next(t for t in figs["scale-graph"]["data"] if t["name"] == "overflow")
    assert overflow["x"] == [2] and "block1.weight" in overflow["text"][0]
    assert figs["scalars-graph"]["data"][0]["name"] == "loss"
    assert all(figs[g]["layout"]["meta"]["last_step"] == 4 for g in ("norm-graph", "scale-graph", "scalars-graph"))
    rows = callback(client, [("events-table", "data")], [("events-store", "data", out["events-store"]["data"]),
                                                          ("event-kinds", "value", ["overflow"])])
    assert rows["events-table"]["data"][0]["detail"].endswith("layers: block1.weight")
    series = callback(client, [("layer-graph", "figure")], [("layer-select", "value", "block2.weight"),
                                                             ("run-id", "data", "r1"), ("theme", "data", "light"),
                                                             ("layer-graph-zoom", "data", None),
                                                             ("reset-zoom", "n_clicks", None)])
    assert series["layer-graph"]["figure"]["data"][0]["y"] == [1.0, 10.0, 100.0, 1000.0, 10000.0]
    # the live script extends each statistic's mean line from the stream: which trace, which field
    # of which layer, from which step on, and the per-layer fields to subscribe to
    lf = series["layer-graph"]["figure"]
    meta = lf["layout"]["meta"]
    layers = {la["name"]: la["index"] for la in client.get("/api/v1/runs/r1/layers").json()["data"]}
    assert meta["last_step"] == 4 and meta["layer_index"] == [layers["block2.weight"]]
    assert meta["live_stats"] == ["l2", "std", "var", "maxabs"]
    for (trace, path), stat in zip(meta["live_traces"], meta["live_stats"]):
        assert lf["data"][trace]["name"].split(" ")[0] == stat  # its mean line ("std (pooled)" when pooled)
        assert path == ["layers", stat, {"layer": layers["block2.weight"]}]


def test_runs_list_counts_events_per_run(client: TestClient) -> None:
    _ingest(client)
    run = client.get("/api/v1/runs").json()["data"][0]
    assert (run["overflows"], run["skipped"], run["clips"], run["nonfinite"]) == (1, 0, 0, 0)
    rows = callback(client, [("runs-table", "data"), ("runs-error", "children"), ("runs-empty", "children")],
                    [("runs-refresh", "n_intervals", 1)])
    assert rows["runs-table"]["data"][0]["overflows"] == 1 and rows["runs-empty"]["children"] is None


def test_login_cookie_is_the_bearer_token_and_read_only_stays_read_only(tmp_path: Path) -> None:
    settings = ServerSettings(database_url=f"sqlite:///{tmp_path / 'gw.db'}", token="w-secret", read_token="r-secret")
    with TestClient(create_app(settings, dashboard=mount)) as c:
        assert c.get("/api/v1/runs").status_code == 401
        assert "Token" in c.get("/dashboard/login").text
        runs_cb = ([("runs-table", "data"), ("runs-error", "children"), ("runs-empty", "children")],
                   [("runs-refresh", "n_intervals", 1)])
        assert "Sign in with a token" in str(callback(c, *runs_cb)["runs-error"]["children"])
        # a wrong token: the form again with a message, no cookie
        bad = c.post("/dashboard/login", data={"token": "nope"}, follow_redirects=False)
        assert bad.status_code == 401 and "not valid" in bad.text and "set-cookie" not in bad.headers
        # the read token: an HttpOnly, SameSite=Strict cookie; the redirect's URL holds no token
        ok = c.post("/dashboard/login", data={"token": "r-secret"}, follow_redirects=False)
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        cookie = ok.headers["set-cookie"].lower()
        assert "gradwatch_token=r-secret" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        assert c.get("/api/v1/runs").status_code == 200  # the client keeps the cookie: API reads pass
        out = callback(c, *runs_cb)  # Dash callbacks read the API with it
        assert out["runs-error"]["children"] is None and out["runs-table"]["data"] == []
        with c.websocket_connect("/api/v1/runs/x/live") as ws:  # the live websocket accepts it too
            assert ws.receive_json()["type"] == "subscribed"
        r = c.post("/api/v1/runs", json={"project": "p"})
        assert r.status_code == 403 and "read-only" in r.json()["detail"]  # views, cannot change
        # the write token can change; signing out forgets the cookie
        c.post("/dashboard/login", data={"token": "w-secret"}, follow_redirects=False)
        assert c.post("/api/v1/runs", json={"project": "p"}).status_code == 201
        c.post("/dashboard/logout", follow_redirects=False)
        assert c.get("/api/v1/runs").status_code == 401


def _xs(f: dict[str, Any]) -> list[int]:
    return sorted({x for t in f["data"] for x in t.get("x") or [] if t.get("hoverinfo") != "skip"})


def _ingest_long(c: TestClient, steps: int = 300) -> None:
    """A 300-step run in one batch: long enough that a whole-run chart is downsampled."""
    from gradwatch.agent import wire

    recs = [wire.StepRecord(step=s, time=1000.0 + s, rank=0, layer_ids=[0, 1],
                            layers={"numel": [4, 4], "mean": [0.0, 0.0], "m2": [4.0, 4.0], "l2": [1.0 + s, 2.0],
                                    "maxabs": [1.0, 1.0], "nonfinite": [0, 0], "l2_post": [1.0, 2.0],
                                    "wnorm": [None, None]},
                            total_norm=1.0 + s, total_norm_post=1.0, clip_coef=1.0, loss_scale=2.0 ** (s // 100),
                            skipped=False) for s in range(steps)]
    batch = wire.Batch(run=wire.RunInfo(run_id="long", project="p", name="long", config={}, tags=[]), seq=1,
                       source=0, sent_at=time.time(),
                       layers=[wire.LayerInfo(i, f"enc.{i}.weight", [4], "float32") for i in range(2)], steps=recs,
                       scalars=[wire.ScalarRecord(s, 1000.0 + s, {"loss": 1.0 / (s + 1)}, rank=0) for s in range(steps)],
                       events=[])
    r = c.post("/api/v1/ingest", content=wire.encode_batch(batch), headers={"Content-Type": "application/json"})
    assert r.status_code < 300, r.text


def test_no_server_callback_listens_to_a_relayout(client: TestClient) -> None:
    """Plotly relayouts on every first draw (``autosize``) and on y zooms: those must not cost a
    server round trip. Each zoomable chart's ``relayoutData`` feeds only a clientside filter into
    its zoom store, and the server callbacks listen to that store."""
    from gradwatch.dashboard.layout import ZOOMABLE, zoom_id

    deps = client.get("/_dash-dependencies").json()
    for gid in ZOOMABLE:
        feeds = [d for d in deps if any(x["id"] == gid and x["property"] == "relayoutData" for x in d["inputs"])]
        assert len(feeds) == 1 and feeds[0]["clientside_function"] is not None, (gid, feeds)
        assert feeds[0]["output"] == f"{zoom_id(gid)}.data"
        assert sum(any(x["id"] == zoom_id(gid) for x in d["inputs"]) for d in deps) == 1, gid


def test_zoom_refetches_the_visible_range_of_every_chart_and_reset_returns_the_whole_run(client: TestClient) -> None:
    _ingest_long(client)
    zoom = {"xaxis.range[0]": 100.4, "xaxis.range[1]": 139.6}
    for gid in ("norm-graph", "scale-graph", "scalars-graph"):
        whole = chart(client, gid, "long")
        assert min(_xs(whole)) < 50 and max(_xs(whole)) > 250, gid
        z = chart(client, gid, "long", relayout=zoom, changed=f"{gid}-zoom.data")
        xs = _xs(z)
        # every step of the visible range, one point each: the full resolution, not the whole run's buckets
        assert xs == list(range(100, 141)), (gid, xs[:5], xs[-5:])
        assert z["layout"]["xaxis"]["range"] == [100, 140] and z["layout"]["meta"]["last_step"] == 299
        # a relayout that moved no x range (autosize, a y zoom) refetches nothing
        assert chart(client, gid, "long", relayout={"autosize": True}, changed=f"{gid}-zoom.data") is None
        assert chart(client, gid, "long", relayout={"yaxis.range[0]": 1}, changed=f"{gid}-zoom.data") is None
        # reset (the button, with the stale zoom still in relayoutData) and double click: the whole run
        for kw in ({"relayout": zoom, "reset": 3, "changed": "reset-zoom.n_clicks"},
                   {"relayout": {"xaxis.autorange": True}, "changed": f"{gid}-zoom.data"}):
            back = chart(client, gid, "long", **kw)  # type: ignore[arg-type]
            assert min(_xs(back)) < 50 and max(_xs(back)) > 250, (gid, kw)
            assert "range" not in back["layout"]["xaxis"]
        assert chart(client, gid, "long", relayout=zoom, reset=3,
                     changed="reset-zoom.n_clicks")["layout"]["uirevision"] == "reset-3"  # the zoom is forgotten
    # the heatmap and the layer series too
    hz = heat(client, "long", "l2", relayout=zoom, changed="heatmap-zoom.data")["heatmap"]["figure"]
    assert hz["data"][0]["x"] == list(range(100, 141)) and hz["layout"]["xaxis"]["range"] == [100, 140]
    assert not heat(client, "long", "l2", relayout={"yaxis.range[0]": 0}, changed="heatmap-zoom.data")
    ls = callback(client, [("layer-graph", "figure")],
                  [("layer-select", "value", "enc.0.weight"), ("run-id", "data", "long"), ("theme", "data", "light"),
                   ("layer-graph-zoom", "data", zoom), ("reset-zoom", "n_clicks", None)],
                  changed="layer-graph-zoom.data")["layer-graph"]["figure"]
    assert _xs(ls) == list(range(100, 141))
    # a zoomed loss-scale chart marks only the growth steps it shows (its y range follows them)
    sz = chart(client, "scale-graph", "long", relayout=zoom, changed="scale-graph-zoom.data")
    assert {x for t in sz["data"] if t.get("mode") == "markers" for x in t["x"]} <= set(range(100, 141))
    # a malformed range (what a script could send) is no zoom, never a 500
    bad = chart(client, "norm-graph", "long", relayout={"xaxis.range[0]": "x", "xaxis.range[1]": None},
                changed="norm-graph-zoom.data")
    assert bad is None
    assert [t["name"] for t in ls["data"] if t.get("hoverinfo") != "skip"] == ["l2", "std (pooled)", "var (pooled)",
                                                                                "maxabs"]


def test_heatmap_groups_by_prefix_and_a_group_click_opens_it(client: TestClient) -> None:
    _ingest_long(client, 20)
    f = heat(client, "long", "l2", depth=1)["heatmap"]["figure"]
    assert f["data"][0]["y"] == ["enc.* (2 layers)"]
    assert f["data"][0]["z"][0][0] == round(math.log10(math.hypot(1.0, 2.0)), 4)
    opened = callback(client, [("layer-regex", "value"), ("group-depth", "value")],
                      [("heatmap", "clickData", {"points": [{"x": 3, "y": "enc.* (2 layers)"}]})],
                      [("group-depth", "value", 1)])
    assert opened == {"layer-regex": {"value": r"^enc\."}, "group-depth": {"value": 2}}
    # a click on a single layer's row opens its series, not a group
    assert not callback(client, [("layer-regex", "value"), ("group-depth", "value")],
                        [("heatmap", "clickData", {"points": [{"x": 3, "y": "enc.0.weight"}]})],
                        [("group-depth", "value", 1)])
    picked = callback(client, [("layer-select", "value")],
                      [("heatmap", "clickData", {"points": [{"x": 3, "y": "enc.0.weight"}]}),
                       ("layer-regex", "value", None)], [("layer-select", "options", [])])
    assert picked["layer-select"]["value"] == "enc.0.weight"


def test_compare_legend_names_runs(client: TestClient) -> None:
    _ingest(client, run="r1")
    _ingest(client, run="r2")  # the same name: the ids tell them apart
    out = callback(client, [("compare-norm", "figure"), ("compare-scalars", "figure"), ("compare-layer", "options"),
                            ("compare-runs", "children")],
                   [("compare-ids", "data", ["r1", "r2"]), ("theme", "data", "light")])
    names = [t["name"] for t in out["compare-norm"]["figure"]["data"]]
    assert names == ["run one (r1)", "run one (r2)"]
    assert "run one (r1)" in str(out["compare-runs"]["children"]) and "/runs/r2" in str(out["compare-runs"]["children"])


def test_statistics_a_run_lacks_say_not_recorded_and_the_tree_colours_signals(client: TestClient,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from gradwatch.dashboard import figures as fig

    _ingest(client, wnorm=False, run="r2")
    # a table entry this server does not serve (422), and one it serves that this run did not record (nulls)
    monkeypatch.setitem(fig.HEATMAP_STATS, "later", ("not_yet_a_stat", "a later statistic", False, "from a newer agent"))
    monkeypatch.setitem(fig.HEATMAP_STATS, "wn", ("wnorm", "log10 ‖w‖", True, "weight norm"))
    for stat, why in (("later", "this server does not serve it"), ("wn", "its agent sent no values for it"),
                      ("headroom", "its agent sent no values for it")):
        f = heat(client, "r2", stat)["heatmap"]["figure"]
        label = fig.HEATMAP_STATS[stat][1]
        assert f["layout"]["annotations"][0]["text"] == f"{label}: not recorded in this run ({why}).", f
        assert not f["data"]
    # a name outside the table is asked as it is: the same note
    f = heat(client, "r2", "grad_entropy")["heatmap"]["figure"]
    assert "grad_entropy: not recorded in this run" in f["layout"]["annotations"][0]["text"]
    # step-level statistics: the same, and a line where recorded
    monkeypatch.setitem(fig.STEP_STATS, "coef", ("clip_coef", "clip coefficient", False, "clip"))

    def step_stat(name: str) -> Any:
        return callback(client, [("step-stat-graph", "figure")], [("step-stat", "value", name), ("run-id", "data", "r2"),
                                                                  ("theme", "data", "light"),
                                                                  ("reset-zoom", "n_clicks", None)])["step-stat-graph"]["figure"]
    assert "gradient noise scale B_simple: not recorded in this run" in step_stat("noise_scale")["layout"]["annotations"][0]["text"]
    assert step_stat("coef")["data"][0]["y"] == [1.0] * 5

    # the module tree: a non-finite latest step is critical, a detector's dead layer a warning, the rest ok
    _ingest(client, steps=3, run="r3")  # block1.weight holds NaN at step 2, the last step
    dead = {"id": 999_999, "kind": "dead", "step": 2, "severity": "warning", "source": "detector", "layers": ["block0.weight"],
            "data": {"layers": {"block0.weight": {"since_step": 0, "steps": 3}}}, "message": "dead gradients"}
    out = callback(client, [("tree-graph", "figure")], [("run-id", "data", "r3"), ("health-store", "data", [dead]),
                                                        ("theme", "data", "light")])["tree-graph"]["figure"]
    worst = out["layout"]["meta"]["worst"]
    assert worst == {"(model)": "critical", "block0": "warning", "block0.weight": "warning", "block1": "critical",
                     "block1.weight": "critical", "block2": "ok", "block2.weight": "ok"}, worst
    text = dict(zip(out["data"][0]["ids"], out["data"][0]["text"]))
    assert text["block1.weight"] == "critical: non-finite gradient at step 2 (3 elements)"
    assert text["block0.weight"] == "warning: dead at step 2: since_step 0, steps 3"
    assert text["block2.weight"] == "no problem signal"
    # the health summary and the events table take the polled detector events
    lines = callback(client, [("health-lines", "children")], [("health-store", "data", [dead])])
    assert "dead gradients" in str(lines) and "block0.weight" in str(lines)
    ok = callback(client, [("health-lines", "children")], [("health-store", "data", [])])
    assert "No problems detected" in str(ok)
    stored = callback(client, [("events-store", "data"), ("snapshot", "data")],
                      [("run-id", "data", "r3"), ("reset-zoom", "n_clicks", None)])["events-store"]["data"]
    rows = callback(client, [("events-table", "data")], [("events-store", "data", stored), ("health-store", "data", [dead]),
                                                          ("event-kinds", "value", None),
                                                          ("event-severity", "value", "info")])["events-table"]["data"]
    # the agent's overflow and the detector's first non-finite value (info: the scaler skipped the step),
    # then the polled dead event (its id the largest), each once though two stores hold them
    assert [(r["step"], r["kind"], r["severity"], r["source"]) for r in rows] == [
        (2, "overflow", "info", "agent"), (2, "nonfinite_first", "info", "detector"),
        (2, "dead", "warning", "detector")], rows
    rows = callback(client, [("events-table", "data")], [("events-store", "data", stored + [dead]),
                                                          ("health-store", "data", [dead]),
                                                          ("event-kinds", "value", None),
                                                          ("event-severity", "value", "info")])["events-table"]["data"]
    assert len(rows) == 3
    rows = callback(client, [("events-table", "data")], [("events-store", "data", stored), ("health-store", "data", [dead]),
                                                          ("event-kinds", "value", None),
                                                          ("event-severity", "value", "warning")])["events-table"]["data"]
    assert [r["kind"] for r in rows] == ["dead"] and rows[0]["detail"] == "dead gradients"


def test_pages_load_the_partial_plotly_bundle_early_and_it_holds_every_trace_type(client: TestClient) -> None:
    """The page's head starts gradwatch's own Plotly (dcc.Graph then never loads the wheel's full
    bundle), Dash does not also include it as a script, and every trace type the figure builders
    emit is registered in it."""
    from gradwatch.dashboard import figures
    from gradwatch.dashboard.app import PLOTLY_BUNDLE

    html = client.get("/runs/any").text
    head = html.split("</head>")[0]
    url = f"/assets/{PLOTLY_BUNDLE}"
    assert f"s.src = '{url}'" in head and "window.Plotly = new Promise" in head
    assert html.count(PLOTLY_BUNDLE) == 1  # not among Dash's own script tags too
    r = client.get(url)
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    banner = r.text[:300].split("*/")[0]
    traces = set(re.search(r"traces: ([a-z ]+)", banner).group(1).split())  # type: ignore[union-attr]
    src = Path(figures.__file__).read_text()
    used = set(re.findall(r'"type": "([a-z0-9]+)"', src)) - {"log", "line", "linear", "category"}
    assert used and used <= traces, (used, traces)


def test_a_big_module_tree_holds_the_drawn_levels_and_a_click_draws_the_ones_under_a_module(client: TestClient) -> None:
    from gradwatch.agent import wire

    n = 250  # model.blocks.{i}.{weight,bias}: 1 + 1 + 1 + 250 + 500 nodes, more than TREE_NODES
    ids = list(range(2 * n))
    v = [1.0] * (2 * n)
    rec = wire.StepRecord(step=0, time=1000.0, rank=0, layer_ids=ids,
                          layers={"numel": [4] * (2 * n), "mean": v, "m2": v, "l2": v, "maxabs": v,
                                  "nonfinite": [0] * (2 * n), "l2_post": v, "wnorm": [None] * (2 * n)},
                          total_norm=1.0, total_norm_post=1.0, clip_coef=1.0, loss_scale=1.0, skipped=False)
    batch = wire.Batch(run=wire.RunInfo(run_id="big", project="p", name="big", config={}, tags=[]), seq=1, source=0,
                       sent_at=time.time(), steps=[rec], scalars=[], events=[],
                       layers=[wire.LayerInfo(2 * i + k, f"model.blocks.{i}.{w}", [4], "float32")
                               for i in range(n) for k, w in enumerate(("weight", "bias"))])
    r = client.post("/api/v1/ingest", content=wire.encode_batch(batch), headers={"Content-Type": "application/json"})
    assert r.status_code < 300, r.text
    tree = callback(client, [("tree-graph", "figure")], [("run-id", "data", "big"), ("health-store", "data", []),
                                                         ("theme", "data", "light")])["tree-graph"]["figure"]
    assert tree["data"][0]["ids"] == ["(model)", "model", "model.blocks"] and tree["layout"]["meta"]["pruned"]

    def click(node: str, root: str | None) -> Any:
        return callback(client, [("tree-graph", "figure"), ("tree-root", "data")],
                        [("tree-graph", "clickData", {"points": [{"id": node, "customdata": [node, "ok"]}]})],
                        [("run-id", "data", "big"), ("health-store", "data", []), ("theme", "data", "light"),
                         ("tree-root", "data", root)])
    got = click("model.blocks", None)
    assert got["tree-root"]["data"] == "model.blocks" and got["tree-graph"]["figure"]["data"][0]["level"] == "model.blocks"
    assert len(got["tree-graph"]["figure"]["data"][0]["ids"]) == 3 + n
    got = click("model.blocks.7", "model.blocks")
    assert got["tree-graph"]["figure"]["data"][0]["ids"][-2:] == ["model.blocks.7.weight", "model.blocks.7.bias"]
    assert click("model.blocks.7", "model.blocks.7")["tree-root"]["data"] == "model.blocks"  # the root: one level up
    assert not click("model.blocks.7.bias", "model.blocks.7")  # a layer: nothing under it, nothing redrawn


def test_the_health_list_of_a_run_that_has_ended_is_not_set_again_every_poll(client: TestClient) -> None:
    from gradwatch.agent import wire

    _ingest(client, run="ended")
    events = client.get("/api/v1/runs/ended/events", params={"severity": "warning"}).json()["data"]

    def poll(held: Any) -> Any:
        return callback(client, [("health-store", "data")], [("run-id", "data", "ended"),
                                                            ("status-refresh", "n_intervals", 3),
                                                            ("live-tick", "data", None)],
                        [("health-store", "data", held)], changed="status-refresh.n_intervals")
    assert poll(events) == {"health-store": {"data": events}}  # still running: set every poll
    done = wire.Batch(run=wire.RunInfo(run_id="ended", project="p", name="run one", config={}, tags=[]), seq=2,
                      source=0, sent_at=time.time(), layers=[], steps=[], scalars=[], events=[], status="finished")
    r = client.post("/api/v1/ingest", content=wire.encode_batch(done), headers={"Content-Type": "application/json"})
    assert r.status_code < 300, r.text
    assert not poll(events)  # ended, same list: nothing set, nothing redrawn
    assert poll([{"kind": "dead", "step": 1}]) == {"health-store": {"data": events}}  # a different list is set
