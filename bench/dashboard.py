"""Dashboard benchmark (issue 11), measured in headless Chromium (Debian's, via Playwright). Not a test.

1. First full render: a run of ``--layers`` × ``--steps`` (layer rows built inside PostgreSQL or
   SQLite with ``bench/ingest.py``'s builder, plus one step record per step) is opened at
   ``/runs/<id>`` in a fresh browser context (nothing cached), ``--renders`` times (the median
   run is reported whole): the time from navigation start until every graph of the page holds
   its figure (``all_drawn_s``; ``first_render_s``: the heatmap and the total-norm chart only, the
   earlier measure), the bytes of the callback responses, and where the time went: each callback
   request (start and end, page ms), each Plotly draw per graph (ms; a figure drawn twice shows
   twice), the main thread's work by kind from a Chromium trace (``trace_s``: script, style,
   layout, paint, GC; ``busy``: every task), its long tasks, and when each script arrived. The
   first render's screenshot and trace are written to the temp folder.
2. Live updates: ``--updates`` batches of one step each (every layer's statistics) are posted to
   ``/api/v1/ingest`` while the page is open, one after the live script drew the previous one.
   Script time is Chrome's ``ScriptDuration`` (all JavaScript: the live script, Dash, Plotly's
   extendTraces) over the live phase minus an idle phase of the same length, divided by the
   number of flushes; bytes are the websocket frames' payloads as the page received them.
3. Before both, the server-side split of a first render (``profile``): the ``/heatmap`` request,
   the Python figure build and its JSON, each big callback end to end.

    .venv/bin/python bench/dashboard.py --layers 500 --steps 100000 --backend postgresql
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import ingest as ib  # noqa: E402  (bench/ingest.py: database(), server(), build_big_run())

from gradwatch.agent import wire  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
DRAWN = ("() => ['heatmap', 'norm-graph'].every(id => { const g = document.querySelector('#' + id + ' .js-plotly-plot');"
         " return g && g.data && g.data.length > 0 && g.data[0].x && g.data[0].x.length > 0; })")
#: Every graph of the run page (``dashboard/layout.py``). A graph counts as drawn once it holds a
#: figure from the server (every figure builder's layout has a ``uirevision``; the layout's
#: placeholder figure has none) and Plotly has laid it out (``_fullLayout``).
GRAPHS = ("heatmap", "layer-graph", "tree-graph", "step-stat-graph", "norm-graph", "scale-graph", "scalars-graph",
          "transforms-graph")
ALL_DRAWN = ("(ids) => ids.every(id => { const g = document.querySelector('#' + id + ' .js-plotly-plot');"
             " return g && g.layout && g.layout.uirevision !== undefined && g._fullLayout; })")
#: Before any page script: counts and times every Plotly.react/newPlot per graph (its synchronous
#: part: Plotly's calc and draw; a heatmap's image is drawn inside it) and when each graph first
#: held a server figure, so a redundant redraw on first load shows as a count above one.
PLOTLY_HOOK = """(() => {
  const log = window.__gwDraws = [];
  const first = window.__gwFirst = {};
  let P;
  function wrap(obj, name) {
    const f = obj[name];
    obj[name] = function (gd) {
      const el = typeof gd === 'string' ? document.getElementById(gd) : gd;
      const host = el && el.closest && el.closest('[id]:not(.js-plotly-plot)');
      const id = host ? host.id : '?';
      const t0 = performance.now();
      const out = f.apply(this, arguments);
      const t1 = performance.now();
      const rec = {id: id, fn: name, t: t0, sync: t1 - t0, done: null};
      log.push(rec);
      Promise.resolve(out).then(() => { rec.done = performance.now();
        const g = el; if (g && g.layout && g.layout.uirevision !== undefined && !(id in first)) { first[id] = rec.done; } });
      return out;
    };
  }
  Object.defineProperty(window, 'Plotly', {configurable: true, get() { return P; }, set(v) {
    P = v; if (v && v.react && !v.__gw) { v.__gw = true; wrap(v, 'react'); wrap(v, 'newPlot'); } }});
})();"""


def add_step_records(kind: str, url: str, run_id: str, steps: int) -> None:
    """One step record per step (total norm before/after, loss scale), as ingest would store them."""
    sql = ("INSERT INTO step_record (run_id, step, rank, time, total_norm, total_norm_post, clip_coef, loss_scale, "
           "skipped, nan_mask) ")
    if kind == "sqlite":
        import sqlite3

        con = sqlite3.connect(url.removeprefix("sqlite:///"))
        con.executemany(sql + "VALUES (?, ?, 0, ?, ?, ?, 1.0, 65536.0, 0, 0)",
                        [(run_id, s, float(s), 1.0 + (s % 97) / 97, 1.0) for s in range(1, steps + 1)])
        con.commit()
        con.close()
    else:
        import psycopg

        with psycopg.connect(ib._libpq(url), autocommit=True) as con:
            con.execute(sql + "SELECT %s, s, 0, s, 1 + (s %% 97) / 97.0, 1, 1.0, 65536.0, false, 0 "
                        "FROM generate_series(1, %s) s", (run_id, steps))


def live_batch(run_id: str, layers: int, step: int, seq: int, source: int = 7) -> bytes:
    v = [1.0 + (i % 7) / 7 for i in range(layers)]
    rec = wire.StepRecord(step=step, time=time.time(), rank=0, layer_ids=list(range(layers)),
                          layers={"numel": [65536] * layers, "mean": v, "m2": [x * 65536 for x in v], "l2": v,
                                  "maxabs": v, "nonfinite": [0] * layers, "l2_post": v, "wnorm": v},
                          total_norm=2.0, total_norm_post=1.0, clip_coef=0.5, loss_scale=65536.0, skipped=False)
    b = wire.Batch(run=wire.RunInfo(run_id=run_id, project="bench", name=None, config={}, tags=[]), seq=seq,
                   source=source, sent_at=time.time(),
                   layers=[wire.LayerInfo(i, f"model.layers.{i}.weight", [256, 256], "float32") for i in range(layers)],
                   steps=[rec], scalars=[], events=[])
    return wire.encode_batch(b)


def _callback(http: httpx.Client, outputs: list[tuple[str, str]], inputs: list[tuple[str, str, Any]],
              state: tuple[tuple[str, str, Any], ...] = ()) -> tuple[float, int]:
    """One Dash callback as the browser posts it: (seconds, response bytes)."""
    key = "...".join(f"{i}.{p}" for i, p in outputs)
    body = {"output": f"..{key}.." if len(outputs) > 1 else key,
            # (a single output is posted bare, not as a one-item list: Dash unpacks it that way)
            "outputs": [{"id": i, "property": p} for i, p in outputs] if len(outputs) > 1
            else {"id": outputs[0][0], "property": outputs[0][1]},
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
            "changedPropIds": [f"{inputs[0][0]}.{inputs[0][1]}"],
            "state": [{"id": i, "property": p, "value": v} for i, p, v in state]}
    t0 = time.perf_counter()
    r = http.post("/_dash-update-component", json=body)
    if r.status_code >= 400:
        raise RuntimeError(f"callback {body['output']}: HTTP {r.status_code}: {r.text[:500]}")
    return time.perf_counter() - t0, len(r.content)


def profile(base: str, run_id: str, repeats: int = 3) -> dict[str, Any]:
    """Where a first render's server time goes, best of ``repeats``: the ``/heatmap`` request at
    the dashboard's bucket count (and at 1,000, the earlier default), the Python figure build and
    its JSON, and the two big callbacks end to end (API requests + figure + JSON)."""
    from plotly.io.json import to_json_plotly

    from gradwatch.dashboard import callbacks, figures

    out: dict[str, Any] = {}

    def best(fn: Any) -> Any:
        runs = [fn() for _ in range(repeats)]
        return min(runs, key=lambda r: r[0])

    with httpx.Client(base_url=base, timeout=600) as http:
        last = http.get(f"/api/v1/runs/{run_id}").json()["last_step"]
        for mp in sorted({1000, callbacks.heatmap_points(1400)}, reverse=True):
            def get(mp: int = mp) -> tuple[float, Any]:
                t0 = time.perf_counter()
                r = http.get(f"/api/v1/runs/{run_id}/heatmap", params={"stat": "l2", "end": last, "max_points": mp})
                r.raise_for_status()
                return time.perf_counter() - t0, r
            t, r = best(get)
            out[f"heatmap_api_{mp}_s"], out[f"heatmap_api_{mp}_bytes"] = t, len(r.content)
        hm = r.json()  # the dashboard's request (the smaller max_points)
        out["heatmap_buckets"] = len(hm["steps"])
        t0 = time.perf_counter()
        f = figures.heatmap_figure(hm, "l2", last_step=last)
        out["heatmap_figure_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out["heatmap_figure_bytes"] = len(to_json_plotly(f))
        out["heatmap_json_s"] = time.perf_counter() - t0
        heat_in = [("run-id", "data", run_id), ("heatmap-stat", "value", "l2"), ("layer-regex", "value", None),
                   ("theme", "data", "light"), ("reset-zoom", "n_clicks", None), ("group-depth", "value", 0)]
        out["heatmap_callback_s"], out["heatmap_callback_bytes"] = best(lambda: _callback(
            http, [("heatmap", "figure"), ("regex-error", "children"), ("layer-select", "options")], heat_in,
            (("heatmap", "relayoutData", None), ("viewport", "data", 1400))))
        # each step chart is its own callback (the browser fires them side by side), plus the
        # events list and live snapshot; "charts" is their sum, as if they ran one after another
        run_in = [("run-id", "data", run_id), ("theme", "data", "light"), ("reset-zoom", "n_clicks", None)]
        total_s, total_b = 0.0, 0
        for gid in ("norm-graph", "scale-graph", "scalars-graph", "transforms-graph"):
            t, b = best(lambda gid=gid: _callback(http, [(gid, "figure")], run_in, ((gid, "relayoutData", None),)))
            out[f"{gid}_callback_s"], out[f"{gid}_callback_bytes"] = t, b
            total_s, total_b = total_s + t, total_b + b
        t, b = best(lambda: _callback(http, [("events-store", "data"), ("snapshot", "data")],
                                      [("run-id", "data", run_id), ("reset-zoom", "n_clicks", None)]))
        out["snapshot_callback_s"], out["snapshot_callback_bytes"] = t, b
        out["charts_callback_s"], out["charts_callback_bytes"] = total_s + t, total_b + b
        # the module tree (it waits on the health list: the browser posts it after that one answers)
        t, b = best(lambda: _callback(http, [("health-store", "data")], [("run-id", "data", run_id),
                                                                         ("status-refresh", "n_intervals", None),
                                                                         ("live-tick", "data", None)],
                                      (("health-store", "data", None),)))
        out["health_callback_s"], out["health_callback_bytes"] = t, b
        t, b = best(lambda: _callback(http, [("tree-graph", "figure")], [("run-id", "data", run_id),
                                                                         ("health-store", "data", []),
                                                                         ("theme", "data", "light")],
                                      (("tree-root", "data", None),)))
        out["tree_callback_s"], out["tree_callback_bytes"] = t, b
    return out


def script_seconds(cdp: Any) -> float:
    return float(next(m["value"] for m in cdp.send("Performance.getMetrics")["metrics"] if m["name"] == "ScriptDuration"))


#: Trace events of the renderer's main thread, summed by kind (``devtools.timeline``).
TRACE_KINDS = {"script": ("FunctionCall", "EvaluateScript", "v8.compile", "v8.compileModule", "TimerFire",
                          "FireAnimationFrame", "EventDispatch", "RunMicrotasks", "v8.evaluateModule", "XHRLoad",
                          "XHRReadyStateChange"),
               "style": ("UpdateLayoutTree", "RecalculateStyles", "ParseAuthorStyleSheet"),
               "layout": ("Layout",), "paint": ("Paint", "PaintImage", "PrePaint", "Layerize", "UpdateLayer",
                                                 "CompositeLayers", "Commit"),
               "parse": ("ParseHTML",), "gc": ("MajorGC", "MinorGC", "V8.GCScavenger", "V8.GC_MC_BACKGROUND_MARKING")}


def _trace_split(trace: bytes, end_ms: float) -> dict[str, float]:
    """Seconds of each kind of main-thread work (:data:`TRACE_KINDS`, outermost events only) from
    navigation start until ``end_ms`` (page time), and the busy total (``RunTask``)."""
    events = json.loads(trace)
    events = events["traceEvents"] if isinstance(events, dict) else events
    main = {(e["pid"], e["tid"]) for e in events if e.get("name") == "thread_name"
            and e.get("args", {}).get("name") == "CrRendererMain"}
    nav = [e["ts"] for e in events if e.get("name") in ("navigationStart", "NavigationTiming",
                                                         "CommitLoad", "FrameCommittedInBrowser")]
    kind_of = {n: k for k, ns in TRACE_KINDS.items() for n in ns}
    spans: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("ph") == "X" and (e["pid"], e["tid"]) in main and "dur" in e:
            spans.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    out = {k: 0.0 for k in TRACE_KINDS} | {"busy": 0.0}
    if not spans:
        return out
    # the page's renderer: the thread with the most work
    key = max(spans, key=lambda k: sum(b - a for a, b, _ in spans[k]))
    evs = sorted(spans[key], key=lambda t: (t[0], -t[1]))
    t0 = min(nav) if nav else evs[0][0]
    stop = t0 + end_ms * 1000
    open_by_kind: dict[str, float] = {}
    for a, b, name in evs:
        if a > stop:
            break
        b = min(b, stop)
        if name == "RunTask":
            out["busy"] += (b - a) / 1e6
            continue
        k = kind_of.get(name)
        if k is None or open_by_kind.get(k, -1) >= b:  # nested in an event of the same kind: counted
            continue
        a = max(a, open_by_kind.get(k, a))
        out[k] += (b - a) / 1e6
        open_by_kind[k] = b
    return out


def _long_tasks(trace: bytes, end_ms: float, floor_ms: float = 40.0) -> list[list[Any]]:
    """The main thread's tasks over ``floor_ms`` until ``end_ms``: [start ms, duration ms, what ran
    longest inside it (a script URL tail, or an event name)]."""
    events = json.loads(trace)
    events = events["traceEvents"] if isinstance(events, dict) else events
    main = {(e["pid"], e["tid"]) for e in events if e.get("name") == "thread_name"
            and e.get("args", {}).get("name") == "CrRendererMain"}
    xs = [e for e in events if e.get("ph") == "X" and (e["pid"], e["tid"]) in main and "dur" in e]
    if not xs:
        return []
    key = max({(e["pid"], e["tid"]) for e in xs}, key=lambda k: sum(e["dur"] for e in xs if (e["pid"], e["tid"]) == k))
    xs = sorted((e for e in xs if (e["pid"], e["tid"]) == key), key=lambda e: e["ts"])
    nav = [e["ts"] for e in events if e.get("name") in ("navigationStart", "NavigationTiming", "CommitLoad",
                                                         "FrameCommittedInBrowser")]
    t0 = min(nav) if nav else xs[0]["ts"]
    out = []
    tasks = [e for e in xs if e["name"] == "RunTask" and e["dur"] >= floor_ms * 1000]
    for t in tasks:
        if t["ts"] - t0 > end_ms * 1000:
            break
        inner = [e for e in xs if e["name"] != "RunTask" and t["ts"] <= e["ts"] < t["ts"] + t["dur"]]
        top = max(inner, key=lambda e: e["dur"], default=None)
        what = ""
        if top is not None:
            d = top.get("args", {}).get("data", {})
            what = top["name"] + " " + str(d.get("url") or d.get("functionName") or d.get("type") or "")[-40:]
        out.append([round((t["ts"] - t0) / 1000), round(t["dur"] / 1000), what])
    return out


def first_render(browser: Any, base: str, run_id: str, shot: Path | None = None) -> dict[str, Any]:
    """One cold first render of the run page (a new browser context: nothing cached) and where its
    time went: each callback request (page time), each Plotly draw, main-thread work by kind."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.add_init_script(PLOTLY_HOOK)
    calls: list[dict[str, Any]] = []

    def finished(req: Any) -> None:
        if "_dash-update-component" not in req.url:
            return
        try:
            body = json.loads(req.post_data or "{}")
            size = len(req.response().body())
        except Exception:  # noqa: BLE001 - a request cut short by the context's close
            return
        out = body.get("output", "?")
        calls.append({"output": out[:60], "timing": req.timing, "bytes": size})
    page.on("requestfinished", finished)
    cdp = ctx.new_cdp_session(page)
    cdp.send("Performance.enable")
    browser.start_tracing(page=page, categories=["devtools.timeline", "blink.user_timing", "loading",
                                                 "disabled-by-default-devtools.timeline"])
    page.goto(f"{base}/runs/{run_id}")
    page.wait_for_function(DRAWN, timeout=600_000, polling="raf")
    out: dict[str, Any] = {"first_render_s": page.evaluate("() => performance.now()") / 1000}
    page.wait_for_function(ALL_DRAWN, arg=list(GRAPHS), timeout=600_000, polling="raf")
    end_ms = page.evaluate("() => performance.now()")
    out["all_drawn_s"] = end_ms / 1000
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    trace = browser.stop_tracing()
    if shot is not None:  # the first render's trace beside its screenshot (chrome://tracing, Perfetto)
        shot.with_suffix(".trace.json").write_bytes(trace)
    page.wait_for_timeout(1500)  # callbacks that land after the last chart (events, health) count as bytes
    origin = page.evaluate("() => performance.timeOrigin")
    draws = page.evaluate("() => window.__gwDraws")
    first = page.evaluate("() => window.__gwFirst")
    out["cdp_s"] = {k: round(metrics.get(k, 0.0), 3) for k in ("ScriptDuration", "LayoutDuration",
                                                                "RecalcStyleDuration", "TaskDuration")}
    out["trace_s"] = {k: round(v, 3) for k, v in _trace_split(trace, end_ms).items()}
    out["render_bytes"] = sum(c["bytes"] for c in calls)
    out["callbacks"] = len(calls)
    out["callback_list"] = sorted(
        ([round(c["timing"]["startTime"] - origin), round(c["timing"]["startTime"] - origin + c["timing"]["responseEnd"]),
          c["bytes"], c["output"]] for c in calls), key=lambda r: r[0])
    per: dict[str, list[float]] = {}
    for d in draws:
        per.setdefault(d["id"], []).append(round(d["sync"]))
    out["plotly_draws"] = {k: v for k, v in sorted(per.items())}  # graph -> ms of each draw
    out["plotly_sync_s"] = round(sum(d["sync"] for d in draws) / 1000, 3)
    out["first_drawn_ms"] = {k: round(v) for k, v in sorted(first.items(), key=lambda kv: kv[1])}
    out["heatmap_columns"] = page.evaluate(
        "() => document.querySelector('#heatmap .js-plotly-plot').data[0].x.length")
    out["resources"] = page.evaluate(  # when each script and Dash request arrived (page ms), its size
        "() => performance.getEntriesByType('resource').filter(r => !/_dash-update-component/.test(r.name)).map(r => "
        "[r.name.split('/').pop().split('?')[0].slice(0, 40), Math.round(r.startTime), Math.round(r.responseEnd), "
        "r.encodedBodySize])")
    out["long_tasks"] = _long_tasks(trace, end_ms)
    if shot is not None:
        page.screenshot(path=str(shot), full_page=True)
    ctx.close()
    return out


def measure(base: str, run_id: str, layers: int, steps: int, updates: int, renders: int = 3) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    out: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        shots = Path(tempfile.gettempdir())
        got = [first_render(browser, base, run_id, shots / f"dashboard-bench-first-{layers}x{steps}.png" if k == 0
                            else None) for k in range(renders)]
        got.sort(key=lambda g: g["all_drawn_s"])
        med = got[len(got) // 2]  # the median run, whole (its split belongs to it)
        out.update(med)
        out["all_drawn_runs_s"] = [round(g["all_drawn_s"], 3) for g in got]
        out["first_render_runs_s"] = sorted(round(g["first_render_s"], 3) for g in got)
        if updates <= 0:
            browser.close()
            return out
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        frames: list[int] = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(
            len(f if isinstance(f, (bytes, str)) else f.get("payload", "")))) if "/live" in ws.url else None)
        page.goto(f"{base}/runs/{run_id}")
        page.wait_for_function(DRAWN, timeout=600_000, polling="raf")
        try:
            page.wait_for_function("() => window.gradwatchLive && window.gradwatchLive.stats.subscribed > 0",
                                   timeout=120_000)
        except Exception:
            print(page.evaluate("() => JSON.stringify([window.gradwatchLive && window.gradwatchLive.stats, "
                                "document.querySelector('#live-status').innerText, Array.from(document.scripts).map(s => s.src).filter(s => s.includes('assets')), typeof window.gradwatchLive])"), errors[:5], file=sys.stderr)
            raise
        page.wait_for_timeout(1000)
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        t0, s0 = time.monotonic(), script_seconds(cdp)
        page.wait_for_timeout(updates * 300)
        idle = (script_seconds(cdp) - s0) / (time.monotonic() - t0)  # script seconds per second, idle page
        frames.clear()
        f0 = page.evaluate("() => window.gradwatchLive.stats.flushes")
        t0, s0 = time.monotonic(), script_seconds(cdp)
        with httpx.Client(base_url=base, timeout=60) as http:
            # a kept database already holds earlier runs' live steps: continue after them, new source
            steps = max(steps, http.get(f"/api/v1/runs/{run_id}").json()["last_step"] or 0)
            source = 8 + int(time.time()) % 1_000_000
            for k in range(updates):
                step = steps + 1 + k
                r = http.post("/api/v1/ingest", content=live_batch(run_id, layers, step, k + 1, source),
                              headers={"Content-Type": "application/json"})
                r.raise_for_status()
                page.wait_for_function(
                    "(s) => { const g = document.querySelector('#norm-graph .js-plotly-plot'); "
                    "const x = g.data[0].x; return x[x.length - 1] >= s; }", arg=step, timeout=120_000, polling=50)
        elapsed = time.monotonic() - t0
        live_script = script_seconds(cdp) - s0 - idle * elapsed
        flushes = page.evaluate("() => window.gradwatchLive.stats.flushes") - f0
        out.update(updates=updates, flushes=flushes, live_script_ms_per_update=1000 * live_script / max(1, flushes),
                   idle_script_ms_per_s=1000 * idle, live_bytes_per_update=sum(frames) / max(1, len(frames)),
                   live_frames=len(frames),
                   own_flush_ms_max=page.evaluate("() => window.gradwatchLive.stats.maxScriptMs"))
        page.screenshot(path=str(Path(tempfile.gettempdir()) / f"dashboard-bench-{layers}x{steps}.png"), full_page=True)
        browser.close()
    return out


@contextlib.contextmanager
def kept_database(name: str) -> Iterator[str]:
    """PostgreSQL database ``name``, created if missing, migrated to head, never dropped (a
    500 × 100,000 run is 50M rows: minutes to build on a small box)."""
    import psycopg

    from gradwatch.server.db.engine import make_engine
    from gradwatch.server.db.migrate import upgrade_to_head

    with psycopg.connect(ib._libpq(ib.PG_ADMIN), autocommit=True) as c:
        if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            c.execute(f'CREATE DATABASE "{name}"')
    url = ib.PG_ADMIN.rpartition("/")[0] + "/" + name
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    yield url


def run_exists(url: str, run_id: str) -> bool:
    import psycopg

    with psycopg.connect(ib._libpq(url)) as c:
        return c.execute("SELECT 1 FROM run WHERE id = %s", (run_id,)).fetchone() is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=500)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--backend", default="postgresql", choices=["postgresql", "sqlite"])
    ap.add_argument("--updates", type=int, default=30, help="live updates to measure")
    ap.add_argument("--profile-only", action="store_true", help="server-side split only (no browser)")
    ap.add_argument("--skip-profile", action="store_true", help="no server-side split (it posts this checkout's "
                    "callback signatures: skip it against a --server-pythonpath of another commit)")
    ap.add_argument("--renders", type=int, default=3, help="cold first renders (the median one is reported)")
    ap.add_argument("--keep-db", metavar="NAME", help="PostgreSQL: build the run in database NAME once and keep "
                    "it between runs (migrated to head on each use; drop it with DROP DATABASE NAME WITH (FORCE))")
    ap.add_argument("--build-only", action="store_true", help="with --keep-db: build (or migrate) and exit")
    ap.add_argument("--server-pythonpath", metavar="DIR", help="serve with the gradwatch found in DIR (e.g. an "
                    "archive of an earlier commit, for a before/after pair), without migrating on start")
    a = ap.parse_args()
    ib.LAYERS = a.layers  # the builder lays down ib.LAYERS layers per step
    with tempfile.TemporaryDirectory() as tmp, (kept_database(a.keep_db) if a.keep_db else
                                                ib.database(a.backend, Path(tmp))) as url:
        t0 = time.perf_counter()
        run_id, steps = "big", a.steps
        if not (a.keep_db and run_exists(url, run_id)):
            run_id, steps = ib.build_big_run(a.backend, url, a.layers * a.steps)
            add_step_records(a.backend, url, run_id, steps)
        build_s = time.perf_counter() - t0
        if a.build_only:
            print(json.dumps({"database": a.keep_db, "build_s": round(build_s, 1)}))
            return
        env = {"PYTHONPATH": a.server_pythonpath, "GRADWATCH_SERVER_MIGRATE_ON_START": "false"} \
            if a.server_pythonpath else None
        log = Path(tmp) / "server.log"
        with ib.server(url, log, env) as base:
            try:
                got = {} if a.skip_profile else profile(base, run_id)
                if not a.profile_only:
                    got.update(measure(base, run_id, a.layers, steps, a.updates, a.renders))
            except Exception:
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)  # the server's side of it
                raise
    print(json.dumps({"backend": a.backend, "server": a.server_pythonpath or "this checkout", "layers": a.layers,
                      "steps": steps, "build_s": round(build_s, 1),
                      **{k: round(v, 3) if isinstance(v, float) else v for k, v in got.items()}}, indent=1))


if __name__ == "__main__":
    main()
