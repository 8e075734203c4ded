"""Figure builders and row helpers as plain functions: NaN, ±inf, empty runs, one step, one layer,
1,000 layers. Every figure must serialize as strict JSON (what the browser's JSON.parse accepts)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gradwatch.dashboard import figures as fig
from gradwatch.dashboard.callbacks import run_rows


def strict(f: dict[str, Any]) -> dict[str, Any]:
    json.dumps(f, allow_nan=False)  # raises on NaN/inf anywhere in the figure
    return f


def hm(values: list[list[Any]], nan: list[list[int]] | None = None, steps: list[int] | None = None) -> dict[str, Any]:
    n = len(values[0]) if values else 0
    return {"layers": [{"index": i, "name": f"layer{i}.weight"} for i in range(len(values))], "stat": "l2",
            "steps": steps if steps is not None else list(range(n)), "values": values,
            "nan": nan or [[0] * n for _ in values], "bucket_width": 1}


def test_heatmap_log10_and_nonfinite_cells_in_their_own_trace() -> None:
    f = strict(fig.heatmap_figure(hm([[1.0, "NaN", 100.0], [0.1, "Infinity", 0.0]], nan=[[0, 3, 0], [0, 0, 0]])))
    main, bad = f["data"]
    assert main["transpose"] is True and main["x"] == [0, 1, 2]
    # step-major: z[step][layer]; log10 of the value; non-finite cells are not values
    assert main["z"][0] == [0.0, -1.0] and main["z"][2][0] == 2.0
    assert main["z"][1] == [None, None]
    assert main["z"][2][1] == -1.0  # an exact zero sits at the bottom of the scale, not a hole
    assert bad["z"][1] == [1, 1] and bad["z"][0] == [None, None]
    assert [bad["text"][0][1], bad["text"][1][1]] == ["3 non-finite", "+inf"]  # text is layer-major
    assert bad["colorscale"][0][1] == fig.NONFINITE_COLOUR
    assert "2 non-finite cells" in f["layout"]["title"]["text"]
    meta = f["layout"]["meta"]
    assert meta["layer_index"] == [0, 1] and meta["live"] is True and meta["log"] is True


def test_heatmap_regex_filter_and_invalid_regex() -> None:
    h = hm([[1.0], [2.0], [3.0]])
    f = fig.heatmap_figure(h, pattern=r"^layer[02]\.")
    assert f["data"][0]["y"] == ["layer0.weight", "layer2.weight"]
    assert f["layout"]["meta"]["layer_index"] == [0, 2]
    keep, err = fig.layer_filter(["a", "b"], "(")
    assert keep == [0, 1] and err is not None and "invalid regex" in err
    assert "No layer matches" in fig.heatmap_figure(h, pattern="^nothing$")["layout"]["annotations"][0]["text"]


def test_heatmap_empty_run_one_step_one_layer() -> None:
    empty = fig.heatmap_figure({"layers": [], "steps": [], "values": [], "nan": []})
    assert empty["data"] == [] and "No layer statistics yet" in empty["layout"]["annotations"][0]["text"]
    one = strict(fig.heatmap_figure(hm([[5.0]])))
    assert one["data"][0]["z"] == [[round(math.log10(5.0), 4)]]  # 4 decimals of log10 travel


def test_heatmap_nonfinite_count_stat_is_linear_and_marks_cells() -> None:
    f = strict(fig.heatmap_figure(hm([[0, 4]]), "nonfinite"))
    assert f["data"][0]["z"] == [[0], [4]]
    assert f["data"][1]["z"] == [[None], [1]]
    assert f["layout"]["meta"]["log"] is False


def test_heatmap_ratio_divides_by_weight_norm() -> None:
    f = strict(fig.heatmap_figure(hm([[1.0, 2.0]]), "ratio", weights=hm([[10.0, 0.0]])))
    assert f["data"][0]["z"][0] == [-1.0]
    assert f["data"][1]["z"][1] == [1]  # a zero weight norm: the ratio is not finite
    assert f["layout"]["meta"]["live"] is False  # no live weight norms: the ratio is not extended


def test_heatmap_thousand_layers() -> None:
    n = 1000
    f = strict(fig.heatmap_figure(hm([[float(i + 1), float(i + 2)] for i in range(n)])))
    assert len(f["data"][0]["y"]) == n and len(f["data"][0]["z"]) == 2 and len(f["data"][0]["z"][0]) == n
    assert f["layout"]["yaxis"]["showticklabels"] is False  # 1,000 names would be unreadable


def test_series_points_raw_and_buckets_keep_nonfinite_visible() -> None:
    raw = {"downsampled": False, "points": [{"step": 1, "value": 1.0}, {"step": 2, "value": "NaN"},
                                             {"step": 3, "value": "-Infinity"}]}
    c = fig.series_points(raw)
    assert c["mean"] == [1.0, None, None] and c["bad_x"] == [2, 3]
    assert c["bad_text"] == ["step 2: NaN", "step 3: -inf"]
    bk = {"downsampled": True, "buckets": [
        {"step_min": 0, "step_max": 9, "min": 1.0, "max": 9.0, "mean": 5.0, "count": 10, "nan": 0},
        {"step_min": 10, "step_max": 19, "min": 1.0, "max": "Infinity", "mean": "Infinity", "count": 10, "nan": 2}]}
    c = fig.series_points(bk)
    assert c["x"] == [4, 14] and c["lo"] == [1.0, 1.0] and c["hi"] == [9.0, None]
    assert c["bad_x"] == [14] and "2 NaN" in c["bad_text"][0] and "+inf" in c["bad_text"][0]


def test_layer_series_band_and_markers() -> None:
    bk = {"downsampled": True, "buckets": [
        {"step_min": 0, "step_max": 9, "min": 1.0, "max": 9.0, "mean": 5.0, "count": 10, "nan": 0},
        {"step_min": 10, "step_max": 19, "min": 2.0, "max": 3.0, "mean": "NaN", "count": 10, "nan": 1}]}
    f = strict(fig.layer_series_figure("fc.weight", {"l2": bk}))
    names = [t["name"] for t in f["data"]]
    assert names == ["l2", "l2 max", "l2 min–max", "non-finite"]
    assert f["data"][2]["fill"] == "tonexty" and f["data"][1]["y"] == [9.0, 3.0]
    assert f["layout"]["yaxis"]["type"] == "log"
    empty = fig.layer_series_figure("fc.weight", {"l2": {"downsampled": False, "points": []}})
    assert "No statistics recorded" in empty["layout"]["annotations"][0]["text"]


def _steps(*rows: tuple[int, Any, Any, Any]) -> dict[str, Any]:
    return {"downsampled": False, "points": [{"step": s, "rank": 0, "total_norm": a, "total_norm_post": b,
                                              "loss_scale": c, "skipped": False} for s, a, b, c in rows]}


def test_norm_figure_live_traces_first_and_clip_markers() -> None:
    events = [{"kind": "clip", "step": 2, "data": {"transform": "ClipNorm", "coef": 0.5, "total_norm": 2.0}}]
    f = strict(fig.norm_figure(_steps((1, 1.0, 1.0, None), (2, 2.0, 1.0, None), (3, "NaN", "NaN", None)),
                               events, last_step=3))
    assert [t["name"] for t in f["data"][:2]] == ["before transforms", "after transforms"]
    assert f["data"][0]["y"] == [1.0, 2.0, None]
    clip = next(t for t in f["data"] if t["name"] == "clip")
    assert clip["x"] == [2] and "coef 0.5" in clip["text"][0]
    assert next(t for t in f["data"] if t["name"] == "non-finite")["x"] == [3]
    assert f["layout"]["meta"]["last_step"] == 3 and f["layout"]["yaxis"]["type"] == "log"
    assert "No steps" in fig.norm_figure({"downsampled": False, "points": []}, [])["layout"]["annotations"][0]["text"]


def test_scale_figure_overflow_hover_names_layers() -> None:
    events = [{"kind": "overflow", "step": 2, "data": {"scale_before": 1024.0, "scale_after": 512.0,
                                                        "layers": ["0.weight", "0.bias"]}},
              {"kind": "skipped", "step": 2, "data": {"layers": ["0.weight"]}},
              {"kind": "scale_growth", "step": 5, "data": {"scale_before": 512.0, "scale_after": 1024.0}}]
    f = strict(fig.scale_figure(_steps((1, 1.0, 1.0, 1024.0), (2, "Infinity", 1.0, 512.0)), events))
    assert f["layout"]["yaxis"]["type"] == "log" and f["data"][0]["name"] == "loss scale"
    ov = next(t for t in f["data"] if t["name"] == "overflow")
    assert ov["x"] == [2] and ov["y"] == [1024.0] and "layers: 0.weight, 0.bias" in ov["text"][0]
    assert next(t for t in f["data"] if t["name"] == "growth")["x"] == [5]
    none = fig.scale_figure(_steps((1, 1.0, 1.0, None)), [])
    assert "does not use gradwatch.agent.GradScaler" in none["layout"]["annotations"][0]["text"]


def test_transforms_and_scalars_empty_states() -> None:
    assert "does not report" in fig.transforms_figure(None)["layout"]["annotations"][0]["text"]
    assert "No transform values" in fig.transforms_figure({"series": []})["layout"]["annotations"][0]["text"]
    assert "watcher.log" in fig.scalars_figure({})["layout"]["annotations"][0]["text"]


def _ts(transform: str, field: str, values: list[Any]) -> dict[str, Any]:
    """One series of ``GET /runs/{id}/transforms?transform=...`` (raw points)."""
    return {"transform": transform, "field": field, "downsampled": False,
            "points": [{"step": i, "rank": 0, "value": v} for i, v in enumerate(values)]}


def test_transforms_figure_draws_the_real_response() -> None:
    got = strict(fig.transforms_figure({"series": [
        _ts("autoscaled_norm", "alpha", [1.0, 0.8]), _ts("autoscaled_norm", "sigma", [2.0, 1.6]),
        _ts("autoscaled_norm", "sigma_ref", [2.0, 2.0]), _ts("autoscaled_norm", "skipped_update", [0, 0]),
        _ts("clip_norm", "coef", [1.0, 0.5]), _ts("clip_norm", "total_norm", [0.5, 2.0]),
        _ts("zclip", "z", ["NaN", 3.0]), _ts("zclip", "threshold", [1.0, 1.5])]}))
    by_name = {t["name"]: t for t in got["data"]}
    assert by_name["autoscaled_norm.sigma/sigma_ref"]["y"] == [1.0, 0.8]  # σ_t/σ_ref, derived step by step
    assert by_name["autoscaled_norm.alpha"]["y"] == [1.0, 0.8] and by_name["autoscaled_norm.alpha"]["yaxis"] == "y"
    assert by_name["clip_norm.coef"]["y"] == [1.0, 0.5]
    assert by_name["clip_norm.total_norm"]["yaxis"] == "y2" and by_name["zclip.threshold"]["yaxis"] == "y2"
    assert by_name["zclip.z"]["y"] == [None, 3.0] and by_name["zclip.z non-finite"]["x"] == [0]  # warm-up NaN
    assert "autoscaled_norm.skipped_update" not in by_name  # flags are left out
    assert got["layout"]["yaxis2"]["type"] == "log"


@pytest.mark.parametrize("kinds,expected", [(None, 3), (["overflow"], 1), (["clip", "spike"], 1)])
def test_events_rows_filter(kinds: list[str] | None, expected: int) -> None:
    ev = [{"kind": "overflow", "step": 3, "rank": 0, "data": {"layers": [f"l{i}" for i in range(6)]}},
          {"kind": "clip", "step": 4, "rank": 0, "data": {}},
          {"kind": "scale_growth", "step": 5, "rank": 0, "data": {"scale_before": 1.0, "scale_after": 2.0}}]
    rows = fig.events_rows(ev, kinds)
    assert len(rows) == expected
    if kinds is None:
        assert rows[0]["detail"] == "layers: l0, l1, l2, l3 (+2 more)"
        assert rows[1]["detail"] == "—"


def test_run_rows_link_duration_and_counts() -> None:
    runs = [{"run_id": "abc", "name": None, "project": "p", "status": "running", "started_at": 100.0,
             "created_at": 100.0, "updated_at": 150.0, "last_step": 7, "overflows": 2},
            {"run_id": "def", "name": "big", "project": "p", "status": "finished", "started_at": "NaN",
             "created_at": 0.0, "updated_at": 7200.0, "last_step": None}]
    rows = run_rows(runs, now=165.0)
    assert rows[0]["name"] == "[abc](/runs/abc)" and rows[0]["duration"] == "1m 05s" and rows[0]["overflows"] == 2
    assert rows[1]["name"] == "[big](/runs/def)" and rows[1]["duration"] == "2h 00m" and rows[1]["skipped"] is None


# -- module-prefix groups, 1-2-5 ticks, pooled std, live traces, run names --------------------------
NAMES = ["enc.0.w", "enc.0.b", "enc.1.w", "dec.w", "head", "enc.2.w"]


def test_layer_groups_follow_model_order_and_depth() -> None:
    keep = list(range(len(NAMES)))
    assert fig.layer_groups(NAMES, keep, 0) == [(n, [i]) for i, n in enumerate(NAMES)]
    one = fig.layer_groups(NAMES, keep, 1)
    # a group sits where its first layer does; a group of one keeps the layer's own name
    assert one == [("enc.* (4 layers)", [0, 1, 2, 5]), ("dec.w", [3]), ("head", [4])]
    two = fig.layer_groups(NAMES, keep, 2)
    assert [g for g, _ in two] == ["enc.0.* (2 layers)", "enc.1.w", "dec.w", "head", "enc.2.w"]
    assert fig.layer_groups(NAMES, [2, 5], 1) == [("enc.* (2 layers)", [2, 5])]  # after the regex filter
    assert fig.group_prefix("enc.0.* (2 layers)") == "enc.0" and fig.group_prefix("enc.1.w") is None


def test_merge_group_matches_a_reference_on_random_cases() -> None:
    import random

    rng = random.Random(11)
    for _ in range(500):
        vals: list[float | None] = [rng.choice([None, 0.0, 10 ** rng.uniform(-30, 30)]) for _ in range(rng.randint(1, 9))]
        finite = [v for v in vals if v is not None]
        got = fig.merge_group(vals, "rss")
        if not finite:
            assert got is None
            continue
        assert got == pytest.approx(math.sqrt(sum((v / 1e30) ** 2 for v in finite)) * 1e30, rel=1e-12)
        assert fig.merge_group(vals, "max") == max(finite)
        assert fig.merge_group(vals, "sum") == pytest.approx(sum(finite))
    assert math.isnan(fig.merge_group([1.0, math.nan, math.inf], "rss"))  # NaN wins: the cell is marked
    assert fig.merge_group([1.0, math.inf], "rss") == math.inf
    assert fig.merge_group([1e200, 1e200], "rss") == pytest.approx(math.sqrt(2) * 1e200)  # no overflow


def test_heatmap_grouped_by_prefix_merges_layers_and_marks_nonfinite() -> None:
    h = {"layers": [{"index": 10 + i, "name": n} for i, n in enumerate(NAMES)], "steps": [0, 1],
         "values": [[3.0, 1.0], [4.0, "NaN"], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0], [0.0, 1.0]],
         "nan": [[0, 0], [0, 7], [0, 0], [0, 0], [0, 0], [0, 0]], "bucket_width": 1}
    f = strict(fig.heatmap_figure(h, "l2", depth=1))
    main, bad = f["data"]
    assert main["y"] == ["enc.* (4 layers)", "dec.w", "head"]
    assert main["z"][0][0] == round(math.log10(5.0), 4)  # √(3² + 4²): the group's L2 norm
    assert main["z"][1][0] is None and bad["z"][1][0] == 1 and bad["text"][0][1] == "7 non-finite"
    meta = f["layout"]["meta"]
    assert meta["rows"] == [[10, 11, 12, 15], [13], [14]] and meta["agg"] == "rss" and meta["depth"] == 1
    counts = strict(fig.heatmap_figure({**h, "values": [[1, 0], [2, 7], [0, 0], [0, 0], [0, 0], [3, 0]]},
                                       "nonfinite", depth=1))
    assert counts["data"][0]["z"][0][0] == 6 and counts["layout"]["meta"]["agg"] == "sum"
    flat = fig.heatmap_figure(h, "l2")
    assert "rows" not in flat["layout"]["meta"] and len(flat["data"][0]["y"]) == len(NAMES)


def test_heatmap_thousand_layers_grouped() -> None:
    names = [f"blocks.{i // 10}.mlp{i % 10}.weight" for i in range(1000)]
    h = {"layers": [{"index": i, "name": n} for i, n in enumerate(names)], "steps": [0],
         "values": [[float(i % 7 + 1)] for i in range(1000)], "nan": [[0]] * 1000, "bucket_width": 1}
    f = strict(fig.heatmap_figure(h, "maxabs", depth=2))
    assert len(f["data"][0]["y"]) == 100 and f["data"][0]["y"][0] == "blocks.0.* (10 layers)"
    assert f["data"][0]["z"][0][0] == round(math.log10(7.0), 4)  # max |g| of the group: its largest layer


@pytest.mark.parametrize(("lo", "hi", "expect"), [
    (0.01, 10.0, [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]),
    (1e-8, 1e2, [1e-8, 1e-6, 1e-4, 1e-2, 1.0, 1e2]),
])
def test_ticks_125_span_decades(lo: float, hi: float, expect: list[float]) -> None:
    got = fig.ticks_125(lo, hi)
    assert got is not None
    vals, text = got
    inside = [v for v in vals if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
    assert len(text) == len(vals)
    for e in expect:
        assert any(v == pytest.approx(e) for v in inside), (e, inside)
    assert vals[0] < lo and vals[-1] > hi  # a decade of margin for points appended live


def test_ticks_125_narrow_or_invalid_ranges_leave_plotly_its_own_ticks() -> None:
    assert fig.ticks_125(2.0, 5.0) is None
    assert fig.ticks_125(0.0, 5.0) is None and fig.ticks_125(1.0, math.inf) is None
    assert fig.tick_text(0.002) == "0.002" and fig.tick_text(2e-5) == "2e-5" and fig.tick_text(1e6) == "1e+6"
    assert fig.log_axis("x", [None, math.nan, -1.0])["type"] == "log"  # nothing positive: plain log axis
    axis = fig.log_axis("x", [0.01, 3.0, math.inf, None])
    assert axis["tickmode"] == "array" and "0.05" in axis["ticktext"]


def test_heatmap_colorbar_ticks_read_as_values() -> None:
    f = fig.heatmap_figure(hm([[0.001, 10.0]]))
    cb = f["data"][0]["colorbar"]
    assert "0.01" in cb["ticktext"] and cb["tickvals"][cb["ticktext"].index("0.01")] == -2.0
    assert "grad units" in f["data"][0]["hovertemplate"]


def test_layer_series_std_and_var_are_pooled_over_buckets() -> None:
    bucket = {"step_min": 0, "step_max": 9, "min": 1.0, "max": 3.0, "mean": 2.0, "nan": 0,
              "pooled": {"count": 40, "mean": 0.0, "var": 9.0, "std": 3.0, "skipped": 0}}
    resp = {"downsampled": True, "buckets": [bucket]}
    f = strict(fig.layer_series_figure("a", {"l2": resp, "std": resp, "var": {**resp, "buckets": [
        {**bucket, "pooled": {**bucket["pooled"]}}]}}))
    lines = {t["name"]: t for t in f["data"] if t.get("mode") == "lines" and t.get("hoverinfo") != "skip"}
    assert lines["l2"]["y"] == [2.0]  # a bucket mean where pooling means nothing
    assert lines["std (pooled)"]["y"] == [3.0] and lines["var (pooled)"]["y"] == [9.0]
    assert "pooled" in lines["std (pooled)"]["hovertemplate"] and "grad units" in lines["l2"]["hovertemplate"]
    # an older server without pooled moments: the bucket mean, still drawn
    assert fig.series_points({"downsampled": True, "buckets": [{**bucket, "pooled": None}]}, pooled="std")["mean"] == [2.0]


def test_live_traces_name_every_extended_trace() -> None:
    pts = {"downsampled": False, "points": [{"step": 0, "value": 1.0}]}
    sc = strict(fig.scalars_figure({"loss": pts, "train.lr": pts}, last_step=0))
    live = sc["layout"]["meta"]["live_traces"]
    assert [p for _, p in live] == [["scalars", "loss"], ["scalars", "train.lr"]]
    assert [sc["data"][i]["name"] for i, _ in live] == ["loss", "train.lr"]
    tr = strict(fig.transforms_figure({"series": [
        {"transform": "autoscaled_norm", "field": f, **pts} for f in ("alpha", "sigma", "sigma_ref")]}, last_step=0))
    by_name = {tr["data"][i]["name"]: p for i, p in tr["layout"]["meta"]["live_traces"]}
    assert by_name["autoscaled_norm.alpha"] == ["transforms", "autoscaled_norm", "alpha"]
    assert by_name["autoscaled_norm.sigma/sigma_ref"] == {"num": ["transforms", "autoscaled_norm", "sigma"],
                                                          "den": ["transforms", "autoscaled_norm", "sigma_ref"]}
    norm = fig.norm_figure({"downsampled": False, "points": [{"step": 0, "total_norm": 1.0, "total_norm_post": 1.0}]},
                           [], last_step=0)
    assert norm["layout"]["meta"]["live_traces"] == [[0, ["total_norm"]], [1, ["total_norm_post"]]]


def test_compare_names_runs_and_keeps_ids_apart() -> None:
    labels = fig.run_labels({"a1": {"name": "baseline"}, "b2": {"name": "baseline"}, "c3": {"name": "lr-3e-4"},
                             "d4": None})
    assert labels == {"a1": "baseline (a1)", "b2": "baseline (b2)", "c3": "lr-3e-4", "d4": "d4"}
    pts = {"downsampled": False, "points": [{"step": 0, "value": 1.0}, {"step": 1, "value": 100.0}]}
    f = strict(fig.compare_figure({"c3": pts, "d4": pts}, None, "loss", log=True, labels=labels))
    assert [t["name"] for t in f["data"]] == ["lr-3e-4", "d4"] and f["data"][0]["meta"] == "c3"
    assert f["layout"]["yaxis"]["type"] == "log" and f["layout"]["showlegend"] is True


def test_colour_bar_under_a_decade_still_reads_as_values() -> None:
    got = fig.ticks_125(10 ** -2.6, 10 ** -1.8, fine=True)
    assert got is not None
    vals, text = got
    assert all(10 ** -2.6 <= v <= 10 ** -1.8 for v in vals) and {"0.003", "0.005", "0.01"} <= set(text)
    assert fig.ticks_125(10 ** -2.6, 10 ** -1.8) is None
    axis = fig.log_axis("x", [0.1, 0.35])  # under a decade: values, not Plotly's bare digits
    assert {"0.1", "0.2", "0.3"} <= set(axis["ticktext"])
    assert fig.tick_text(1.5e-5) == "1.5e-5" and fig.tick_text(1.5e-4) == "0.00015"


def test_health_lines_worst_first_then_latest_and_only_problems() -> None:
    import random

    rng = random.Random(3)
    sev = ["info", "warning", "critical"]
    for _ in range(50):
        events = [{"id": i, "kind": rng.choice(["dead", "spike", "overflow"]), "step": rng.randint(0, 50),
                   "severity": rng.choice(sev), "layers": [f"l{rng.randint(0, 3)}"], "data": {}, "message": f"m{i}"}
                  for i in range(rng.randint(0, 12))]
        lines, more = fig.health_lines(events, limit=4)
        bad = [e for e in events if e["severity"] != "info"]
        want = sorted(bad, key=lambda e: (sev.index(e["severity"]), e["step"], e["id"]), reverse=True)
        assert [ln["text"] for ln in lines] == [e["message"] for e in want[:4]]
        assert more == max(0, len(bad) - 4)
    assert fig.health_lines([]) == ([], 0)


def test_layer_signals_zero_and_nonfinite_latest_step_and_recent_events_only() -> None:
    names = ["a.w", "b.w", "c.w"]
    latest = {"steps": [500], "layers": [{"name": n} for n in names], "values": [[0.0], ["NaN"], [1.5]],
              "nan": [[0], [1], [0]]}
    nf = {"steps": [500], "layers": [{"name": n} for n in names], "values": [[0], [7], [0]]}
    old = {"kind": "spike", "step": 200, "severity": "critical", "layers": ["c.w"], "data": {}}
    new = {"kind": "spike", "step": 450, "severity": "warning", "layers": ["c.w"],
           "data": {"layers": {"c.w": {"norm": 3.0, "factor": 40.0}}}}
    got = fig.layer_signals(names, latest, [old, new], 500, nf)
    assert got == {"a.w": [(1, "zero gradient at step 500")], "b.w": [(2, "non-finite gradient at step 500 (7 elements)")],
                   "c.w": [(1, "spike at step 450: norm 3, factor 40")]}
    tree = fig.module_tree_figure(names, got)
    assert tree["layout"]["meta"]["worst"] == {"(model)": "critical", "a": "warning", "a.w": "warning",
                                               "b": "critical", "b.w": "critical", "c": "warning", "c.w": "warning"}
    assert "1 layer" not in tree["layout"]["title"]["text"] and "3 layers with problems" in tree["layout"]["title"]["text"]


def test_headroom_plus_inf_is_the_top_of_the_scale_not_a_nonfinite_cell() -> None:
    """An all-zero gradient's headroom is +inf: nothing can overflow. It is drawn in the top
    colour (the largest finite headroom), not as a NaN/inf fault; -inf (an overflow) and NaN
    still are; other statistics' +inf still is."""
    h = hm([[3.0, "Infinity", 10.0], [2.0, "-Infinity", "NaN"]], nan=[[0, 1, 0], [0, 1, 1]])
    f = strict(fig.heatmap_figure(h, "headroom"))
    main, bad = f["data"]
    assert main["z"][1][0] == 10.0 and main["z"][0] == [3.0, 2.0]
    assert bad["z"][1] == [None, 1] and bad["z"][2] == [None, 1]
    assert f["layout"]["meta"]["inf_top"] == 10.0
    assert "2 non-finite cells" in f["layout"]["title"]["text"]
    other = strict(fig.heatmap_figure(h, "maxabs"))
    assert other["data"][1]["z"][1][0] == 1 and "inf_top" not in other["layout"]["meta"]


def test_heatmap_columns_are_equal_width_so_plotly_draws_one_image() -> None:
    # the server's buckets start at the run's first step, then on block boundaries
    hm = {"layers": [{"index": 0, "name": "a"}], "steps": [1, 64, 128, 192], "values": [[1.0, 2.0, 3.0, 4.0]],
          "nan": [[0, 0, 0, 0]]}
    assert fig.heatmap_figure(hm)["data"][0]["x"] == [0, 64, 128, 192]
    for steps in ([5, 6, 7, 8], [0, 10, 20, 25], [1, 64]):  # already equal, irregular, too few: kept
        hm = {**hm, "steps": steps, "values": [[1.0] * len(steps)], "nan": [[0] * len(steps)]}
        assert fig.heatmap_figure(hm)["data"][0]["x"] == steps


def test_module_tree_draws_fewer_levels_when_they_hold_too_many_sectors() -> None:
    small = [f"{i}.{k}" for i in range(5) for k in ("weight", "bias")]
    tree = fig.module_tree_figure(small, {})["data"][0]
    assert tree["maxdepth"] == fig.TREE_DEPTH and len(tree["ids"]) == 16 and "level" not in tree
    big = [f"model.layers.{i}.weight" for i in range(500)]  # levels: (model), model, layers, 500 × i, 500 leaves
    f = fig.module_tree_figure(big, {"model.layers.7.weight": [(1, "zero gradient at step 9")]})
    tree = f["data"][0]
    # only the levels drawn: the module at the edge is sized by its 500 layers, coloured by the worst of them
    assert tree["maxdepth"] == 3 and tree["ids"] == ["(model)", "model", "model.layers"]
    assert tree["values"] == [0, 0, 500] and tree["marker"]["colors"][2] == fig.SEVERITY_COLOUR["warning"]
    assert f["layout"]["meta"]["pruned"] and f["layout"]["meta"]["worst"]["model.layers.7.weight"] == "warning"
    # drawn from a module: the path to it, then its levels
    tree = fig.module_tree_figure(big, {}, root="model.layers.7")["data"][0]
    assert tree["level"] == "model.layers.7"
    assert tree["ids"] == ["(model)", "model", "model.layers", "model.layers.7", "model.layers.7.weight"]
    assert fig.tree_parent("model.layers.7") == "model.layers" and fig.tree_parent("model") == "(model)"


def test_log_axis_of_a_constant_series_has_a_few_ticks() -> None:
    # a run at a fixed loss scale: Plotly pads the range; 90 mantissas there overlapped (~80 labels)
    axis = fig.log_axis("scale (log)", [65536.0] * 50)
    assert 2 <= len(axis["tickvals"]) <= 6 and any(3e4 <= v <= 1e5 for v in axis["tickvals"])
    # a range under a decade keeps its finer ticks
    assert 1500.0 in fig.log_axis("scale (log)", [1024.0, 2048.0])["tickvals"]
