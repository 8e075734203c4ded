"""End to end in headless Chromium: a real ``gradwatch serve``, a real training run streaming into
it (GradScaler with an injected overflow), the dashboard watched live. Every wait is on a data
condition in the page, bounded; nothing asserts on timing."""

from __future__ import annotations

import time
from typing import Any

import pytest

from .conftest import Page, Server, wait_until

GD = "(id) => document.querySelector('#' + id + ' .js-plotly-plot')"
#: trace 0's x of a graph, and its layout.meta
X0 = "(id) => { const g = document.querySelector('#' + id + ' .js-plotly-plot'); " \
     "return g && g.data && g.data[0] ? Array.from(g.data[0].x) : null; }"
META = "(id) => { const g = document.querySelector('#' + id + ' .js-plotly-plot'); " \
       "return g && g.layout ? g.layout.meta || null : null; }"
OVERFLOW_AT = 30


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
    trainer("e2e", "--steps", "100000", "--sleep", "0.1", "--overflow-at", str(OVERFLOW_AT))
    run = _run(server, "e2e", OVERFLOW_AT + 10)
    rid = run["run_id"]

    # runs page: the run is listed with its status and a link to its page
    page.page.goto(server.url + "/")
    page.page.get_by_role("link", name="e2e").wait_for(timeout=60_000)
    assert "running" in page.page.locator("#runs-table").inner_text()
    page.shot("runs")

    # run page: every chart drawn from the snapshot
    page.page.goto(f"{server.url}/runs/{rid}")
    for gid in ("heatmap", "norm-graph", "scale-graph", "scalars-graph"):
        page.wait_js(f"() => {{ const g = ({GD})('{gid}'); return g && g.data && g.data.length > 0; }}")
    assert page.js(META, "heatmap")["layers"][0] == "0.weight"
    transforms = page.page.locator("#transforms-graph").inner_text()
    assert "transform" in transforms.lower()  # values, or the explanation why there are none
    snap = page.js(META, "norm-graph")["last_step"]
    assert snap >= OVERFLOW_AT + 10

    # live: points beyond the snapshot arrive without reloading, each step once
    page.wait_js(f"() => {{ const x = ({X0})('norm-graph'); return x && Math.max(...x) > {snap + 15}; }}")
    page.wait_js(f"() => {{ const x = ({X0})('heatmap'); return x && Math.max(...x) > {snap + 5}; }}")
    xs = page.js(X0, "norm-graph")
    assert len(xs) == len(set(xs)), "duplicate steps in the live chart"
    assert xs == sorted(xs)
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

    # kill the server mid-run, restart it on the same port and database: the view resumes, no gap
    before = _max_x(page, "norm-graph")
    server.kill()
    killed_at = time.monotonic()
    page.wait_js("() => /reconnecting/.test(document.querySelector('#live-status').innerText)")
    server.start()
    restarted_at = time.monotonic()
    page.wait_js(f"() => {{ const x = ({X0})('norm-graph'); return x && Math.max(...x) > {before + 40}; }}",
                 timeout=180)
    recovered_at = time.monotonic()
    xs = page.js(X0, "norm-graph")
    dups = sorted({x for x in xs if xs.count(x) > 1})
    assert not dups, f"duplicate steps after the reconnect: {dups} {page.js('() => window.gradwatchLive.stats')}"
    assert xs == list(range(xs[0], xs[-1] + 1)), "steps missing after the reconnect"
    page.shot("run-after-restart")

    # no console errors, except the failed connections while the server was down
    outside = [m for t, m in page.errors if not (killed_at <= t <= recovered_at)]
    assert not outside, outside
    during = [m for t, m in page.errors if killed_at <= t <= recovered_at]
    down = ("WebSocket", "ERR_CONNECTION", "Failed to fetch", "Callback failed: the server did not respond")
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
