"""Figure builders: API responses in, Plotly figure dicts out (plain functions, no I/O).

Every trace is built from plain lists, never numpy arrays: plotly ≥ 6 would send arrays as
base64 typed arrays, which ``extendData`` (the live path) cannot extend. Non-finite values are
never holes: they are drawn as markers or cells of their own colour, with counts in the hover.
The trace order of the live-updated figures is fixed (see ``TRACES``): the browser's live script
extends traces by index.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from gradwatch.dashboard.api import num

#: Colour of non-finite cells and markers (distinct from every colour scale used).
NONFINITE_COLOUR = "#ff00ff"
#: Trace indices the live script extends, per graph id.
TRACES = {"heatmap": (0, 1), "norm-graph": (0, 1), "scale-graph": (0,)}

#: Heatmap statistics: API stat, label, whether the colour is log10 of the value, what it means.
#: Adding a per-layer statistic the server serves (``/heatmap?stat=``) is one line here; a run
#: that did not record it (all values null, or a server that refuses the name) shows a "not
#: recorded in this run" note, never an error.
HEATMAP_STATS: dict[str, tuple[str, str, bool, str]] = {
    "l2": ("l2", "log10 L2 norm", True, "L2 norm of the layer's gradient (before transforms)"),
    "std": ("std", "log10 std", True, "standard deviation of the gradient's elements"),
    "var": ("var", "log10 variance", True, "population variance of the gradient's elements"),
    "maxabs": ("maxabs", "log10 max |g|", True, "largest absolute gradient element"),
    "nonfinite": ("nonfinite", "non-finite elements", False, "count of NaN/±inf gradient elements"),
    "l2_post": ("l2_post", "log10 L2 after transforms", True, "L2 norm after clipping/normalization"),
    "ratio": ("wnorm", "log10 ‖g‖/‖w‖", True, "gradient norm relative to the layer's weight norm"),
    "headroom": ("headroom", "headroom (log2)", False,
                 "powers of two before the scaled gradient overflows fp16 (< 0: it overflowed)"),
    "underflow": ("underflow", "underflow elements", False,
                  "non-zero elements below fp16's smallest normal after scaling"),
    "zeros": ("zeros", "zero elements", False, "exactly-zero gradient elements (dead units)"),
    "mom_cos": ("mom_cos", "cos(gradient, momentum)", False,
                "cosine between the gradient and the optimizer's momentum buffer"),
    "upd_ratio": ("upd_ratio", "log10 ‖Δw‖/‖w‖", True, "relative update of the step"),
    "noise_scale": ("noise_scale", "log10 noise scale B_simple", True, "this layer's gradient noise scale"),
}
#: Step-level statistics beyond the norms and the loss scale (``/steps?fields=``), each drawn as its
#: own line on the "Step statistics" chart: field, label, log axis, what it means. One line per
#: statistic; a run that did not record it shows a "not recorded in this run" note.
STEP_STATS: dict[str, tuple[str, str, bool, str]] = {
    "noise_scale": ("noise_scale", "gradient noise scale B_simple", True,
                    "tr Σ / |G|² over all measured layers (examples, or per-rank batches without a batch size)"),
}
def heatmap_stat(stat: str) -> tuple[str, str, bool, str]:
    """A :data:`HEATMAP_STATS` row; a name not in the table is asked of the server as it is."""
    return HEATMAP_STATS.get(stat, (stat, stat, False, stat))


LOG_STATS = frozenset({"l2", "std", "var", "maxabs", "l2_post", "total_norm", "total_norm_post", "loss_scale"})
#: Gradients are in the units of ∂loss/∂parameter ("grad units"); the hover of every chart says
#: what a statistic means and its unit, so a reader need not know how gradwatch measures.
STAT_HELP = {
    "l2": "L2 norm of the layer's gradient (before transforms), grad units",
    "std": "std of the gradient's elements (pooled over a bucket's steps), grad units",
    "var": "population variance of the gradient's elements (pooled over a bucket's steps), grad units²",
    "maxabs": "largest |gradient element|, grad units",
    "mean": "mean gradient element, grad units", "nonfinite": "count of NaN/±inf gradient elements",
    "l2_post": "L2 norm of the gradient after the transforms, grad units",
    "ratio": "‖gradient‖ / ‖weight‖ of the layer (dimensionless)",
}
#: How the layers of a module-prefix group merge into one heatmap row: the group's L2 norm is
#: the root of the sum of its layers' squared norms (exact); counts add; std, variance and
#: max |g| show the group's largest ("min": its smallest; any other statistic: its largest).
#: Statistics whose +inf is the safe end of their scale, not a fault: drawn as the top colour,
#: never as a non-finite cell (``headroom`` of an all-zero gradient: nothing can overflow).
SAFE_INF = frozenset({"headroom"})
GROUP_AGG = {"l2": "rss", "l2_post": "rss", "wnorm": "rss", "nonfinite": "sum", "maxabs": "max", "std": "max",
             "var": "max", "headroom": "min", "underflow": "sum", "zeros": "sum", "mom_cos": "min", "upd_ratio": "max",
             "noise_scale": "max"}
_GROUP_LABEL = re.compile(r"^(.*)\.\* \((\d+) layers\)$")


def ticks_125(lo: float, hi: float, fine: bool = False, margin: float = 1.0) -> tuple[list[float], list[str]] | None:
    """Tick values 1-2-5 per decade between ``lo`` and ``hi`` (positive), powers of ten only
    when the span exceeds four decades; ``None`` under one decade (Plotly's own ticks read well
    there on a log axis), or with ``fine`` (a colour bar of log10 values, where Plotly's would
    be exponents, or on an axis where Plotly's would be bare digits) finer mantissas, kept within
    a factor ``margin`` of the range. One decade of margin each side otherwise, so points
    appended live still get ticks."""
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        return None
    a, b = math.log10(lo), math.log10(hi)
    span = b - a
    if span < 1 and not fine:
        return None
    mults: tuple[float, ...] = (1,) if span > 4 else (1, 2, 5)
    if span < 1:
        # a (nearly) constant series: Plotly's autorange pads it, and 90 mantissas over the ~1 decade
        # the margin adds drew ~80 overlapping labels; its ticks follow what the margin shows
        shown = span if span >= 0.05 else span + 2 * math.log10(margin)
        mults = ((1, 2, 3, 5, 7) if shown > 0.6 else (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9) if shown > 0.2
                 else tuple(1 + k / 10 for k in range(90)))
    vals = [float(f"{m * 10.0 ** k:.3g}") for k in range(math.floor(a) - 1, math.ceil(b) + 2) for m in mults]
    if span < 1:  # the colour bar's own range: a few ticks inside it
        vals = [v for v in vals if lo / margin * (1 - 1e-9) <= v <= hi * margin * (1 + 1e-9)]
        if len(vals) < 2:
            return None
    return vals, [tick_text(v) for v in vals]


def tick_text(v: float) -> str:
    """``0.002``, ``50``, ``2e-05``, ``1e+06``: short, and never a bare exponent."""
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3g}".replace("e-0", "e-").replace("e+0", "e+")


def log_axis(title: str, values: Iterable[Any]) -> dict[str, Any]:
    """A log y axis titled ``title`` with 1-2-5 ticks where ``values`` span decades."""
    pos = [v for v in values if _finite(v) and v > 0]
    out: dict[str, Any] = {"type": "log", "title": {"text": title}}
    # under a decade Plotly labels a log axis with bare digits ("4 3 2 0.1 9 8"): values instead
    t = ticks_125(min(pos), max(pos), fine=True, margin=3.0) if pos else None
    if t:
        out.update(tickmode="array", tickvals=t[0], ticktext=t[1])
    return out


def layer_groups(names: list[str], keep: list[int], depth: int) -> list[tuple[str, list[int]]]:
    """Rows of the heatmap: ``depth`` 0 one per layer; otherwise the layers in ``keep`` grouped
    by the first ``depth`` parts of their dotted module path, in model order (a group sits where
    its first layer does). A group of several layers is labelled ``prefix.* (n layers)``; a
    group of one keeps the layer's name."""
    if depth <= 0:
        return [(names[i], [i]) for i in keep]
    groups: dict[str, list[int]] = {}
    for i in keep:
        parts = names[i].split(".")
        groups.setdefault(".".join(parts[:depth]) if len(parts) > depth else names[i], []).append(i)
    return [(names[v[0]] if len(v) == 1 else f"{k}.* ({len(v)} layers)", v) for k, v in groups.items()]


def group_prefix(label: str) -> str | None:
    """The module prefix of a group row's label (``None`` for a single layer's row)."""
    m = _GROUP_LABEL.match(label or "")
    return m.group(1) if m else None


def merge_group(vals: list[float | None], how: str) -> float | None:
    """One group cell from its layers' values (``None``: not measured): NaN wins, then ±inf."""
    vs = [v for v in vals if v is not None]
    if not vs:
        return None
    if any(math.isnan(v) for v in vs):
        return math.nan
    if how == "rss":
        return math.hypot(*vs)
    return sum(vs) if how == "sum" else min(vs) if how == "min" else max(vs)


#: Colours per theme (plotly.js has no named templates: a figure dict carries its colours).
THEMES = {"light": {"bg": "#ffffff", "fg": "#1d1d24", "grid": "#e6e7eb"},
          "dark": {"bg": "#1c1e24", "fg": "#e6e7ea", "grid": "#33363f"}}


def _layout(title: str, theme: str, **extra: Any) -> dict[str, Any]:
    c = THEMES.get(theme, THEMES["light"])
    out: dict[str, Any] = {
        "title": {"text": title, "x": 0.01, "font": {"size": 14}},
        "paper_bgcolor": c["bg"], "plot_bgcolor": c["bg"], "font": {"color": c["fg"]},
        "margin": {"l": 60, "r": 20, "t": 36, "b": 40}, "uirevision": "keep",
        "hovermode": "closest", "legend": {"orientation": "h", "yanchor": "top", "y": -0.3},
    }
    out.update(extra)
    if out.get("showlegend"):  # below the step axis's title, not over it
        out["margin"] = {**out["margin"], "b": 90}
    for axis in ("xaxis", "yaxis"):
        out[axis] = {"gridcolor": c["grid"], "zerolinecolor": c["grid"], **out.get(axis, {})}
    return out


def empty_figure(message: str, theme: str = "light", title: str = "") -> dict[str, Any]:
    """A figure that explains why it holds no data (never a blank axis)."""
    return {"data": [], "layout": _layout(title, theme, xaxis={"visible": False}, yaxis={"visible": False},
                                          annotations=[{"text": message, "showarrow": False, "xref": "paper",
                                                        "yref": "paper", "x": 0.5, "y": 0.5,
                                                        "font": {"size": 13}}])}


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def series_points(resp: dict[str, Any], field: str | None = None, pooled: str | None = None) -> dict[str, list[Any]]:
    """A series response (raw points or min/max/mean buckets; for ``/steps`` one ``field``) as
    columns: ``x``, ``mean``, ``lo``, ``hi`` (finite or None) and ``bad`` (x, kind) of non-finite.
    ``pooled`` (``std``/``var``): a bucket's line is that statistic of all the gradient elements
    of its steps together (the server's ``pooled`` moments), not the mean of per-step values."""
    x: list[Any] = []
    mean: list[Any] = []
    lo: list[Any] = []
    hi: list[Any] = []
    bad_x: list[Any] = []
    bad_text: list[str] = []
    if resp.get("downsampled"):
        for b in resp.get("buckets", []):
            cell = b[field] if field else b
            m, a, z = num(cell.get("mean")), num(cell.get("min")), num(cell.get("max"))
            if pooled and isinstance(cell.get("pooled"), dict) and cell["pooled"].get(pooled) is not None:
                m = num(cell["pooled"][pooled])
            step = (b["step_min"] + b["step_max"]) // 2
            nan = int(cell.get("nan") or 0)
            x.append(step)
            mean.append(m if _finite(m) else None)
            lo.append(a if _finite(a) else None)
            hi.append(z if _finite(z) else None)
            kinds = [k for k, v in (("NaN", nan), ("+inf", z == math.inf), ("-inf", a == -math.inf)) if v]
            if kinds:
                bad_x.append(step)
                bad_text.append(f"steps {b['step_min']}–{b['step_max']}: " + ", ".join(
                    f"{nan} NaN" if k == "NaN" else k for k in kinds))
    else:
        for p in resp.get("points", []):
            v = num(p.get(field) if field else p.get("value"))
            x.append(p["step"])
            ok = _finite(v)
            mean.append(v if ok else None)
            lo.append(v if ok else None)
            hi.append(v if ok else None)
            if not ok and v is not None:
                bad_x.append(p["step"])
                bad_text.append(f"step {p['step']}: {'NaN' if math.isnan(v) else ('+inf' if v > 0 else '-inf')}")
    return {"x": x, "mean": mean, "lo": lo, "hi": hi, "bad_x": bad_x, "bad_text": bad_text}


def last_series_step(responses: Iterable[dict[str, Any]]) -> int | None:
    """The last step any of these series responses holds (raw points or buckets), ``None`` if none."""
    steps = [p["step"] for r in responses for p in r.get("points") or []]
    steps += [b["step_max"] for r in responses for b in r.get("buckets") or []]
    return max(steps) if steps else None


def _band(name: str, cols: dict[str, list[Any]], colour: str) -> list[dict[str, Any]]:
    """Min and max of each bucket as a shaded band (so a one-step spike stays visible)."""
    if cols["lo"] == cols["mean"] and cols["hi"] == cols["mean"]:
        return []
    fill = colour.replace("rgb(", "rgba(").replace(")", ",0.2)")
    return [
        {"type": "scatter", "x": cols["x"], "y": cols["hi"], "mode": "lines", "line": {"width": 0},
         "name": f"{name} max", "showlegend": False, "hoverinfo": "skip"},
        {"type": "scatter", "x": cols["x"], "y": cols["lo"], "mode": "lines", "line": {"width": 0},
         "fill": "tonexty", "fillcolor": fill, "name": f"{name} min–max", "hoverinfo": "skip"},
    ]


def _bad_markers(cols: dict[str, list[Any]], y: Any, name: str = "non-finite") -> dict[str, Any]:
    return {"type": "scatter", "x": cols["bad_x"], "y": [y] * len(cols["bad_x"]), "mode": "markers",
            "marker": {"symbol": "x", "size": 9, "color": NONFINITE_COLOUR}, "name": name,
            "text": cols["bad_text"], "hovertemplate": "%{text}<extra>non-finite</extra>"}


def _top(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if _finite(v)]
    return max(vals) if vals else None


COLOURS = ("rgb(31,119,180)", "rgb(255,127,14)", "rgb(44,160,44)", "rgb(148,103,189)", "rgb(140,86,75)",
           "rgb(23,190,207)")


# -- heatmap -------------------------------------------------------------------------------------
def layer_filter(names: list[str], pattern: str | None) -> tuple[list[int], str | None]:
    """Positions of the layers whose name matches ``pattern`` (a regex, searched), and an error
    message when the pattern is not a valid regex (then every layer is kept)."""
    if not pattern:
        return list(range(len(names))), None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        return list(range(len(names))), f"invalid regex: {e}"
    return [i for i, n in enumerate(names) if rx.search(n)], None


def _uniform_columns(steps: list[int]) -> list[int]:
    """Bucket starts with the first bucket aligned to its block: a run's first step (1) opens a
    block that starts at 0, so the first column is one step narrower than the others. Plotly draws
    a heatmap of equal columns as one small image scaled up, and one with any other column widths
    cell by cell into a plot-sized canvas: 500 layers × 157 buckets took ~0.2 s instead of ~0.05 s."""
    if len(steps) < 3:
        return steps
    width = steps[2] - steps[1]
    if 0 < steps[1] - steps[0] < width and all(b - a == width for a, b in zip(steps[1:], steps[2:])):
        steps[0] = max(0, steps[1] - width)
    return steps


def heatmap_figure(hm: dict[str, Any], stat: str = "l2", *, pattern: str | None = None, theme: str = "light",
                   weights: dict[str, Any] | None = None, last_step: int | None = None,
                   depth: int = 0) -> dict[str, Any]:
    """Layers × steps heatmap of ``hm`` (a ``/heatmap`` response), step-major with ``transpose``
    so the live script can append steps. Trace 0: the statistic; trace 1: non-finite cells in
    their own colour (hover: how many NaN/inf elements). ``ratio`` needs ``weights`` (a
    ``wnorm`` heatmap of the same shape; a cell without a weight norm stays empty). ``depth``
    > 0 groups the layers by module prefix (:func:`layer_groups`, merged by :data:`GROUP_AGG`).
    ``last_step``: the last step the data holds, where the live script resumes (``layout.meta``)."""
    api_stat, label, log, help_text = heatmap_stat(stat)
    if stat == "ratio":
        api_stat = "l2"
    layers = hm.get("layers", [])
    names = [ly["name"] for ly in layers]
    if not layers or not hm.get("steps"):
        return empty_figure("No layer statistics yet: they appear with the run's first recorded step.", theme,
                            "Layers × steps")
    keep, err = layer_filter(names, pattern)
    if not keep:
        return empty_figure(f"No layer matches {pattern!r}.", theme, "Layers × steps")
    rows = layer_groups(names, keep, depth)
    how = GROUP_AGG.get(api_stat, "max")
    steps = _uniform_columns(list(hm["steps"]))
    values = hm["values"]
    nans = hm.get("nan") or [[0] * len(steps) for _ in layers]
    wvals = weights["values"] if weights else None
    z: list[list[Any]] = [[None] * len(rows) for _ in steps]
    bad: list[list[Any]] = [[None] * len(rows) for _ in steps]
    text: list[list[str]] = [[""] * len(steps) for _ in rows]  # layer-major: plotly does not transpose text
    for j, (_, members) in enumerate(rows):
        single = len(members) == 1
        for k in range(len(steps)):
            if single:
                i = members[0]
                v = num(values[i][k])
                w = num(wvals[i][k]) if wvals is not None else None
                n = int(nans[i][k] or 0) if k < len(nans[i]) else 0
            else:
                v = merge_group([num(values[i][k]) for i in members], how)
                w = merge_group([num(wvals[i][k]) for i in members], "rss") if wvals is not None else None
                n = sum(int(nans[i][k] or 0) for i in members if k < len(nans[i]))
            if wvals is not None and v is not None:
                if w is None:  # not measured (an older agent, or a step `every` did not record)
                    continue
                v = v / w if w != 0 else math.nan
            if v is None:
                continue
            if v == math.inf and stat in SAFE_INF:  # e.g. an all-zero gradient's headroom: no risk, no error
                z[k][j] = math.inf  # drawn at the top of the scale below
                continue
            if not math.isfinite(v) or (stat == "nonfinite" and v > 0):
                bad[k][j] = 1
                text[j][k] = (f"{n} non-finite" if n else ("NaN" if math.isnan(v) else ("+inf" if v > 0 else "-inf")))
                if stat != "nonfinite":
                    continue
            if log:  # 4 decimals of log10: far below what a colour shows, half the JSON
                z[k][j] = round(math.log10(v), 4) if v > 0 else None if v < 0 else -45.0
            else:
                z[k][j] = v
    finite = [v for col in z for v in col if v is not None and v > -45.0 and v != math.inf]
    zmin = min(finite) if finite else None
    if zmin is not None:  # exact zeros: the bottom of the scale, not a hole
        z = [[zmin if v == -45.0 else v for v in col] for col in z]
    inf_top = None
    if stat in SAFE_INF:  # +inf: the top of the scale (the live script does the same with meta.inf_top)
        inf_top = max(finite) if finite else 0.0
        z = [[inf_top if v == math.inf else v for v in col] for col in z]
    y = [r[0] for r in rows]
    n_bad = sum(1 for col in bad for v in col if v)
    meaning = STAT_HELP.get(stat, help_text)
    if depth > 0:
        meaning += "<br>a row named prefix.* is a group: " + {
            "rss": "its layers' norms combined (√Σ‖g‖²)", "sum": "summed over its layers",
            "max": "its largest layer", "min": "its smallest layer"}[how]
    value = "10^%{z:.2f}" if log else "%{z:.4g}"
    hover = f"layer %{{y}}<br>step %{{x}}<br>{label}: %{{z:.3g}} (= {value})<br><i>{meaning}</i><extra></extra>"
    colorbar: dict[str, Any] = {"title": {"text": label}}
    if log and finite:
        t = ticks_125(10.0 ** min(finite), 10.0 ** max(finite), fine=True)
        if t:
            colorbar.update(tickmode="array", tickvals=[round(math.log10(v), 4) for v in t[0]], ticktext=t[1])
    data = [
        {"type": "heatmap", "x": steps, "y": y, "z": z, "transpose": True, "colorscale": "Viridis",
         "colorbar": colorbar, "hovertemplate": hover, "name": label, "hoverongaps": False},
        # without non-finite cells an empty trace (the live script appends its columns): half the
        # cells to send and draw
        {"type": "heatmap", "x": steps if n_bad else [], "y": y, "z": bad if n_bad else [], "transpose": True,
         "text": text if n_bad else None,
         "colorscale": [[0, NONFINITE_COLOUR], [1, NONFINITE_COLOUR]], "showscale": False,
         "hovertemplate": "layer %{y}<br>step %{x}<br>%{text}<extra>non-finite</extra>", "name": "non-finite",
         "hoverongaps": False},
    ]
    title = f"Layers × steps — {label}" + (f" · {n_bad} non-finite cells" if n_bad else "")
    meta: dict[str, Any] = {"help": help_text, "layers": y, "layer_index": [layers[r[1][0]]["index"] for r in rows],
                            "log": log, "stat": api_stat, "live": weights is None, "zmin": zmin,
                            "last_step": last_step, "depth": depth}
    if inf_top is not None:
        meta["inf_top"] = inf_top
    if depth > 0:  # the live script merges a group's layers as this function does
        meta["rows"] = [[layers[i]["index"] for i in r[1]] for r in rows]
        meta["agg"] = how
    return {"data": data, "layout": _layout(
        title, theme, xaxis={"title": {"text": "step"}},
        yaxis={"autorange": "reversed", "automargin": True, "tickfont": {"size": 9},
               "showticklabels": len(rows) <= 80}, meta=meta)}


# -- line charts ---------------------------------------------------------------------------------
def layer_series_figure(name: str, series: dict[str, dict[str, Any]], theme: str = "light",
                        layer_index: int | None = None, last_step: int | None = None) -> dict[str, Any]:
    """One layer's statistics (``series``: stat → ``/stats`` series), each as its mean line (std
    and variance: pooled over the bucket) and the min–max band of its buckets; non-finite
    buckets as markers. With the layer's index and the run's last step at fetch time, the live
    script extends each mean line from the stream (``meta.live_traces``; ``meta.live_stats``: the
    per-layer fields it subscribes to while the chart shows this layer)."""
    data: list[dict[str, Any]] = []
    any_points = False
    ys: list[Any] = []
    live: list[list[Any]] = []
    for k, (stat, resp) in enumerate(series.items()):
        pooled = stat if stat in ("std", "var") else None
        cols = series_points(resp, pooled=pooled)
        any_points = any_points or bool(cols["x"])
        ys += cols["lo"] + cols["hi"]
        colour = COLOURS[k % len(COLOURS)]
        live.append([len(data), ["layers", stat, {"layer": layer_index}]])
        how = "bucket mean; band: min–max of the bucket" if resp.get("downsampled") else "per step"
        if pooled and resp.get("downsampled"):
            how = "pooled over the bucket's steps; band: min–max of the per-step values"
        data.append({"type": "scatter", "x": cols["x"], "y": cols["mean"], "mode": "lines",
                     "name": f"{stat} (pooled)" if pooled else stat, "line": {"color": colour},
                     "hovertemplate": f"step %{{x}}<br>{stat}: %{{y:.4g}}<br><i>{STAT_HELP.get(stat, stat)}"
                                      f"<br>{how}</i><extra></extra>"})
        data += _band(stat, cols, colour)
        if cols["bad_x"]:
            data.append(_bad_markers(cols, _top(cols["hi"]) or 1.0))
    if not any_points:
        return empty_figure(f"No statistics recorded for {name} in this range.", theme, name)
    meta = ({"last_step": last_step, "layer_index": [layer_index], "live_traces": live, "live_stats": list(series)}
            if layer_index is not None and last_step is not None else None)
    return {"data": data, "layout": _layout(f"Layer {name}", theme, xaxis={"title": {"text": "step"}},
                                            yaxis=log_axis("grad units (log)", ys), showlegend=True,
                                            **({"meta": meta} if meta else {}))}


def _event_markers(events: list[dict[str, Any]], kind: str, y: float | None, symbol: str, colour: str,
                   name: str) -> dict[str, Any]:
    xs, texts = [], []
    for e in events:
        if e["kind"] != kind:
            continue
        xs.append(e["step"])
        texts.append(event_detail(e))
    return {"type": "scatter", "x": xs, "y": [y] * len(xs), "mode": "markers", "name": name,
            "marker": {"symbol": symbol, "size": 10, "color": colour}, "text": texts,
            "hovertemplate": "step %{x}<br>%{text}<extra>" + name + "</extra>"}


def norm_figure(steps: dict[str, Any], events: list[dict[str, Any]], theme: str = "light",
                last_step: int | None = None) -> dict[str, Any]:
    """Total gradient norm before (trace 0) and after (trace 1) the transforms, clip events marked."""
    pre, post = series_points(steps, "total_norm"), series_points(steps, "total_norm_post")
    if not pre["x"] and last_step is None:
        return empty_figure("No steps recorded yet.", theme, "Total gradient norm")
    data = [
        {"type": "scatter", "x": pre["x"], "y": pre["mean"], "mode": "lines", "name": "before transforms",
         "line": {"color": COLOURS[0]}, "hovertemplate": "step %{x}<br>‖g‖ before transforms: %{y:.4g}<br><i>L2 norm "
         "of all layers' gradients together, grad units</i><extra></extra>"},
        {"type": "scatter", "x": post["x"], "y": post["mean"], "mode": "lines", "name": "after transforms",
         "line": {"color": COLOURS[1]}, "hovertemplate": "step %{x}<br>‖g‖ after transforms: %{y:.4g}<br><i>what "
         "the optimizer used (after clipping/normalization), grad units</i><extra></extra>"},
    ]
    data += _band("before", pre, COLOURS[0])
    top = _top(pre["hi"]) or 1.0
    data.append(_event_markers(events, "clip", top, "triangle-down", "#d62728", "clip"))
    if pre["bad_x"]:
        data.append(_bad_markers(pre, top))
    return {"data": data, "layout": _layout("Total gradient norm (L2, all layers)", theme,
                                            xaxis={"title": {"text": "step"}},
                                            meta={"last_step": last_step,
                                                  "live_traces": [[0, ["total_norm"]], [1, ["total_norm_post"]]]},
                                            yaxis=log_axis("‖g‖, grad units (log)", pre["lo"] + pre["hi"] + post["mean"]))}


def scale_figure(steps: dict[str, Any], events: list[dict[str, Any]], theme: str = "light",
                 last_step: int | None = None) -> dict[str, Any]:
    """Loss scale (trace 0) on a log axis; overflow (hover: the layers that held non-finite
    values), skipped-step and growth markers."""
    cols = series_points(steps, "loss_scale")
    if not any(v is not None for v in cols["mean"]) and not events:
        return empty_figure("No loss scale recorded: this run does not use gradwatch.agent.GradScaler.", theme,
                            "Loss scale")
    ys = {e["step"]: num(e["data"].get("scale_before")) for e in events if e["kind"] in ("overflow", "scale_growth")}
    data = [{"type": "scatter", "x": cols["x"], "y": cols["mean"], "mode": "lines", "name": "loss scale",
             "line": {"color": COLOURS[3], "shape": "hv"},
             "hovertemplate": "step %{x}<br>loss scale %{y:.6g}<br><i>the factor the loss is multiplied by before "
                              "backward (mixed precision)</i><extra></extra>"}]
    top = _top(cols["hi"]) or 1.0
    for kind, symbol, colour, name in (("overflow", "x", "#d62728", "overflow"),
                                       ("skipped", "circle-open", "#ff7f0e", "skipped step"),
                                       ("scale_growth", "triangle-up", "#2ca02c", "growth")):
        tr = _event_markers(events, kind, top, symbol, colour, name)
        tr["y"] = [ys.get(x) if _finite(ys.get(x)) else top for x in tr["x"]]
        data.append(tr)
    return {"data": data, "layout": _layout("Loss scale", theme, xaxis={"title": {"text": "step"}},
                                            meta={"last_step": last_step, "live_traces": [[0, ["loss_scale"]]]},
                                            yaxis=log_axis("scale (log)", cols["mean"] + list(ys.values())))}


def scalars_figure(series: dict[str, dict[str, Any]], theme: str = "light",
                   last_step: int | None = None) -> dict[str, Any]:
    """User scalars from ``Watcher.log`` (loss, lr, ...), one line each (``meta.live_traces``:
    which trace the live script extends with which key)."""
    if not series:
        return empty_figure("No scalars logged: call watcher.log(loss=..., lr=...) in the training loop.", theme,
                            "Scalars")
    data: list[dict[str, Any]] = []
    live: list[list[Any]] = []
    for k, (key, resp) in enumerate(series.items()):
        cols = series_points(resp)
        colour = COLOURS[k % len(COLOURS)]
        live.append([len(data), ["scalars", key]])
        data.append({"type": "scatter", "x": cols["x"], "y": cols["mean"], "mode": "lines", "name": key,
                     "line": {"color": colour}, "hovertemplate": f"step %{{x}}<br>{key}: %{{y:.4g}}<br><i>logged with "
                                                                 "watcher.log()</i><extra></extra>"})
        data += _band(key, cols, colour)
        if cols["bad_x"]:
            data.append(_bad_markers(cols, _top(cols["hi"]) or 0.0, f"{key} non-finite"))
    # loss and learning rate differ by decades: a log axis when every value is positive
    ys = [v for tr in data for v in tr["y"] if _finite(v)]
    yaxis = log_axis("value (log)", ys) if ys and min(ys) > 0 and max(ys) >= 10 * min(ys) else {}
    return {"data": data, "layout": _layout("Scalars (Watcher.log)", theme, xaxis={"title": {"text": "step"}},
                                            yaxis=yaxis, showlegend=True,
                                            meta={"last_step": last_step, "live_traces": live})}


#: Units of the transforms' values that share the left (linear) axis; values in gradient units
#: (norms, thresholds, σ, and fields the spec does not declare, such as a clipper's max_norm) go
#: on a right log axis; flags and counters are left out of the chart.
_RATIO_UNITS = frozenset({"ratio", "z-score"})


def _transform_units() -> dict[str, str]:
    from gradwatch.agent.spec import TRANSFORM_VALUES  # the declared spec (stdlib only)

    return {f"{t}.{v.name}": v.unit for t, vals in TRANSFORM_VALUES.items() for v in vals if not v.per_layer}


def transforms_figure(resp: dict[str, Any] | None, theme: str = "light",
                      last_step: int | None = None) -> dict[str, Any]:
    """Each transform's reported values over time (``resp``: ``{"series": [{transform, field,
    ...series}]}`` from :meth:`Api.transforms`): ratios and z-scores (α_t, clip coefficients,
    σ_t/σ_ref, z) on the left axis, values in gradient units (thresholds, norms, σ_t) on a right
    log axis; non-finite values as markers. An explanatory empty state where the server has no
    ``/transforms`` endpoint or the run has no transforms."""
    if resp is None:
        return empty_figure("This server does not report transform values (GET /runs/{id}/transforms).", theme,
                            "Transform values")
    series = _transform_series(resp)
    if not series:
        return empty_figure("No transform values: pass transforms=(ClipNorm(1.0), ...) to watch().", theme,
                            "Transform values")
    units = _transform_units()
    data: list[dict[str, Any]] = []
    live: list[list[Any]] = []
    right_values: list[Any] = []
    right = False
    k = 0
    for name, cols in series.items():
        unit = units.get(name, "ratio" if name.endswith("/sigma_ref") else "grad units")  # e.g. max_norm
        if unit not in _RATIO_UNITS and unit != "grad units":
            continue
        on_right = unit == "grad units"
        right = right or on_right
        if on_right:
            right_values += cols["mean"]
        t, _, f = name.partition(".")
        live.append([len(data), {"num": ["transforms", t, "sigma"], "den": ["transforms", t, "sigma_ref"]}
                     if f == "sigma/sigma_ref" else ["transforms", t, f]])
        data.append({"type": "scatter", "x": cols["x"], "y": cols["mean"], "mode": "lines", "name": name,
                     "line": {"color": COLOURS[k % len(COLOURS)], "dash": "dot" if on_right else "solid"},
                     "yaxis": "y2" if on_right else "y",
                     "hovertemplate": f"step %{{x}}<br>{name}: %{{y:.4g}} ({unit})<br><i>{_transform_help(name)}"
                                      "</i><extra></extra>"})
        k += 1
        if cols["bad_x"]:
            tr = _bad_markers(cols, _top(cols["hi"]) or 1.0, f"{name} non-finite")
            tr["yaxis"] = "y2" if on_right else "y"
            data.append(tr)
    extra: dict[str, Any] = {"xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "ratio / z"}}}
    if right:
        c = THEMES.get(theme, THEMES["light"])
        extra["yaxis2"] = {**log_axis("grad units (log, dotted)", right_values), "overlaying": "y",
                           "side": "right", "showgrid": False, "gridcolor": c["grid"]}
    out = {"data": data, "layout": _layout("Transform values (α_t, σ_t/σ_ref, coefficients, z, thresholds)", theme,
                                           showlegend=True, meta={"last_step": last_step, "live_traces": live},
                                           **extra)}
    out["layout"]["margin"]["r"] = 70 if right else 20
    return out


#: What the values the transforms report mean (the hover's second line).
_TRANSFORM_HELP = {
    "coef": "factor the gradients were multiplied by (1: not clipped)",
    "alpha": "AutoscaledNorm's α_t: the multiplier applied this step",
    "sigma/sigma_ref": "σ_t/σ_ref: gradient spread now relative to the reference",
    "sigma": "σ_t: the gradients' spread this step", "sigma_ref": "σ_ref: the reference spread",
    "z": "z-score of the gradient norm against its running mean (ZClip)",
    "threshold": "the norm above which gradients are clipped", "total_norm": "gradient norm the transform saw",
    "max_norm": "the configured clipping norm",
}


def _transform_help(name: str) -> str:
    field = name.partition(".")[2]
    return _TRANSFORM_HELP.get(field, "value reported by the transform")


def _transform_series(resp: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """``{"transform.field": columns}`` from :meth:`Api.transforms`, plus ``σ_t/σ_ref`` of
    AutoscaledNorm (``autoscaled_norm.sigma/sigma_ref``, step by step where both are finite)."""
    out: dict[str, dict[str, list[Any]]] = {}
    for s in resp.get("series") or []:
        out[f"{s.get('transform', '?')}.{s.get('field', '?')}"] = series_points(s)
    sig, ref = out.get("autoscaled_norm.sigma"), out.get("autoscaled_norm.sigma_ref")
    if sig and ref:
        by_x = dict(zip(ref["x"], ref["mean"]))
        x, y = [], []
        for xi, v in zip(sig["x"], sig["mean"]):
            r = by_x.get(xi)
            if v is not None and r:
                x.append(xi)
                y.append(v / r)
        if x:
            out["autoscaled_norm.sigma/sigma_ref"] = {"x": x, "mean": y, "lo": y, "hi": y, "bad_x": [], "bad_text": []}
    return {k: v for k, v in out.items() if v["x"]}


# -- events --------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    f = num(v) if isinstance(v, (int, float, str)) else None
    return f"{f:.4g}" if f is not None else str(v)


def event_detail(e: dict[str, Any]) -> str:
    """One line saying what an event was: scales, the layers involved (first few), coefficients."""
    d = e.get("data") or {}
    parts = []
    if "scale_before" in d:
        parts.append(f"scale {_fmt(d['scale_before'])} → {_fmt(d.get('scale_after'))}")
    if d.get("layers"):
        ls = list(d["layers"])
        parts.append("layers: " + ", ".join(ls[:4]) + (f" (+{len(ls) - 4} more)" if len(ls) > 4 else ""))
    for k in ("transform", "coef", "total_norm", "norm", "z", "threshold", "clipped"):
        if k in d and d[k] is not None:
            parts.append(f"{k} {d[k] if k == 'transform' else _fmt(d[k])}")
    return "; ".join(parts) or "—"


def events_rows(events: list[dict[str, Any]], kinds: list[str] | None = None,
                min_severity: str | None = None) -> list[dict[str, Any]]:
    """Rows of the events table (agent and detector events, in step order, each once), filtered
    by kind and by least severity."""
    floor = SEVERITIES.index(min_severity) if min_severity in SEVERITIES else 0
    seen: set[Any] = set()
    out = []
    for e in sorted(events, key=lambda e: (e["step"], e.get("id") or 0)):
        key = e.get("id") if e.get("id") is not None else (e["step"], e["kind"], e.get("rank"), str(e.get("data")))
        if key in seen or (kinds and e["kind"] not in kinds) or _sev(e) < floor:
            continue
        seen.add(key)
        detail = e.get("message") if e.get("source") == "detector" and e.get("message") else event_detail(e)
        out.append({"step": e["step"], "severity": e.get("severity") or "info", "kind": e["kind"],
                    "source": e.get("source") or "agent", "rank": e.get("rank", 0), "detail": detail})
    return out


def run_counts(run: dict[str, Any]) -> dict[str, Any]:
    """The runs table's counts, whatever the server reports (absent counts show as blank)."""
    return {k: run.get(k) for k in ("overflows", "skipped", "clips", "nonfinite")}


# -- compare -------------------------------------------------------------------------------------
def run_labels(runs: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    """A legend label per run id: its name (with the id where two runs share a name)."""
    names = {r: (info or {}).get("name") or r for r, info in runs.items()}
    dup = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {r: f"{n} ({r})" if n in dup and n != r else n for r, n in names.items()}


def compare_figure(series: dict[str, dict[str, Any]], field: str | None, title: str, theme: str = "light",
                   log: bool = False, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The same series of several runs overlaid (``series``: run id → response), each named by
    ``labels`` (run id → its name; the id where missing)."""
    data: list[dict[str, Any]] = []
    ys: list[Any] = []
    for k, (run_id, resp) in enumerate(series.items()):
        cols = series_points(resp, field)
        ys += cols["lo"] + cols["hi"]
        colour = COLOURS[k % len(COLOURS)]
        name = (labels or {}).get(run_id, run_id)
        data.append({"type": "scatter", "x": cols["x"], "y": cols["mean"], "mode": "lines", "name": name,
                     "meta": run_id, "line": {"color": colour},
                     "hovertemplate": f"{name}<br>step %{{x}}: %{{y:.4g}}<extra>{run_id}</extra>"})
        data += _band(name, cols, colour)
    if not any(tr["x"] for tr in data):
        return empty_figure(f"No {title} recorded in these runs.", theme, title)
    return {"data": data, "layout": _layout(title, theme, xaxis={"title": {"text": "step"}}, showlegend=True,
                                            yaxis=log_axis("grad units (log)", ys) if log else {})}


# -- detector events, run health, module tree ------------------------------------------------------
#: Severities, least first (the server's order).
SEVERITIES = ("info", "warning", "critical")
SEVERITY_COLOUR = {"ok": "#8fbc8f", "info": "#6baed6", "warning": "#ff9f1c", "critical": "#d62728"}
#: An event counts toward a module's current colour while the run is within this many steps of it.
TREE_WINDOW = 200
#: The module tree draws at most this many levels below its root at once (a click goes deeper)...
TREE_DEPTH = 4
#: ...and fewer where they would hold more sectors than this (so many are too small to read).
TREE_SECTORS = 250
#: A tree of more nodes than this holds only the levels it draws: Plotly's treemap costs ~0.2 ms
#: per node in its data, drawn or not (~0.2 s for the 1,003 nodes of a 500-layer model, ~8 ms for
#: its 3 drawn ones). A click on a module then asks the server for the levels under it
#: (``meta.root``; callbacks.tree_zoom).
TREE_NODES = 400


def _sev(e: dict[str, Any]) -> int:
    return SEVERITIES.index(e.get("severity")) if e.get("severity") in SEVERITIES else 0


def not_recorded(label: str, theme: str = "light", title: str = "", why: str = "") -> dict[str, Any]:
    """The note for a statistic a run lacks (its agent did not record it, or this server does not know it)."""
    return empty_figure(f"{label}: not recorded in this run" + (f" ({why})" if why else "") + ".", theme, title)


def event_layers(e: dict[str, Any]) -> list[str]:
    """The layers an event names: the server's ``layers`` column, else its data's."""
    if e.get("layers"):
        return [str(x) for x in e["layers"]]
    d = (e.get("data") or {}).get("layers")
    return [str(x) for x in d] if isinstance(d, (list, dict)) else []


def health_lines(events: list[dict[str, Any]], limit: int = 6) -> tuple[list[dict[str, Any]], int]:
    """The run's worst events, one line each (severity, then the latest first), at most ``limit``,
    and how many more there are. Only warning and worse count as problems."""
    bad = [e for e in events if _sev(e) >= 1]
    bad.sort(key=lambda e: (-_sev(e), -int(e.get("step") or 0), -int(e.get("id") or 0)))
    out = []
    for e in bad[:limit]:
        ls = event_layers(e)
        out.append({"severity": e.get("severity"), "kind": e["kind"], "step": e["step"],
                    "source": e.get("source", "agent"), "layers": ls,
                    "text": e.get("message") or event_detail(e)})
    return out, max(0, len(bad) - limit)


def _numbers(e: dict[str, Any], layer: str) -> str:
    """What triggered ``e`` for one layer (a detector's numbers), as ``norm 3.2, factor 140``."""
    d = (e.get("data") or {}).get("layers")
    vals = d.get(layer) if isinstance(d, dict) else None
    if not isinstance(vals, dict):
        return ""
    return ", ".join(f"{k} {_fmt(v)}" for k, v in vals.items() if v is not None)


def layer_signals(names: list[str], latest: dict[str, Any] | None, events: list[dict[str, Any]],
                  last_step: int | None, nonfinite: dict[str, Any] | None = None) -> dict[str, list[tuple[int, str]]]:
    """Each layer's current signals as (severity index, text), worst first: the latest step's
    non-finite gradient (critical) and exactly-zero gradient (warning) from ``latest`` (a
    one-step ``/heatmap?stat=l2`` response; ``nonfinite``: the same for ``stat=nonfinite``, the
    element counts), and the events within :data:`TREE_WINDOW` steps of ``last_step`` that name
    the layer."""
    counts: dict[str, int] = {}
    if nonfinite and nonfinite.get("steps"):
        for k, ly in enumerate(nonfinite.get("layers", [])):
            c = num(nonfinite["values"][k][-1]) if nonfinite["values"][k] else None
            counts[ly["name"]] = int(c) if c is not None and math.isfinite(c) else 0
    out: dict[str, list[tuple[int, str]]] = {n: [] for n in names}
    if latest and latest.get("steps"):
        step = latest["steps"][-1]
        for k, ly in enumerate(latest.get("layers", [])):
            name = ly["name"]
            if name not in out:
                continue
            v = num(latest["values"][k][-1]) if latest["values"][k] else None
            nan = latest.get("nan") or []  # rows (steps) whose norm was NaN
            bad = counts.get(name, 0)
            if bad or (v is not None and not math.isfinite(v)) or (k < len(nan) and nan[k] and nan[k][-1]):
                out[name].append((2, f"non-finite gradient at step {step}" + (f" ({bad} elements)" if bad else "")))
            elif v == 0:
                out[name].append((1, f"zero gradient at step {step}"))
    for e in events:
        if last_step is not None and e["step"] < last_step - TREE_WINDOW:
            continue
        for name in event_layers(e):
            if name in out:
                nums = _numbers(e, name)
                out[name].append((_sev(e), f"{e['kind']} at step {e['step']}" + (f": {nums}" if nums else "")))
    for v in out.values():
        v.sort(key=lambda t: -t[0])
    return out


def module_tree_figure(names: list[str], signals: dict[str, list[tuple[int, str]]], theme: str = "light",
                       last_step: int | None = None, root: str | None = None) -> dict[str, Any]:
    """The model's module tree (layer names split on '.') as a treemap, each module coloured by the
    worst current signal of the layers under it; the hover names the signal. A tree of more than
    :data:`TREE_NODES` nodes holds only the levels drawn under ``root`` (a node id; default the
    model) and the path to it: a module at the edge is sized by its layers."""
    if not names:
        return empty_figure("No layers yet: the tree appears with the run's first recorded step.", theme,
                            "Module tree")
    ids, labels, parents, worst, texts = ["(model)"], ["model"], [""], [-1], [[]]
    pos = {"(model)": 0}
    under = [0]  # layers under each node
    for name in names:
        parts = name.split(".")
        parent = "(model)"
        for d in range(1, len(parts) + 1):
            node = ".".join(parts[:d])
            if node not in pos:
                pos[node] = len(ids)
                ids.append(node)
                labels.append(parts[d - 1])
                parents.append(parent)
                worst.append(-1)
                texts.append([])
                under.append(0)
            parent = node
        sig = signals.get(name, [])
        for node in ["(model)"] + [".".join(parts[:d]) for d in range(1, len(parts) + 1)]:
            j = pos[node]
            under[j] += 1
            for sev, text in sig:
                worst[j] = max(worst[j], sev)
                if len(texts[j]) < 4:
                    texts[j].append(f"{SEVERITIES[sev]}: {text}" + ("" if node == name else f" ({name})"))
    leaves = set(names)
    top = root if root in pos and len(ids) > TREE_NODES else "(model)"
    kids: dict[str, list[int]] = {}
    for j, p in enumerate(parents):
        kids.setdefault(p, []).append(j)
    levels = [[pos[top]]]  # the nodes under `top`, level by level
    while len(levels) < TREE_DEPTH and (nxt := [k for j in levels[-1] for k in kids.get(ids[j], [])]):
        levels.append(nxt)
    maxdepth = next((m for m in range(TREE_DEPTH, 1, -1) if sum(len(v) for v in levels[:m]) <= TREE_SECTORS), 2)
    values = [1 if i in leaves else 0 for i in ids]
    keep = list(range(len(ids)))
    if len(ids) > TREE_NODES:
        edge = set(levels[maxdepth - 1]) if len(levels) >= maxdepth else set()
        path, j = [], pos[top]
        while parents[j]:  # the ancestors of `top`, each with that one child here
            j = pos[parents[j]]
            path.append(j)
        keep = sorted(path + [j for v in levels[:maxdepth] for j in v])
        values = [under[j] if j in edge else values[j] for j in range(len(ids))]
    colour_of = {-1: SEVERITY_COLOUR["ok"], 0: SEVERITY_COLOUR["info"], 1: SEVERITY_COLOUR["warning"],
                 2: SEVERITY_COLOUR["critical"]}
    hover = ["<br>".join(t) if t else "no problem signal" for t in texts]
    n_bad = sum(1 for n in names if any(s >= 1 for s, _ in signals.get(n, [])))
    c = THEMES.get(theme, THEMES["light"])
    tree: dict[str, Any] = {
        "type": "treemap", "ids": [ids[j] for j in keep], "labels": [labels[j] for j in keep],
        "parents": [parents[j] for j in keep], "values": [values[j] for j in keep], "branchvalues": "remainder",
        "marker": {"colors": [colour_of[worst[j]] for j in keep], "line": {"color": c["bg"], "width": 1}},
        "customdata": [[ids[j], "ok" if worst[j] < 0 else SEVERITIES[worst[j]]] for j in keep],
        "text": [hover[j] for j in keep], "textinfo": "label", "maxdepth": maxdepth, "pathbar": {"visible": True},
        "hovertemplate": "%{customdata[0]}<br><b>%{customdata[1]}</b><br>%{text}<extra></extra>"}
    if top != "(model)":
        tree["level"] = top
    title = "Module tree — coloured by the worst current signal" + (
        f" · {n_bad} layer{'s' if n_bad != 1 else ''} with problems" if n_bad else " · no problems detected")
    lay = _layout(title, theme, margin={"l": 10, "r": 10, "t": 36, "b": 10},
                  meta={"worst": {i: ("ok" if w < 0 else SEVERITIES[w]) for i, w in zip(ids, worst)},
                        "last_step": last_step, "root": top, "pruned": len(keep) < len(ids)})
    return {"data": [tree], "layout": lay}


def tree_parent(node: str) -> str:
    """The module tree's id of ``node``'s parent (``(model)`` for a top-level module)."""
    return node.rpartition(".")[0] or "(model)"


def step_stat_figure(field: str, resp: dict[str, Any] | None, theme: str = "light",
                     why: str = "") -> dict[str, Any]:
    """One step-level statistic of :data:`STEP_STATS` over the run (``resp``: a ``/steps``
    response for it; ``None``: the server refused the field)."""
    f, label, log, help_text = STEP_STATS[field]
    cols = series_points(resp or {}, f)
    if resp is None or not any(v is not None for v in cols["mean"]) and not cols["bad_x"]:
        return not_recorded(label, theme, label, why)
    data = [{"type": "scatter", "x": cols["x"], "y": cols["mean"], "mode": "lines", "name": label,
             "line": {"color": COLOURS[4]},
             "hovertemplate": f"step %{{x}}<br>{label}: %{{y:.4g}}<br><i>{help_text}</i><extra></extra>"}]
    data += _band(label, cols, COLOURS[4])
    if cols["bad_x"]:
        data.append(_bad_markers(cols, _top(cols["hi"]) or 1.0))
    return {"data": data, "layout": _layout(label, theme, xaxis={"title": {"text": "step"}},
                                            yaxis=log_axis(label + " (log)", cols["lo"] + cols["hi"]) if log else {})}
