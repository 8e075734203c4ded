"""Page layouts: the shell (header, theme), the runs page, the run page, the compare page.

Component ids are the contract with ``callbacks.py`` and the live script (``assets/live.js``).
"""

from __future__ import annotations

from typing import Any

from dash import dash_table, dcc, html

from gradwatch.dashboard.figures import HEATMAP_STATS, STEP_STATS

#: Event kinds the table filters by: the agent's, then the server's detectors' (docs/detectors.md).
AGENT_KINDS = ("overflow", "skipped", "scale_growth", "clip", "nonfinite", "spike", "manual_scale")
DETECTOR_KINDS = ("vanishing", "exploding", "dead", "nonfinite_first", "scale_collapse", "clip_saturation")
EVENT_KINDS = AGENT_KINDS + DETECTOR_KINDS
_SEVERITY_FILTER = [{"label": "every severity", "value": "info"}, {"label": "warning and worse", "value": "warning"},
                    {"label": "critical only", "value": "critical"}]
_GRAPH_CONFIG = {"displaylogo": False, "responsive": True}


def shell() -> html.Div:
    """What every page shares: location, theme, header and the page container."""
    return html.Div(id="gw-root", className="gw-light", children=[
        dcc.Location(id="url", refresh="callback-nav"),
        dcc.Store(id="theme", storage_type="local", data="light"),
        dcc.Store(id="viewport"),  # the window's width (px): the heatmap asks for as many buckets as it can show
        html.Header(className="gw-header", children=[
            dcc.Link("gradwatch", href="/", className="gw-brand"),
            dcc.Link("Runs", href="/", className="gw-nav"),
            html.A("API docs", href="/docs", className="gw-nav", target="_blank"),
            html.Button("◐ theme", id="theme-toggle", className="gw-button", title="switch light/dark theme"),
        ]),
        html.Main(id="page", className="gw-page"),
    ])


def message(text: str, kind: str = "info", children: Any = None) -> html.Div:
    return html.Div(className=f"gw-message gw-{kind}", children=[html.P(text), *(children or [])])


def empty_state(server_url: str) -> html.Div:
    """No runs yet: the two lines that attach the agent to this server."""
    code = (f"from gradwatch.agent import watch\n"
            f"watcher = watch(model, optimizer, project=\"demo\", server=\"{server_url}\")")
    return html.Div(className="gw-empty", id="empty-state", children=[
        html.H2("No runs yet"),
        html.P("Add these two lines to a PyTorch training loop (after creating the optimizer); the run appears "
               "here as soon as its first step is recorded:"),
        html.Pre(code, className="gw-code"),
        html.P(["Or try it: ", html.Code("gradwatch demo"), " starts a small training run against a server."]),
    ])


_RUN_COLUMNS = [
    {"id": "status", "name": "status"}, {"id": "project", "name": "project"},
    {"id": "name", "name": "name", "presentation": "markdown"}, {"id": "last_step", "name": "last step",
                                                                 "type": "numeric"},
    {"id": "started", "name": "started"}, {"id": "duration", "name": "duration"},
    {"id": "overflows", "name": "overflows", "type": "numeric"}, {"id": "skipped", "name": "skipped",
                                                                  "type": "numeric"},
    {"id": "clips", "name": "clips", "type": "numeric"}, {"id": "nonfinite", "name": "non-finite",
                                                          "type": "numeric"},
]


def runs_page() -> html.Div:
    return html.Div(children=[
        html.Div(className="gw-row", children=[
            html.H1("Runs"),
            dcc.Link("Compare selected", id="compare-link", href="/compare", className="gw-button"),
        ]),
        html.Div(id="runs-error"),
        html.Div(id="runs-empty"),
        dash_table.DataTable(
            id="runs-table", columns=_RUN_COLUMNS, data=[], filter_action="native", sort_action="native",
            sort_by=[], page_action="native", page_size=25, row_selectable="multi", selected_rows=[],
            markdown_options={"link_target": "_self"}, style_table={"overflowX": "auto"},
            style_cell={"fontFamily": "inherit", "fontSize": 13, "padding": "4px 8px"},
            tooltip_header={"overflows": "loss-scaler overflows (steps whose gradients held inf/NaN)",
                            "skipped": "optimizer steps skipped by the scaler",
                            "clips": "steps where a clipping transform changed the gradients",
                            "nonfinite": "steps with non-finite gradient elements (without a scaler)"},
            style_data_conditional=[{"if": {"filter_query": "{status} = running", "column_id": "status"},
                                     "color": "#2ca02c", "fontWeight": "bold"},
                                    {"if": {"filter_query": "{status} = crashed", "column_id": "status"},
                                     "color": "#d62728", "fontWeight": "bold"}],
        ),
        dcc.Interval(id="runs-refresh", interval=3000),
    ])


#: What a graph holds until its callback answers: Plotly draws it once on mount whatever it is,
#: and without axes that draw is ~4 ms instead of ~10 ms (eight graphs on the run page).
_PLACEHOLDER = {"data": [], "layout": {"xaxis": {"visible": False}, "yaxis": {"visible": False}}}


#: The run page's charts whose zoom refetches their visible steps from the server.
ZOOMABLE = ("heatmap", "layer-graph", "norm-graph", "scale-graph", "scalars-graph", "transforms-graph")


def zoom_id(gid: str) -> str:
    """The store that carries ``gid``'s x-range relayouts only: the server callbacks listen to it,
    not to ``relayoutData``, so an autosize or a y zoom costs no round trip."""
    return f"{gid}-zoom"


def _graph(gid: str, height: int = 320) -> dcc.Loading:
    return dcc.Loading(dcc.Graph(id=gid, config=_GRAPH_CONFIG, style={"height": f"{height}px"},
                                 figure=_PLACEHOLDER), type="dot", delay_show=400)


_DEPTHS = [{"label": "no: every layer", "value": 0}, {"label": "1 part (encoder.*)", "value": 1},
           {"label": "2 parts (encoder.0.*)", "value": 2}, {"label": "3 parts", "value": 3},
           {"label": "4 parts", "value": 4}]


def run_page(run_id: str) -> html.Div:
    stats = [{"label": v[1], "value": k, "title": v[3]} for k, v in HEATMAP_STATS.items()]
    return html.Div(children=[
        dcc.Store(id="run-id", data=run_id),
        dcc.Store(id="snapshot"),
        dcc.Store(id="events-store", data=[]),
        dcc.Store(id="health-store", data=[]),  # warning-and-worse events of both sources, polled
        dcc.Store(id="live-tick"),
        dcc.Store(id="tree-root"),  # the module tree's drawn root, when the tree holds only what it draws
        *[dcc.Store(id=zoom_id(gid)) for gid in ZOOMABLE],
        html.Div(id="live-dummy", style={"display": "none"}),
        html.Div(id="jump-dummy", style={"display": "none"}),
        html.Div(id="health-jump-dummy", style={"display": "none"}),
        html.Div(className="gw-row", children=[
            html.H1(id="run-title", children=run_id),
            html.Span(id="run-status", className="gw-status"),
            html.Span(id="live-status", className="gw-live", children="live: connecting…"),
            html.Button("Reset zoom", id="reset-zoom", className="gw-button"),
        ]),
        html.Div(id="run-error"),
        html.Section(className="gw-card gw-health", id="health", children=[
            html.H2("Health"), html.Div(id="health-lines", children="checking…")]),
        html.Section(className="gw-card", children=[
            html.Div(className="gw-row", children=[
                html.Label("Statistic", htmlFor="heatmap-stat"),
                dcc.Dropdown(id="heatmap-stat", options=stats, value="l2", clearable=False,
                             style={"width": "260px"}),
                html.Label("Layers (regex)", htmlFor="layer-regex"),
                dcc.Input(id="layer-regex", type="text", debounce=True, placeholder="e.g. ^encoder\\.|bias$",
                          style={"width": "260px"}),
                html.Span(id="regex-error", className="gw-error-inline"),
                html.Label("Group by module", htmlFor="group-depth",
                           title="one row per module prefix: the first N parts of the dotted layer names"),
                dcc.Dropdown(id="group-depth", options=_DEPTHS, value=0, clearable=False, searchable=False,
                             style={"width": "200px"}),
            ]),
            _graph("heatmap", 460),
            html.P("Click a cell (or pick a layer) for its series; click a group's row to open it. Magenta cells "
                   "held NaN or ±inf. Drag to zoom any chart: it refetches the visible steps at full resolution; "
                   "double-click or “Reset zoom” shows the whole run again.", className="gw-hint"),
        ]),
        html.Section(className="gw-card", children=[
            html.Div(className="gw-row", children=[
                html.Label("Layer", htmlFor="layer-select"),
                dcc.Dropdown(id="layer-select", options=[], placeholder="search a layer by name",
                             style={"width": "420px"}),
            ]),
            _graph("layer-graph", 300),
        ]),
        html.Section(className="gw-card", children=[
            _graph("tree-graph", 380),
            html.P("Each module is coloured by the worst signal of its layers now: non-finite or exactly-zero "
                   "gradients at the latest step, and detector or agent events of the last steps (hover for "
                   "which). Click a module to zoom into it.", className="gw-hint"),
        ]),
        *([_step_stats_card()] if STEP_STATS else []),
        html.Div(className="gw-grid", children=[
            html.Section(className="gw-card", children=[_graph("norm-graph")]),
            html.Section(className="gw-card", children=[_graph("scale-graph")]),
            html.Section(className="gw-card", children=[_graph("scalars-graph")]),
            html.Section(className="gw-card", children=[_graph("transforms-graph")]),
        ]),
        html.Section(className="gw-card", children=[
            html.Div(className="gw-row", children=[
                html.H2("Events"),
                html.Label("Severity", htmlFor="event-severity"),
                dcc.Dropdown(id="event-severity", options=_SEVERITY_FILTER, value="info", clearable=False,
                             searchable=False, style={"width": "190px"}),
                dcc.Checklist(id="event-kinds", options=[{"label": k, "value": k} for k in EVENT_KINDS],
                              value=list(EVENT_KINDS), inline=True),
            ]),
            dash_table.DataTable(
                id="events-table", columns=[{"id": "step", "name": "step", "type": "numeric"},
                                            {"id": "severity", "name": "severity"}, {"id": "kind", "name": "kind"},
                                            {"id": "source", "name": "source"}, {"id": "rank", "name": "rank"},
                                            {"id": "detail", "name": "detail"}],
                data=[], page_size=15, sort_action="native",
                style_cell={"fontFamily": "inherit", "fontSize": 13, "textAlign": "left", "padding": "4px 8px",
                            "whiteSpace": "normal"},
                style_data_conditional=[{"if": {"filter_query": "{severity} = critical", "column_id": "severity"},
                                         "color": "#d62728", "fontWeight": "bold"},
                                        {"if": {"filter_query": "{severity} = warning", "column_id": "severity"},
                                         "color": "#e07b00", "fontWeight": "bold"}],
                tooltip_header={"step": "click a row to move every chart to this step",
                                "source": "agent: sent by the training process; detector: found by the server",
                                "severity": "info, warning or critical"}),
        ]),
        dcc.Interval(id="status-refresh", interval=4000),
    ])


def _step_stats_card() -> html.Section:
    """Step-level statistics of figures.STEP_STATS (gradient noise scale...), one at a time."""
    opts = [{"label": v[1], "value": k, "title": v[3]} for k, v in STEP_STATS.items()]
    return html.Section(className="gw-card", children=[
        html.Div(className="gw-row", children=[
            html.Label("Step statistic", htmlFor="step-stat"),
            dcc.Dropdown(id="step-stat", options=opts, value=opts[0]["value"], clearable=False,
                         style={"width": "300px"}),
        ]),
        _graph("step-stat-graph", 300),
    ])


def compare_page(run_ids: list[str]) -> html.Div:
    return html.Div(children=[
        dcc.Store(id="compare-ids", data=run_ids),
        html.H1("Compare runs"),
        html.P(id="compare-runs", children=", ".join(run_ids) if run_ids else
               "Select two or more runs on the runs page."),
        html.Div(className="gw-row", children=[
            html.Label("Layer", htmlFor="compare-layer"),
            dcc.Dropdown(id="compare-layer", options=[], placeholder="a layer name shared by the runs",
                         style={"width": "420px"}),
        ]),
        html.Div(className="gw-grid", children=[
            html.Section(className="gw-card", children=[_graph("compare-norm")]),
            html.Section(className="gw-card", children=[_graph("compare-scalars")]),
        ]),
        html.Section(className="gw-card", children=[_graph("compare-layer-graph")]),
    ])
