"""Dash callbacks: each reads the API through :class:`~gradwatch.dashboard.api.Api` and hands
the responses to the figure builders. All are ``async``: the FastAPI backend runs a callback on
the server's event loop, and the API requests it makes are served by the same loop.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs

import dash
from dash import Input, Output, State, html, no_update

from gradwatch.dashboard import figures as fig
from gradwatch.dashboard import layout
from gradwatch.dashboard.api import Api, ApiError, num

#: Stats drawn for a selected layer (each one line with its min–max band).
LAYER_SERIES_STATS = ("l2", "std", "var", "maxabs")
#: Step buckets of the heatmap snapshot when the window's width is unknown; otherwise one bucket
#: per ~3 px of the plot area (more buckets than a screen shows cost transfer and drawing for
#: nothing; the server may answer fewer: whole 64-step rollup blocks over a long run).
HEATMAP_POINTS = 400


def heatmap_points(width: Any) -> int:
    """Buckets for a heatmap in a window ``width`` px wide (margins, labels and colour bar off)."""
    if not isinstance(width, (int, float)) or width <= 0:
        return HEATMAP_POINTS
    return int(min(1000, max(100, (width - 260) // 3)))


#: Passes on a chart's ``relayoutData`` only when it sets or resets the x range: Plotly also
#: relayouts on its first draw (``autosize``), on a y zoom and on a hover-mode change, and each
#: of those would otherwise cost one server round trip that refetches nothing.
_X_RELAYOUT = """function(r) {
    if (r && (r['xaxis.autorange'] || r['xaxis.range'] !== undefined || r['xaxis.range[0]'] !== undefined)) {
        return r;
    }
    return window.dash_clientside.no_update;
}"""


STEP_FIELDS = ["total_norm", "total_norm_post", "loss_scale"]
#: Points (buckets) a line chart asks for: about two per pixel of a chart in the two-column grid
#: (~650 px at 1,400 px; each bucket keeps its min–max band, so a one-step spike stays visible).
#: 4,000 made the total-norm chart 0.27 MB of JSON and ~0.1 s of Plotly per draw at 500 × 10,000.
CHART_POINTS = 1500


def _fmt_time(t: Any) -> str:
    v = num(t)
    if v is None or v != v:
        return ""
    return datetime.fromtimestamp(v, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def run_rows(runs: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """The runs table's rows: a link per run, times readable, counts as the server reports them."""
    now = time.time() if now is None else now
    rows = []
    for r in runs:
        start = num(r.get("started_at"))
        if start is None or not math.isfinite(start):
            start = r.get("created_at")
        end = now if r.get("status") == "running" else r.get("updated_at")
        label = r.get("name") or r["run_id"]
        rows.append({"id": r["run_id"], "run_id": r["run_id"], "status": r.get("status"),
                     "project": r.get("project"), "name": f"[{label}](/runs/{r['run_id']})",
                     "last_step": r.get("last_step"), "started": _fmt_time(start),
                     "duration": _fmt_duration(None if start is None or end is None else end - start),
                     **fig.run_counts(r)})
    return rows


def register(app: dash.Dash, api_factory: Callable[[], Api], server_url: Callable[[], str]) -> None:
    """Wire every callback of the dashboard onto ``app``. ``api_factory`` makes a client for the
    current request (its token taken from the request's cookie)."""

    @app.callback(Output("page", "children"), Input("url", "pathname"), State("url", "search"))
    async def route(pathname: str | None, search: str | None) -> Any:
        path = (pathname or "/").rstrip("/") or "/"
        if path == "/":
            return layout.runs_page()
        if path.startswith("/runs/") and path.count("/") == 2:
            return layout.run_page(path.split("/")[2])
        if path == "/compare":
            ids = parse_qs((search or "").lstrip("?")).get("runs", [""])[0]
            return layout.compare_page([x for x in ids.split(",") if x])
        return layout.message(f"No page at {path}.", "error", [dash.dcc.Link("Back to the runs", href="/")])

    app.clientside_callback(
        "function(n, theme){ if (n) { theme = theme === 'dark' ? 'light' : 'dark'; } return theme || 'light'; }",
        Output("theme", "data"), Input("theme-toggle", "n_clicks"), State("theme", "data"))
    app.clientside_callback("function(p){ return window.innerWidth || null; }", Output("viewport", "data"),
                            Input("url", "pathname"))
    app.clientside_callback("function(theme){ return 'gw-' + (theme || 'light'); }",
                            Output("gw-root", "className"), Input("theme", "data"))

    # -- runs page ---------------------------------------------------------------------------
    @app.callback(Output("runs-table", "data"), Output("runs-error", "children"), Output("runs-empty", "children"),
                  Input("runs-refresh", "n_intervals"))
    async def runs_table(_: Any) -> Any:
        try:
            async with api_factory() as api:
                runs = await api.runs()
        except ApiError as e:
            return no_update, _error(e), no_update
        return run_rows(runs), None, (layout.empty_state(server_url()) if not runs else None)

    @app.callback(Output("compare-link", "href"), Input("runs-table", "selected_rows"), State("runs-table", "data"))
    async def compare_link(selected: list[int] | None, data: list[dict[str, Any]]) -> str:
        ids = [data[i]["run_id"] for i in (selected or []) if i < len(data)]
        return "/compare?runs=" + ",".join(ids)

    # -- run page ----------------------------------------------------------------------------
    @app.callback(Output("run-title", "children"), Output("run-status", "children"),
                  Output("run-error", "children"), Input("status-refresh", "n_intervals"), Input("run-id", "data"))
    async def run_header(_: Any, run_id: str) -> Any:
        try:
            async with api_factory() as api:
                run = await api.run(run_id)
        except ApiError as e:
            return no_update, no_update, _error(e)
        status = run["status"]
        label = {"running": "● running", "finished": "finished — the run has ended",
                 "crashed": "crashed — the run has ended"}.get(status, status)
        title = f"{run.get('name') or run_id} · {run.get('project')}"
        return title, html.Span(label, className=f"gw-status-{status}", id="run-status-text"), None

    def zoomable(gid: str, outputs: list[Output], *deps: Input | State) -> Callable[[Any], Any]:
        """Register ``fn`` twice: fired by ``deps`` with the chart's zoom store as state, and fired
        by the zoom alone (everything else as state). Two callbacks, so a zoom cannot supersede a
        pending change of the statistic, the grouping or a reset: Dash drops an in-flight request
        of a callback that fires again. The zoom store is fed in the browser from
        ``relayoutData``, with only the relayouts that change the x range (a drag, a double click,
        a jump): an autosize after a draw or a y zoom never reaches the server."""
        zoom = (layout.zoom_id(gid), "data")
        app.clientside_callback(_X_RELAYOUT, Output(*zoom), Input(gid, "relayoutData"), prevent_initial_call=True)

        def deco(fn: Any) -> Any:
            app.callback(*outputs, *[State(*zoom) if (d.component_id, d.component_property) == zoom else d
                                     for d in deps])(fn)
            app.callback(*[Output(o.component_id, o.component_property, allow_duplicate=True) for o in outputs],
                         *[Input(*zoom) if (d.component_id, d.component_property) == zoom
                           else State(d.component_id, d.component_property) for d in deps],
                         prevent_initial_call=True)(fn)
            return fn
        return deco

    @zoomable("heatmap", [Output("heatmap", "figure"), Output("regex-error", "children"),
                          Output("layer-select", "options")],
              Input("run-id", "data"), Input("heatmap-stat", "value"), Input("layer-regex", "value"),
              Input("theme", "data"), Input("reset-zoom", "n_clicks"), Input("group-depth", "value"),
              Input(layout.zoom_id("heatmap"), "data"), State("viewport", "data"))
    async def heatmap(run_id: str, stat: str, pattern: str | None, theme: str, reset: Any, depth: Any,
                      relayout: dict[str, Any] | None, width: Any) -> Any:
        start, end, skip = zoom_range(relayout, "heatmap")
        if skip:
            return no_update, no_update, no_update
        points = heatmap_points(width)
        try:
            async with api_factory() as api:
                api_stat = "l2" if stat == "ratio" else fig.heatmap_stat(stat)[0]
                last = (await api.run(run_id)).get("last_step")  # the snapshot ends here; live resumes after
                stop = last if end is None or last is None else min(end, last)
                hm = await api.heatmap(run_id, api_stat, start=start, end=stop, max_points=points)
                weights = None
                if stat == "ratio":
                    weights = await api.heatmap(run_id, "wnorm", start=start, end=stop, max_points=points)
                    if not any(v is not None for row in weights.get("values", []) for v in row):
                        msg = "No weight norms in this run (its agent did not send wnorm): no gradient-to-weight ratio."
                        return fig.empty_figure(msg, theme, "Layers × steps"), None, no_update
        except ApiError as e:
            if e.status in (400, 404, 422) and "stat" in e.message:  # a statistic this server does not know
                return (fig.not_recorded(fig.heatmap_stat(stat)[1], theme, "Layers × steps",
                                         "this server does not serve it"), None, no_update)
            return fig.empty_figure(e.message, theme, "Layers × steps"), None, no_update
        if hm.get("steps") and stat != "nonfinite" and not any(
                v is not None for row in hm.get("values", []) for v in row):
            return fig.not_recorded(fig.heatmap_stat(stat)[1], theme, "Layers × steps",
                                    "its agent sent no values for it"), None, no_update
        names = [ly["name"] for ly in hm.get("layers", [])]
        _, err = fig.layer_filter(names, pattern)
        out = fig.heatmap_figure(hm, stat, pattern=pattern, theme=theme, weights=weights, last_step=last,
                                 depth=int(depth or 0))
        return _zoomed(out, start, end, reset), err, [{"label": n, "value": n} for n in names]

    @app.callback(Output("layer-regex", "value"), Output("group-depth", "value"), Input("heatmap", "clickData"),
                  State("group-depth", "value"), prevent_initial_call=True)
    async def open_group(click: dict[str, Any] | None, depth: Any) -> Any:
        """A click on a group's row opens it: only its layers, one level deeper."""
        label = click["points"][0].get("y") if click and click.get("points") else None
        prefix = fig.group_prefix(label) if isinstance(label, str) else None
        if prefix is None:
            return no_update, no_update
        return "^" + re.escape(prefix) + r"\.", int(depth or 0) + 1

    @app.callback(Output("layer-select", "value"), Input("heatmap", "clickData"), Input("layer-regex", "value"),
                  State("layer-select", "options"), prevent_initial_call=True)
    async def pick_layer(click: dict[str, Any] | None, pattern: str | None, options: list[dict[str, str]]) -> Any:
        trigger = dash.ctx.triggered_id
        if trigger == "heatmap" and click and click.get("points"):
            y = click["points"][0].get("y")
            return y if isinstance(y, str) and fig.group_prefix(y) is None else no_update
        if trigger == "layer-regex" and pattern:
            keep, _ = fig.layer_filter([o["value"] for o in options or []], pattern)
            if len(keep) == 1:
                return options[keep[0]]["value"]
        return no_update

    @zoomable("layer-graph", [Output("layer-graph", "figure")], Input("layer-select", "value"),
              Input("run-id", "data"), Input("theme", "data"), Input(layout.zoom_id("layer-graph"), "data"),
              Input("reset-zoom", "n_clicks"))
    async def layer_series(layer: str | None, run_id: str, theme: str, relayout: dict[str, Any] | None,
                           reset: Any = None) -> Any:
        start, end, skip = zoom_range(relayout, "layer-graph")
        if skip:  # e.g. the autosize after the first draw: the empty state is drawn already
            return no_update
        if not layer:
            return fig.empty_figure("Click a heatmap cell or search a layer to see its series.", theme, "Layer")
        try:
            async with api_factory() as api:
                # the run's last step first: the series stop there and the live script appends what follows
                last = (await api.run(run_id)).get("last_step")
                stop = last if end is None or last is None else min(end, last)
                got = await asyncio.gather(*[api.layer_stats(run_id, layer, s, start=start, end=stop,
                                                             max_points=2000) for s in LAYER_SERIES_STATS])
        except ApiError as e:
            return fig.empty_figure(e.message, theme, "Layer")
        index = next((g["layer"] for g in got if isinstance(g.get("layer"), int)), None)
        return _zoomed(fig.layer_series_figure(layer, dict(zip(LAYER_SERIES_STATS, got)), theme, index, last),
                       start, end, reset)

    # Each chart is its own callback: a zoom (relayoutData) refetches that chart's visible range
    # at full resolution (min/max/mean buckets); "Reset zoom" or a double click, the whole run.
    # Every figure carries the run's last step at fetch time (``meta.last_step``): the live
    # script appends what comes after it.
    def step_chart(gid: str, build: Callable[[Api, str, int | None, int | None, int | None, str], Any]) -> None:
        @zoomable(gid, [Output(gid, "figure")], Input("run-id", "data"), Input("theme", "data"),
                  Input("reset-zoom", "n_clicks"), Input(layout.zoom_id(gid), "data"))
        async def chart(run_id: str, theme: str, reset: Any, relayout: dict[str, Any] | None) -> Any:
            start, end, skip = zoom_range(relayout, gid)
            if skip:
                return no_update
            try:
                async with api_factory() as api:
                    last = (await api.run(run_id)).get("last_step")
                    stop = last if end is None or last is None else min(end, last)
                    out = await build(api, run_id, start, stop, last, theme)
            except ApiError as e:
                return fig.empty_figure(e.message, theme)
            return _zoomed(out, start, end, reset)

    async def norm(api: Api, run_id: str, start: int | None, stop: int | None, last: int | None, theme: str) -> Any:
        steps, events = await asyncio.gather(api.steps(run_id, STEP_FIELDS[:2], start=start, end=stop,
                                                       max_points=CHART_POINTS),
                                             api.events(run_id, ["clip"], start=start, end=stop))
        return fig.norm_figure(steps, events, theme, last)

    async def scale(api: Api, run_id: str, start: int | None, stop: int | None, last: int | None, theme: str) -> Any:
        steps, events = await asyncio.gather(
            api.steps(run_id, ["loss_scale"], start=start, end=stop, max_points=CHART_POINTS),
            api.events(run_id, ["overflow", "skipped", "scale_growth"], start=start, end=stop))
        return fig.scale_figure(steps, events, theme, last)

    async def scalars(api: Api, run_id: str, start: int | None, stop: int | None, last: int | None,
                      theme: str) -> Any:
        keys = (await api.scalar_keys(run_id))[:8]
        got = await asyncio.gather(*[api.scalar(run_id, k, start=start, end=stop, max_points=CHART_POINTS // 2)
                                     for k in keys])
        # a step's scalars may be stored in a later batch than the step: over the whole run the
        # live script resumes after the last step whose scalars this figure holds, not the run's
        held = fig.last_series_step(got)
        return fig.scalars_figure(dict(zip(keys, got)), theme,
                                  held if start is None and stop == last and held is not None else last)

    async def transforms(api: Api, run_id: str, start: int | None, stop: int | None, last: int | None,
                         theme: str) -> Any:
        got = await api.transforms(run_id, start=start, end=stop, max_points=CHART_POINTS // 2)
        return fig.transforms_figure(got, theme, last)

    for gid, build in (("norm-graph", norm), ("scale-graph", scale), ("scalars-graph", scalars),
                       ("transforms-graph", transforms)):
        step_chart(gid, build)

    @app.callback(Output("events-store", "data"), Output("snapshot", "data"), Input("run-id", "data"),
                  Input("reset-zoom", "n_clicks"))
    async def snapshot(run_id: str, _: Any) -> Any:
        """The events list, and the snapshot the live script starts from."""
        try:
            async with api_factory() as api:
                run, events = await asyncio.gather(api.run(run_id), api.events(run_id))
        except ApiError:
            return [], None
        return events, {"run_id": run_id, "last_step": run.get("last_step"), "status": run.get("status"),
                        "t": time.time()}

    @app.callback(Output("events-store", "data", allow_duplicate=True), Input("live-tick", "data"),
                  State("run-id", "data"), prevent_initial_call=True)
    async def live_events(tick: dict[str, Any] | None, run_id: str) -> Any:
        """New events arrived on the live stream: reload the (small) events list."""
        try:
            async with api_factory() as api:
                return await api.events(run_id)
        except ApiError:
            return no_update

    @app.callback(Output("events-table", "data"), Input("events-store", "data"), Input("health-store", "data"),
                  Input("event-kinds", "value"), Input("event-severity", "value"))
    async def events_table(events: list[dict[str, Any]] | None, health: list[dict[str, Any]] | None,
                           kinds: list[str], severity: str | None) -> Any:
        # detector events are not on the live stream: the polled health list brings them in between
        return fig.events_rows((events or []) + (health or []), kinds, severity)

    @app.callback(Output("health-store", "data"), Input("run-id", "data"), Input("status-refresh", "n_intervals"),
                  Input("live-tick", "data"), State("health-store", "data"))
    async def health_store(run_id: str, _tick: Any = None, _live: Any = None, held: Any = None) -> Any:
        """The run's warning-and-worse events (agent and detectors), every few seconds. A run that
        has ended changes no more: the same list is not set again, so the health lines, the events
        table and the module tree are not redrawn every 4 s for nothing."""
        try:
            async with api_factory() as api:
                events, run = await asyncio.gather(api.events(run_id, severity="warning"), api.run(run_id))
        except ApiError:
            return no_update
        if dash.ctx.triggered_id == "status-refresh" and events == held and run.get("status") != "running":
            return no_update
        return events

    @app.callback(Output("health-lines", "children"), Input("health-store", "data"))
    async def health_lines(events: list[dict[str, Any]] | None) -> Any:
        lines, more = fig.health_lines(events or [])
        if not lines:
            return html.P("✓ No problems detected.", className="gw-ok", id="health-ok")
        out = [html.Div(className="gw-health-line", children=[
            html.Span(ln["severity"], className=f"gw-sev gw-sev-{ln['severity']}"),
            html.Button(f"step {ln['step']}", id={"type": "health-step", "step": ln["step"]},
                        className="gw-health-step", title="move every chart to this step"),
            html.Span(ln["kind"], className="gw-health-kind"),
            html.Span(ln["text"], className="gw-health-text"),
            html.Span(("layers: " + ", ".join(ln["layers"][:4]) + (f" +{len(ln['layers']) - 4}"
                                                                    if len(ln["layers"]) > 4 else ""))
                      if ln["layers"] else "", className="gw-health-layers"),
        ]) for ln in lines]
        if more:
            out.append(html.P(f"and {more} more: see the events table below.", className="gw-hint"))
        return out

    @app.callback(Output("tree-graph", "figure"), Input("run-id", "data"), Input("health-store", "data"),
                  Input("theme", "data"), State("tree-root", "data"))
    async def module_tree(run_id: str, events: list[dict[str, Any]] | None, theme: str, root: str | None = None) -> Any:
        """The module tree, coloured by each module's worst current signal (redrawn with the health list)."""
        try:
            async with api_factory() as api:
                run, layers = await asyncio.gather(api.run(run_id), api.layers(run_id))
                last = run.get("last_step")
                latest = nonfinite = None
                if last is not None:
                    latest, nonfinite = await asyncio.gather(
                        api.heatmap(run_id, "l2", start=last, end=last, max_points=1),
                        api.heatmap(run_id, "nonfinite", start=last, end=last, max_points=1))
        except ApiError as e:
            return fig.empty_figure(e.message, theme, "Module tree")
        names = [ly["name"] for ly in layers]
        signals = fig.layer_signals(names, latest, events or [], last, nonfinite)
        return fig.module_tree_figure(names, signals, theme, last, root)

    @app.callback(Output("tree-graph", "figure", allow_duplicate=True), Output("tree-root", "data"),
                  Input("tree-graph", "clickData"), State("run-id", "data"), State("health-store", "data"),
                  State("theme", "data"), State("tree-root", "data"), prevent_initial_call=True)
    async def tree_zoom(click: dict[str, Any] | None, run_id: str, events: list[dict[str, Any]] | None, theme: str,
                        root: str | None) -> Any:
        """A click on a module of a tree that holds only the levels it draws (a big model) draws
        the levels under it; a click on the module drawn as the root goes one level up. A tree
        that holds every node zooms in the browser (Plotly's own), untouched here."""
        point = (click or {}).get("points") or [{}]
        node = point[0].get("id") or (point[0].get("customdata") or [None])[0]
        if not isinstance(node, str):
            return no_update, no_update
        new_root = fig.tree_parent(node) if node == (root or "(model)") else node
        out = await module_tree(run_id, events, theme, new_root)
        meta = out.get("layout", {}).get("meta") or {}
        if meta.get("root") == (root or "(model)"):  # no other root drawn (a small tree: always the model's)
            return no_update, no_update
        if new_root not in out["data"][0]["parents"]:  # a layer: nothing under it to draw
            return no_update, no_update
        return out, meta.get("root")

    @app.callback(Output("step-stat-graph", "figure"), Input("step-stat", "value"), Input("run-id", "data"),
                  Input("theme", "data"), Input("reset-zoom", "n_clicks"))
    async def step_stat(name: str | None, run_id: str, theme: str, _: Any) -> Any:
        if not name or name not in fig.STEP_STATS:
            return fig.empty_figure("Pick a step statistic.", theme)
        try:
            async with api_factory() as api:
                resp = await api.steps(run_id, [fig.STEP_STATS[name][0]], max_points=CHART_POINTS)
        except ApiError as e:
            if e.status in (400, 422):  # a field this server does not know
                return fig.step_stat_figure(name, None, theme, "this server does not serve it")
            return fig.empty_figure(e.message + ".", theme)  # 404: the run itself is not found
        return fig.step_stat_figure(name, resp, theme, "its agent sent no values for it")

    # The browser does the rest: live stream, jumping charts to an event (assets/live.js).
    app.clientside_callback(
        "function(snap){ if (window.gradwatchLive) { window.gradwatchLive.start(snap); } return ''; }",
        Output("live-dummy", "children"), Input("snapshot", "data"))
    app.clientside_callback(
        "function(cell, data){ if (cell && window.gradwatchLive) { window.gradwatchLive.jump(cell, data); } "
        "return ''; }",
        Output("jump-dummy", "children"), Input("events-table", "active_cell"),
        State("events-table", "derived_viewport_data"))
    app.clientside_callback(  # a health line's step: the same jump
        "function(clicks){ const t = (window.dash_clientside.callback_context.triggered || [])[0]; "
        "if (!t || !t.value || !window.gradwatchLive) { return ''; } "
        "const id = JSON.parse(t.prop_id.slice(0, t.prop_id.lastIndexOf('.'))); "
        "window.gradwatchLive.jump({row: 0}, [{step: id.step}]); return ''; }",
        Output("health-jump-dummy", "children"), Input({"type": "health-step", "step": dash.ALL}, "n_clicks"))

    # -- compare page ------------------------------------------------------------------------
    @app.callback(Output("compare-norm", "figure"), Output("compare-scalars", "figure"),
                  Output("compare-layer", "options"), Output("compare-runs", "children"),
                  Input("compare-ids", "data"), Input("theme", "data"))
    async def compare(run_ids: list[str], theme: str) -> Any:
        if len(run_ids) < 2:
            msg = fig.empty_figure("Select two or more runs on the runs page to compare them.", theme)
            return msg, msg, [], no_update
        try:
            async with api_factory() as api:
                steps = await asyncio.gather(*[api.steps(r, ["total_norm"], max_points=2000) for r in run_ids])
                loss = await asyncio.gather(*[_loss(api, r) for r in run_ids])
                layer_lists = await asyncio.gather(*[api.layers(r) for r in run_ids])
                labels = fig.run_labels(dict(zip(run_ids, await asyncio.gather(*[api.run(r) for r in run_ids]))))
        except ApiError as e:
            err = fig.empty_figure(e.message, theme)
            return err, err, [], _error(e)
        shared = set.intersection(*[{ly["name"] for ly in ls} for ls in layer_lists])
        names = [ly["name"] for ly in layer_lists[0] if ly["name"] in shared]
        norm = fig.compare_figure({r: s for r, s in zip(run_ids, steps)}, "total_norm", "Total gradient norm",
                                  theme, log=True, labels=labels)
        scal = fig.compare_figure({r: s for r, s in zip(run_ids, loss) if s is not None}, None, "loss", theme,
                                  labels=labels)
        links = [dash.dcc.Link(labels[r], href=f"/runs/{r}", title=r) for r in run_ids]
        return norm, scal, [{"label": n, "value": n} for n in names], [x for a in links for x in (a, " · ")][:-1]

    @app.callback(Output("compare-layer-graph", "figure"), Input("compare-layer", "value"),
                  State("compare-ids", "data"), Input("theme", "data"))
    async def compare_layer(layer: str | None, run_ids: list[str], theme: str) -> Any:
        if not layer or len(run_ids) < 2:
            return fig.empty_figure("Pick a layer shared by the runs (matched by name).", theme, "Layer")
        try:
            async with api_factory() as api:
                got = await asyncio.gather(*[api.layer_stats(r, layer, "l2", max_points=2000) for r in run_ids])
                runs = await asyncio.gather(*[api.run(r) for r in run_ids])
        except ApiError as e:
            return fig.empty_figure(e.message, theme)
        return fig.compare_figure(dict(zip(run_ids, got)), None, f"{layer} — L2 norm", theme, log=True,
                                  labels=fig.run_labels(dict(zip(run_ids, runs))))


async def _loss(api: Api, run_id: str) -> dict[str, Any] | None:
    keys = await api.scalar_keys(run_id)
    return await api.scalar(run_id, "loss", max_points=2000) if "loss" in keys else None


def zoom_range(relayout: dict[str, Any] | None, gid: str) -> tuple[int | None, int | None, bool]:
    """``(start, end, skip)`` for a chart's callback: the steps a zoom on ``gid`` asks for
    (``None``: the whole run), and ``skip`` when the trigger was a relayout that changed no x
    range (a y zoom, an autosize, a hover mode): nothing to refetch."""
    if "reset-zoom.n_clicks" in dash.ctx.triggered_prop_ids:  # a stale zoom stays in the zoom store
        return None, None, False
    start, end = _visible(relayout)
    if dash.ctx.triggered_id == layout.zoom_id(gid):
        return start, end, start is None and not _is_reset(relayout)
    return start, end, False


def _zoomed(figure: dict[str, Any], start: int | None, end: int | None, reset: Any) -> dict[str, Any]:
    """Keep the zoomed x range on the refined figure; after a reset, forget the user's zoom
    (a new ``uirevision``)."""
    lay = figure.setdefault("layout", {})
    if start is not None and end is not None:
        lay.setdefault("xaxis", {})["range"] = [start, end]
    if reset:
        lay["uirevision"] = f"reset-{reset}"
    return figure


def _visible(relayout: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """The x range a zoom asked for (``relayoutData``), as whole steps, both ends included."""
    if not relayout:
        return None, None
    a, b = relayout.get("xaxis.range[0]"), relayout.get("xaxis.range[1]")
    if a is None and isinstance(relayout.get("xaxis.range"), list):
        a, b = relayout["xaxis.range"]
    try:
        lo, hi = float(a), float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None, None
    lo, hi = min(lo, hi), max(lo, hi)
    # one step beyond each edge: the lines run to the edges of the chart
    return max(0, math.floor(lo)), max(0, math.ceil(hi))


def _is_reset(relayout: dict[str, Any] | None) -> bool:
    return bool(relayout and relayout.get("xaxis.autorange"))


def _error(e: ApiError) -> html.Div:
    if e.status == 0:
        return layout.message(f"The gradwatch server is unreachable: {e.message}", "error")
    if e.status == 404:
        return layout.message(f"{e.message}. It may have been deleted, or the link is wrong.", "error",
                              [dash.dcc.Link("Back to the runs", href="/")])
    if e.status in (401, 403):
        return layout.message(f"Not allowed: {e.message}.", "error",
                              [html.A("Sign in with a token", href="/dashboard/login")])
    return layout.message(f"The server answered {e.status}: {e.message}", "error")
