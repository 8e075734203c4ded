"""End to end in headless Chromium: a real ``gradwatch serve``, a real training run streaming into
it (GradScaler with an injected overflow), the dashboard watched live. Every wait is on a data
condition in the page, bounded; nothing asserts on timing."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import pytest

from gradwatch.dashboard.layout import ZOOMABLE

from .conftest import Page, Server, wait_until

GD = "(id) => document.querySelector('#' + id + ' .js-plotly-plot')"
#: trace 0's x of a graph, and its layout.meta
X0 = "(id) => { const g = document.querySelector('#' + id + ' .js-plotly-plot'); " \
     "return g && g.data && g.data[0] ? Array.from(g.data[0].x) : null; }"
META = "(id) => { const g = document.querySelector('#' + id + ' .js-plotly-plot'); " \
       "return g && g.layout ? g.layout.meta || null : null; }"
#: ``{trace name: finite y values}`` of a graph, once it holds any (else null: wait_js polls again)
TRACES = "(id) => { const g = document.querySelector('#' + id + ' .js-plotly-plot'); " \
         "if (!g || !g.data || !g.data.length) { return null; } const out = {}; " \
         "for (const t of g.data) { out[t.name] = Array.from(t.y || []).filter(Number.isFinite).length; } " \
         "return out; }"
#: finite cells of the heatmap's trace 0 and its colour-bar title
HEAT = "() => { const g = document.querySelector('#heatmap .js-plotly-plot'); " \
       "if (!g || !g.data || !g.data[0] || !g.data[0].z) { return null; } let n = 0; " \
       "for (const col of g.data[0].z) { for (const v of col) { if (Number.isFinite(v)) { n++; } } } " \
       "return {cells: n, label: g.data[0].colorbar.title.text}; }"
#: x of the trace named ``name`` in a graph
TRACE_X = "(id, name) => { const g = document.querySelector('#' + id + ' .js-plotly-plot'); " \
          "const t = g && g.data ? g.data.find(t => t.name === name) : null; return t ? Array.from(t.x) : null; }"
OVERFLOW_AT = 30
#: Dash's callback requests (``/_dash-update-component?endId=...``)
DASH_CALLBACK = re.compile(r"/_dash-update-component(\?|$)")
#: the heatmap's step columns after step ``from``: their x, and those with no finite cell in trace 0
HEAT_COLS = "(from) => { const g = document.querySelector('#heatmap .js-plotly-plot'); " \
            "if (!g || !g.data || !g.data[0]) { return null; } const t = g.data[0], x = Array.from(t.x || []), " \
            "empty = []; for (let k = 0; k < x.length; k++) { if (x[k] > from && " \
            "!Array.from(t.z[k] || []).some(Number.isFinite)) { empty.push(x[k]); } } return {x: x, empty: empty}; }"


def _run(server: Server, name: str, min_step: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        runs = [r for r in server.api("/runs")["data"] if r["name"] == name]
        return runs[0] if runs and (runs[0]["last_step"] or -1) >= min_step else None
    return wait_until(ready, 180, f"run {name} to reach step {min_step}")


def _max_x(page: Page, gid: str) -> int:
    xs = page.js(X0, gid) or []
    return max(xs) if xs else -1


@pytest.mark.slow
def test_live_run_page_end_to_end(server: Server, trainer: Any, page: Page) -> None:
    trainer("e2e", "--steps", "100000", "--sleep", "0.1", "--overflow-at", str(OVERFLOW_AT), "--autoscaled")
    run = _run(server, "e2e", OVERFLOW_AT + 10)
    rid = run["run_id"]

    # runs page: the run is listed with its status and a link to its page
    page.page.goto(server.url + "/")
    page.page.get_by_role("link", name="e2e").wait_for(timeout=60_000)
    assert "running" in page.page.locator("#runs-table").inner_text()
    page.shot("runs")

    # run page: every chart drawn from the snapshot. The heatmap's figure is read at once but
    # delivered only after the live stream has brought steps: the stream starts without the
    # heatmap's statistic (no heatmap yet), so the figure meets streamed steps that lack it
    held: list[Any] = []

    def hold_heatmap(route: Any) -> None:
        if not held and "heatmap.figure" in (route.request.post_data or ""):
            held.append((route, route.fetch()))
        else:
            route.continue_()

    page.page.route(DASH_CALLBACK, hold_heatmap)
    page.page.goto(f"{server.url}/runs/{rid}")
    deadline = time.monotonic() + 90
    while not held and time.monotonic() < deadline:  # (route handlers run while Playwright waits)
        page.page.wait_for_timeout(50)
    assert held, "the heatmap's figure was not requested"
    page.wait_js("() => { const h = window.gradwatchLive && window.gradwatchLive.state.history; return h && "
                 "h.filter(r => r.layers && r.layers.index && r.layers.l2 === undefined).length >= 3; }")
    held[0][0].fulfill(response=held[0][1])
    page.page.unroute(DASH_CALLBACK, hold_heatmap)
    for gid in ("heatmap", "norm-graph", "scale-graph", "scalars-graph"):
        page.wait_js(f"() => {{ const g = ({GD})('{gid}'); return g && g.data && g.data.length > 0; }}")
    assert page.js(META, "heatmap")["layers"][0] == "0.weight"
    # the transforms' own values, drawn from /transforms: AutoscaledNorm's α_t and σ_t/σ_ref, ClipNorm's
    # coefficient and norms (an empty chart, or only its explanation, fails here)
    drawn = page.wait_js(TRACES, "transforms-graph")
    for name in ("autoscaled_norm.alpha", "autoscaled_norm.sigma/sigma_ref", "clip_norm.coef",
                 "clip_norm.total_norm"):
        assert drawn.get(name, 0) >= OVERFLOW_AT, (name, drawn)
    snap = page.js(META, "norm-graph")["last_step"]
    assert snap >= OVERFLOW_AT + 10

    # live: points beyond the snapshot arrive without reloading, each step once
    page.wait_js(f"() => {{ const x = ({X0})('norm-graph'); return x && Math.max(...x) > {snap + 15}; }}")
    page.wait_js(f"() => {{ const x = ({X0})('heatmap'); return x && Math.max(...x) > {snap + 5}; }}")
    xs = page.js(X0, "norm-graph")
    assert len(xs) == len(set(xs)), "duplicate steps in the live chart"
    assert xs == sorted(xs)
    # the heatmap's live columns: each step once, in order, every one drawn (the stream may begin
    # before it carries the heatmap's statistic: those steps come from a REST fill, never empty)
    heat_snap = page.js(META, "heatmap")["last_step"]
    cols = page.js(HEAT_COLS, heat_snap)
    live_x = [x for x in cols["x"] if x > heat_snap]
    assert live_x and live_x == sorted(set(live_x)) and cols["empty"] == [], (heat_snap, cols)
    # the transforms' values and the scalars follow the run too, each step once
    for gid, name in (("transforms-graph", "autoscaled_norm.alpha"), ("transforms-graph", "clip_norm.coef"),
                      ("transforms-graph", "autoscaled_norm.sigma/sigma_ref"), ("scalars-graph", "loss")):
        got = page.wait_js(f"() => {{ const x = ({TRACE_X})('{gid}', '{name}'); "
                           f"return x && x.length && Math.max(...x) > {snap + 15} ? x : null; }}")
        assert len(got) == len(set(got)) and got == sorted(got), (gid, name)
    page.wait_js("() => /live · step/.test(document.querySelector('#live-status').innerText)")
    page.shot("run-live")

    # the injected overflow: in the events table with its layer; a click jumps the charts there
    row = page.page.locator("#events-table td", has_text="overflow").first
    row.wait_for(timeout=60_000)
    assert "layers: 0.weight" in page.page.locator("#events-table").inner_text()
    row.click()
    page.wait_js("() => window.gradwatchLive.state.lastJump !== undefined")
    lo, hi = page.js(f"() => ({GD})('norm-graph')._fullLayout.xaxis.range")
    assert lo < OVERFLOW_AT < hi and hi - lo < max(xs)
    page.shot("run-jump")

    # a heatmap cell click opens that layer's series
    page.page.locator("#heatmap").scroll_into_view_if_needed()
    box = page.page.locator("#heatmap .nsewdrag").first.bounding_box()
    x, y = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.05
    page.page.mouse.move(x, y)
    page.page.mouse.move(x + 2, y + 1)  # Plotly clicks the point it is hovering
    page.page.locator("#heatmap .hoverlayer .hovertext").first.wait_for(timeout=30_000)
    page.page.mouse.click(x + 2, y + 1)
    page.wait_js(f"() => {{ const g = ({GD})('layer-graph'); "
                 "return g && g.layout && g.layout.title && /^Layer /.test(g.layout.title.text); }")
    assert page.page.locator("#layer-select").inner_text().strip().endswith(".weight")
    # the layer's series follows the run live too (its mean lines extended from the stream), each step once
    lsnap = page.wait_js(f"() => {{ const m = ({META})('layer-graph'); return m && m.live_traces ? m.last_step : null; }}")
    for name in ("l2", "maxabs"):
        got = page.wait_js(f"() => {{ const x = ({TRACE_X})('layer-graph', '{name}'); "
                           f"return x && x.length && Math.max(...x) > {lsnap + 10} ? x : null; }}")
        assert len(got) == len(set(got)) and got == sorted(got), (name, "duplicate or unordered steps")
    page.shot("run-layer-live")

    # kill the server mid-run, restart it on the same port and database: the view resumes, no gap
    # the jump zoomed the charts (each refetched its visible steps): back to the whole run first
    page.page.click("#reset-zoom")
    page.wait_js(f"() => {{ const x = ({X0})('norm-graph'); return x && x.length && Math.min(...x) <= 1; }}")
    for gid, name in (("transforms-graph", "clip_norm.coef"), ("scalars-graph", "loss")):  # their reloads are in too
        page.wait_js(f"() => {{ const x = ({TRACE_X})('{gid}', '{name}'); return x && x.length && Math.min(...x) <= 1; }}")
    before = _max_x(page, "norm-graph")
    lay_before = max(page.wait_js(f"() => {{ const x = ({TRACE_X})('layer-graph', 'maxabs'); return x && x.length ? x : null; }}"))
    # the race that lost transform values once: the steps stored while the fill's requests are under
    # way. The fill's /steps read is held here until the run has ten more steps, so its other reads
    # and the stream overlap it for certain
    held: list[int] = []

    def hold_steps(route: Any) -> None:
        if not held:
            held.append(server.api(f"/runs/{rid}")["last_step"])
            wait_until(lambda: server.api(f"/runs/{rid}")["last_step"] >= held[0] + 10, 60, "ten more steps")
        route.continue_()
    fill_steps = re.compile(r"/steps\?fields=total_norm,total_norm_post,loss_scale&start=")
    page.page.route(fill_steps, hold_steps)
    server.kill()
    killed_at = time.monotonic()
    page.wait_js("() => /reconnecting/.test(document.querySelector('#live-status').innerText)")
    server.start()
    restarted_at = time.monotonic()
    page.wait_js(f"() => {{ const x = ({X0})('norm-graph'); return x && Math.max(...x) > {before + 40}; }}",
                 timeout=180)
    recovered_at = time.monotonic()
    assert held, "the fill's /steps read was not seen"
    page.page.unroute(fill_steps)
    xs = page.js(X0, "norm-graph")
    dups = sorted({x for x in xs if xs.count(x) > 1})
    assert not dups, f"duplicate steps after the reconnect: {dups} {page.js('() => window.gradwatchLive.stats')}"
    assert xs == list(range(xs[0], xs[-1] + 1)), "steps missing after the reconnect"
    # the transforms' values and the scalars resume too: every step exactly once, the steps around the
    # restart included (filled over REST, however the stream and the fill overlapped)
    for gid, name in (("transforms-graph", "clip_norm.coef"), ("scalars-graph", "loss")):
        got = page.wait_js(f"() => {{ const x = ({TRACE_X})('{gid}', '{name}'); "
                           f"return x && x.length && Math.max(...x) > {before + 40} ? x : null; }}")
        # what the server holds up to the chart's last step (the skipped overflow step has no transforms)
        path = (f"/runs/{rid}/transforms?transform=clip_norm&fields=coef&end={got[-1]}" if gid == "transforms-graph"
                else f"/runs/{rid}/scalars?key=loss&end={got[-1]}")
        held = server.api(path)
        want = [p["step"] for p in (held["series"][0] if "series" in held else held)["points"] if not p["rank"]]
        assert got == want, (gid, name, "missing", sorted(set(want) - set(got)), "extra", sorted(set(got) - set(want)),
                             "duplicates", sorted({x for x in got if got.count(x) > 1}),
                             page.js('() => window.gradwatchLive.stats'))
    # the shown layer's series too: its steps of the outage come from the fill's /stats reads, not a
    # straight line across them (max-abs: a statistic the heatmap's fill does not carry)
    got = page.wait_js(f"() => {{ const x = ({TRACE_X})('layer-graph', 'maxabs'); "
                       f"return x && x.length && Math.max(...x) > {before + 40} ? x : null; }}")
    tail = [x for x in got if x > lay_before]
    assert tail == list(range(lay_before + 1, tail[-1] + 1)), ("layer series after the restart", lay_before, tail)
    page.shot("run-after-restart")

    # the gradient-to-weight ratio heatmap: ‖g‖/‖w‖ from the recorded weight norms, every layer drawn
    page.js("() => window.dash_clientside.set_props('heatmap-stat', {value: 'ratio'})")
    got = page.wait_js(f"() => {{ const h = ({HEAT})(); return h && /‖w‖/.test(h.label) && h.cells > 0 ? h : null; }}")
    layers = len(page.js(META, "heatmap")["layers"])
    assert layers == 10 and got["cells"] >= layers * 10, got  # 5 Linear layers: weights and biases
    page.shot("run-ratio-heatmap")

    # no console errors, except the failed connections while the server was down
    outside = [m for t, m in page.errors if not (killed_at <= t <= recovered_at)]
    assert not outside, outside
    during = [m for t, m in page.errors if killed_at <= t <= recovered_at]
    down = ("WebSocket", "ERR_CONNECTION", "Failed to fetch", "Callback failed: the server did not respond",
            "ERR_CONTENT_LENGTH_MISMATCH", "ERR_EMPTY_RESPONSE")  # a response cut short by the kill
    assert all(any(d in m for d in down) for m in during), during
    assert restarted_at > killed_at


@pytest.mark.slow
def test_empty_state_theme_and_unknown_run(server: Server, page: Page) -> None:
    page.page.goto(server.url + "/")
    page.page.locator("#empty-state").wait_for(timeout=60_000)
    code = page.page.locator("#empty-state pre").inner_text()
    assert "from gradwatch.agent import watch" in code and server.url in code
    page.shot("empty-state")
    page.page.click("#theme-toggle")
    page.wait_js("() => document.querySelector('#gw-root').className === 'gw-dark'")
    page.page.goto(server.url + "/runs/does-not-exist")
    page.page.get_by_text("run 'does-not-exist' not found").first.wait_for(timeout=60_000)
    assert page.js("() => document.querySelector('#gw-root').className") == "gw-dark"  # kept across pages
    page.shot("unknown-run-dark")
    r = page.page.request.get(server.url + "/api/v1/nothing-here")
    assert r.status == 404 and r.json()["detail"].startswith("no such API path")
    assert not page.errors, page.errors


@pytest.mark.slow
def test_compare_page_overlays_runs_and_a_shared_layer(server: Server, trainer: Any, page: Page) -> None:
    for seed, name in enumerate(("cmp-a", "cmp-b")):
        trainer(name, "--steps", "60", "--seed", str(seed))  # two different runs: the lines differ
    ids = [_run(server, name, 59)["run_id"] for name in ("cmp-a", "cmp-b")]
    page.page.goto(f"{server.url}/compare?runs={','.join(ids)}")
    # one line per run, named by the run's name (plus its min–max band where downsampled), each
    # with the run's steps
    names = ["cmp-a", "cmp-b"]
    for gid in ("compare-norm", "compare-scalars"):
        drawn = page.wait_js(TRACES, gid)
        assert all(drawn.get(r, 0) >= 50 for r in names), (gid, drawn)
    legend = page.page.locator("#compare-norm .legend").text_content() or ""
    assert "cmp-a" in legend and "cmp-b" in legend and ids[0] not in legend
    # a layer matched by name in both runs: its L2 norm overlaid
    page.js("() => window.dash_clientside.set_props('compare-layer', {value: '0.weight'})")
    drawn = page.wait_js(f"() => {{ const t = ({TRACES})('compare-layer-graph'); "
                         f"return t && {names!r}.every(r => t[r] >= 50) ? t : null; }}")
    assert set(drawn) >= set(names)
    page.shot("compare")
    assert not page.errors, page.errors


#: the x values of a graph's data traces (bands and markers aside)
ALL_X = "(id) => { const g = document.querySelector('#' + id + ' .js-plotly-plot'); " \
        "if (!g || !g.data || !g.data.length) { return null; } const xs = []; " \
        "for (const t of g.data) { if (t.hoverinfo !== 'skip' && t.mode !== 'markers') { " \
        "for (const x of (t.x || [])) { xs.push(x); } } } return xs; }"


@pytest.mark.slow
def test_zoom_refines_every_chart_groups_open_and_merge_like_python(server: Server, trainer: Any,
                                                                   page: Page) -> None:
    import random

    from gradwatch.dashboard.figures import merge_group

    steps = 240
    trainer("zoom", "--steps", str(steps), "--autoscaled").wait(300)
    rid = _run(server, "zoom", steps - 1)["run_id"]
    fired: list[list[str]] = []  # each Dash callback request's triggers, in order

    def on_request(req: Any) -> None:
        if DASH_CALLBACK.search(req.url) and req.method == "POST":
            fired.append(json.loads(req.post_data or "{}").get("changedPropIds") or [])

    page.page.on("request", on_request)
    page.page.goto(f"{server.url}/runs/{rid}")
    for gid in ZOOMABLE[2:] + ("heatmap",):
        page.wait_js(f"() => {{ const x = ({ALL_X})('{gid}'); return x && x.length > 0; }}")
    # every chart has drawn (and autosized): no request was fired by a relayout or a zoom store
    page.wait_js("() => !document.querySelector('[data-dash-is-loading]')")
    assert not [t for t in fired if any("relayoutData" in p or "-zoom." in p for p in t)], fired

    # module-prefix groups: 0.weight + 0.bias form "0.* (2 layers)"; a click on its row opens it
    page.js("() => window.dash_clientside.set_props('group-depth', {value: 1})")
    rows = page.wait_js(f"() => {{ const m = ({META})('heatmap'); return m && m.depth === 1 ? m.layers : null; }}")
    assert rows[0] == "0.* (2 layers)" and len(rows) == 5, rows
    page.shot("run-grouped")
    box = page.page.locator("#heatmap .nsewdrag").first.bounding_box()
    x, y = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.05
    page.page.mouse.move(x, y)
    page.page.mouse.move(x + 2, y + 1)
    page.page.locator("#heatmap .hoverlayer .hovertext").first.wait_for(timeout=30_000)
    page.page.mouse.click(x + 2, y + 1)
    opened = page.wait_js(f"() => {{ const m = ({META})('heatmap'); return m && m.depth === 2 ? m.layers : null; }}")
    assert opened == ["0.weight", "0.bias"], opened
    assert page.page.locator("#layer-regex").input_value() == "^0\\."
    page.js("() => window.dash_clientside.set_props('layer-select', {value: '2.weight'})")
    page.wait_js(f"() => {{ const x = ({ALL_X})('layer-graph'); return x && x.length > 0; }}")

    # zoom each chart (as a drag does: a relayout of its x range): it refetches just those steps,
    # every step of them; then "Reset zoom" brings back the whole run
    lo, hi = 100, 140
    # a y zoom and an autosize refetch nothing; an x zoom, one request per chart, fired by its store
    before = len(fired)
    for gid in ZOOMABLE:
        page.js(f"() => window.Plotly.relayout(({GD})('{gid}'), {{'yaxis.range': [0, 1]}})")
        page.js(f"() => window.Plotly.relayout(({GD})('{gid}'), {{autosize: true}})")
    for gid in ZOOMABLE:
        page.js(f"() => window.Plotly.relayout(({GD})('{gid}'), {{'xaxis.range': [{lo} + 0.3, {hi} - 0.3]}})")
    for gid in ZOOMABLE:
        xs = page.wait_js(f"() => {{ const x = ({ALL_X})('{gid}'); "
                          f"return x && x.length && Math.min(...x) >= {lo} ? x : null; }}")
        assert sorted(set(xs)) == list(range(lo, hi + 1)), (gid, sorted(set(xs))[:3], sorted(set(xs))[-3:])
    zooms = sorted(p for t in fired[before:] for p in t if "relayoutData" in p or "-zoom." in p)
    assert zooms == sorted(f"{gid}-zoom.data" for gid in ZOOMABLE), fired[before:]
    page.shot("run-zoomed")
    page.page.click("#reset-zoom")
    for gid in ZOOMABLE:
        xs = page.wait_js(f"() => {{ const x = ({ALL_X})('{gid}'); "
                          f"return x && x.length && Math.min(...x) === 0 ? x : null; }}")
        assert max(xs) == steps - 1, gid
        rng = page.js(f"() => ({GD})('{gid}')._fullLayout.xaxis.range")
        assert rng[0] < lo and rng[1] > hi, (gid, rng)  # the user's zoom is gone too

    # the live script merges a group's layers as the figure builder does (random cases)
    rng_ = random.Random(5)
    cases = []
    for _ in range(300):
        n = rng_.randint(1, 8)
        vals = [rng_.choice([None, 0.0, float("inf"), float("nan"), 10 ** rng_.uniform(-200, 200)]) for _ in range(n)]
        cases.append(({"how": rng_.choice(["rss", "sum", "max", "min"]), "vals": [_js(v) for v in vals]}, vals))
    got = page.js("(cases) => cases.map(c => { const pos = {}, nf = []; c.vals.forEach((_, i) => { pos[i] = i; "
                  "nf.push(1); }); const v = window.gradwatchLive.group(c.vals.map((_, i) => i), pos, c.vals, nf, "
                  "c.how); return [v[0] === null ? null : String(v[0]), v[1]]; })", [c for c, _ in cases])
    for (case, vals), (js, count) in zip(cases, got):
        want = merge_group(vals, case["how"])
        assert count == len(vals)
        if want is None or js is None:
            assert want is None and js is None, (case, js)
        elif math.isnan(want) or math.isinf(want):
            assert js == {float("inf"): "Infinity", float("-inf"): "-Infinity"}.get(want, "NaN"), (case, js)
        else:
            assert float(js) == pytest.approx(want, rel=1e-9), (case, js)
    assert not page.errors, page.errors
    # offline: every asset, Plotly's bundle included, came from this server (no CDN)
    assert any("plotly" in u and u.endswith(".js") for u in page.requests), page.requests
    away = [u for u in page.requests if not u.startswith((server.url + "/", "data:", "blob:"))]
    assert not away, away


def _js(v: float | None) -> Any:
    """A value as the live stream sends it: non-finite values as strings."""
    if v is None or math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


DEAD_AT = 60
#: the treemap's node ids and hover texts, and its layout.meta (worst signal per node)
TREE = "() => { const g = document.querySelector('#tree-graph .js-plotly-plot'); " \
       "if (!g || !g.data || !g.data[0] || g.data[0].type !== 'treemap') { return null; } " \
       "return {ids: Array.from(g.data[0].ids), text: Array.from(g.data[0].text), meta: g.layout.meta}; }"


@pytest.mark.slow
def test_detector_events_health_summary_module_tree_and_unrecorded_stats(server: Server, trainer: Any,
                                                                          page: Page, tmp_path: Any) -> None:
    # a real run whose last hidden layer's gradient is zeroed by its hook from DEAD_AT on: the server's
    # `dead` detector fires (20 recorded steps later by default) naming that layer. The run waits
    # before DEAD_AT while the page shows it healthy; then the summary must change without a reload
    go = tmp_path / "go"
    proc = trainer("dying", "--steps", "200", "--dead-at", str(DEAD_AT), "--overflow-at", str(OVERFLOW_AT),
                   "--hold", str(go))
    rid = _run(server, "dying", DEAD_AT - 1)["run_id"]
    page.page.goto(f"{server.url}/runs/{rid}")
    page.page.locator("#health-ok").wait_for(timeout=60_000)
    page.js("() => { window.__samePage = true; }")
    go.touch()
    page.page.locator("#health-lines .gw-health-line", has_text="dead").wait_for(timeout=120_000)
    assert page.js("() => window.__samePage === true"), "the page was reloaded"
    proc.wait(300)
    _run(server, "dying", 199)
    dead = wait_until(lambda: [e for e in server.api(f"/runs/{rid}/events?source=detector")["data"]
                               if e["kind"] == "dead"], 60, "the dead event")
    assert dead[0]["layers"] == ["6.weight"] and DEAD_AT < dead[0]["step"] <= DEAD_AT + 25, dead
    problems = [e for e in server.api(f"/runs/{rid}/events?severity=warning")["data"]]
    page.page.goto(f"{server.url}/runs/{rid}")

    # the health summary: one line per problem, worst severity first, the latest first within one
    page.page.locator("#health-lines .gw-health-line").first.wait_for(timeout=60_000)
    lines = page.page.locator("#health-lines .gw-health-line").all_inner_texts()
    assert any("dead" in ln and "6.weight" in ln and f"step {dead[0]['step']}" in ln for ln in lines), lines
    sev = ["info", "warning", "critical"]
    want = sorted(problems, key=lambda e: (-sev.index(e["severity"]), -e["step"], -e["id"]))[:6]
    assert [ln.split("\n")[0].strip().lower() for ln in lines[:len(want)]] == [e["severity"] for e in want], lines
    assert len(lines) == len(want)
    # a line's step moves every chart there, as an events-table row does
    page.page.locator("#health-lines .gw-health-line", has_text="dead").locator("button").click()
    page.wait_js(f"() => window.gradwatchLive.state.lastJump === {dead[0]['step']}")
    page.page.click("#reset-zoom")
    page.wait_js("() => window.gradwatchLive.state.lastJump !== undefined && "
                 f"(({GD})('norm-graph')._fullLayout.xaxis.range[1] - ({GD})('norm-graph')._fullLayout.xaxis.range[0]) > 150")
    page.js("() => { window.gradwatchLive.state.lastJump = undefined; }")

    # the events table: detector events with their severity and source; the severity filter; a click jumps
    table = page.page.locator("#events-table")
    page.page.locator("#events-table td", has_text="dead").first.wait_for(timeout=60_000)
    page.page.locator("#event-severity").click()
    page.page.get_by_text("warning and worse", exact=True).click()
    page.wait_js("() => !Array.from(document.querySelectorAll('#events-table td[data-dash-column=severity]'))"
                 ".some(td => td.innerText.trim() === 'info')")
    rows = table.locator("tr").all_inner_texts()[1:]
    assert len(rows) == min(15, len(problems)), (rows, problems)
    assert any("dead" in r and "detector" in r and "warning" in r for r in rows), rows
    page.page.locator("#events-table td[data-dash-column=kind]", has_text="dead").first.click()
    page.wait_js(f"() => window.gradwatchLive.state.lastJump === {dead[0]['step']}")
    lo, hi = page.js(f"() => ({GD})('norm-graph')._fullLayout.xaxis.range")
    assert lo < dead[0]["step"] < hi and hi - lo < 199

    # the module tree: the dead layer, its module and the model coloured by the warning, its hover naming it
    tree = page.wait_js(f"() => {{ const t = ({TREE})(); return t && t.meta.worst['6.weight'] === 'warning' ? t : null; }}")
    worst = tree["meta"]["worst"]
    assert worst["6"] in ("warning", "critical") and worst["(model)"] in ("warning", "critical")
    hover = tree["text"][tree["ids"].index("6.weight")]
    assert "zero gradient at step 199" in hover and f"dead at step {dead[0]['step']}" in hover, hover
    named = {n for e in problems for n in e["layers"]}
    for node, w in worst.items():  # a layer no problem names, with finite non-zero gradients, is ok
        if "." in node and node not in named:
            assert w == "ok", (node, w, tree)
    page.page.locator("#health").scroll_into_view_if_needed()
    page.page.locator("#health").screenshot(path=str(page.shots / "run-health.png"))
    # hovering the dead layer's cell names its signals
    page.page.locator("#tree-graph").scroll_into_view_if_needed()
    box = page.wait_js("() => { for (const el of document.querySelectorAll('#tree-graph g.slice')) { "
                       "const d = el.__data__; const id = d && d.data && (d.data.id || (d.data.data && d.data.data.id)); "
                       "if (id === '6.weight') { const r = el.getBoundingClientRect(); "
                       "return {x: r.x + r.width / 2, y: r.y + r.height / 2}; } } return null; }")
    page.page.mouse.move(box["x"], box["y"])
    page.page.mouse.move(box["x"] + 2, box["y"] + 2)
    tip = page.page.locator("#tree-graph .hoverlayer .hovertext").first
    tip.wait_for(timeout=30_000)
    assert "dead at step" in (tip.text_content() or "") and "zero gradient" in (tip.text_content() or "")
    page.page.locator("#tree-graph").screenshot(path=str(page.shots / "run-module-tree.png"))
    page.page.mouse.move(0, 0)
    page.page.locator("#events-table").scroll_into_view_if_needed()
    page.page.locator("#events-table").screenshot(path=str(page.shots / "run-detector-events.png"))

    # a per-layer statistic this run recorded (it trains under a loss scaler): the loss-scale headroom heatmap
    page.js("() => window.dash_clientside.set_props('heatmap-stat', {value: 'headroom'})")
    page.wait_js("() => { const g = document.querySelector('#heatmap .js-plotly-plot'); const d = g && g.data; "
                 "return d && d.length && d[0].type === 'heatmap' && /headroom/.test(JSON.stringify(g.layout.title || '')) "
                 "&& d[0].z.some(r => r.some(v => typeof v === 'number' && isFinite(v))); }")
    # the dead layer's all-zero gradient has +inf headroom: the top of the scale, not a magenta fault cell
    dead_cells = page.js("() => { const g = document.querySelector('#heatmap .js-plotly-plot'); "
                         "const j = g.layout.meta.layers.indexOf('6.weight'); const top = g.layout.meta.inf_top; "
                         "const bad = (g.data[1].z || []).filter(r => r && r[j] === 1).length; "
                         "const tops = g.data[0].x.filter((s, k) => s >= 61 && g.data[0].z[k][j] === top).length; "
                         "const late = g.data[0].x.filter(s => s >= 61).length; return [j, bad, tops, late]; }")
    assert dead_cells[0] >= 0 and dead_cells[1] == 0 and dead_cells[2] == dead_cells[3] > 0, dead_cells
    page.shot("run-headroom")
    # a per-layer statistic this run did not record (the noise scale needs DDP or accumulation): a note, no error
    page.js("() => window.dash_clientside.set_props('heatmap-stat', {value: 'noise_scale'})")
    page.wait_js("() => { const g = document.querySelector('#heatmap .js-plotly-plot'); const a = g && g.layout && "
                 "g.layout.annotations; return a && a.length && /noise scale B_simple: not recorded in this run/"
                 ".test(a[0].text); }")
    page.shot("run-not-recorded")
    assert not page.errors, page.errors

    # a healthy run: no problems
    trainer("healthy", "--steps", "60").wait(300)
    ok = _run(server, "healthy", 59)["run_id"]
    assert not server.api(f"/runs/{ok}/events?severity=warning")["data"]
    page.page.goto(f"{server.url}/runs/{ok}")
    page.page.locator("#health-ok").wait_for(timeout=60_000)
    assert page.page.locator("#health-ok").inner_text().strip() == "✓ No problems detected."
    page.wait_js(f"() => {{ const t = ({TREE})(); return t && t.meta.worst['(model)'] === 'ok'; }}")
    assert not page.errors, page.errors
