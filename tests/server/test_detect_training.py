"""Detectors on real training: the digits CNN (``cli/digits.py``) trained with SGD, streamed by the
agent into a real ``gradwatch serve`` process. A healthy run triggers nothing; a layer whose
gradient a hook zeroes from step 150 is reported dead, by name, 20 recorded steps later; a
learning rate raised 200x at step 150 gives a spike at once and exploding gradients after."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

STEPS = 500


def train(base: str, run: str, *, dead_from: int | None = None, lr_boost_at: int | None = None,
          steps: int = STEPS) -> tuple[str, list[float]]:
    """Train and stream; the run's id and the losses."""
    import torch
    from torch import nn

    from gradwatch.agent import watch
    from gradwatch.cli.digits import load, make_model

    # one thread: the reduction order (so the exact norms, and which cross a threshold) does not
    # depend on the machine's core count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(torch, nn, watch, load, make_model, base, run, dead_from, lr_boost_at, steps)
    finally:
        torch.set_num_threads(threads)


def _train(torch: Any, nn: Any, watch: Any, load: Any, make_model: Any, base: str, run: str, dead_from: int | None,
           lr_boost_at: int | None, steps: int) -> tuple[str, list[float]]:
    torch.manual_seed(0)
    x, y, _, _ = load(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = {"step": 0}
    if dead_from is not None:  # the layer's gradient hook zeroes it from then on
        model.fc.weight.register_hook(lambda g: g * 0 if state["step"] >= dead_from else g)
    g = torch.Generator().manual_seed(0)
    losses = []
    with watch(model, opt, run=run, project="detect", server=base) as w:
        for i in range(steps):
            state["step"] = i
            if lr_boost_at is not None and i == lr_boost_at:
                for group in opt.param_groups:
                    group["lr"] *= 200
            idx = torch.randint(0, len(y), (32,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
            losses.append(float(loss))
    return w.run_id, losses


def events(base: str, run: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{base}/api/v1/runs/{run}/events?source=detector", timeout=30) as r:
        return list(json.loads(r.read())["data"])


@pytest.fixture
def server(gw_serve: Callable[..., str], tmp_path: Path) -> str:
    return gw_serve(f"sqlite:///{tmp_path / 'gw.db'}")


def test_a_healthy_run_triggers_no_detector(server: str) -> None:
    run, losses = train(server, "healthy")
    assert losses[-1] < losses[0] / 3  # it did learn
    found = events(server, run)
    assert found == [], [(e["kind"], e["step"], e["layers"]) for e in found]  # false positives: 0 of 500 steps


def test_a_layer_zeroed_mid_run_is_reported_dead(server: str) -> None:
    run, _ = train(server, "dead", dead_from=150, steps=300)
    found = [(e["kind"], e["step"], e["layers"]) for e in events(server, run)]
    assert found == [("dead", 169, ["fc.weight"])]


def _export(base: str, run: str, table: str) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{base}/api/v1/runs/{run}/export?table={table}", timeout=60) as r:
        return list(csv.DictReader(io.StringIO(r.read().decode())))


def _norms(base: str, run: str) -> dict[str, dict[int, float]]:
    """The stored L2 norm of every layer (model order) and the total (``(total)``), by step: the
    values the detectors saw."""
    out: dict[str, dict[int, float]] = {}
    for row in sorted(_export(base, run, "layer_stats"), key=lambda r: (int(r["layer"]), int(r["step"]))):
        out.setdefault(row["layer_name"], {})[int(row["step"])] = float(row["l2"])
    out["(total)"] = {int(r["step"]): float(r["total_norm"]) for r in _export(base, run, "steps") if r["total_norm"]}
    return out


def _trend_and_dead_reference(norms: dict[str, dict[int, float]]) -> list[tuple[str, int, list[str]]]:
    """The documented rules (docs/detectors.md, default thresholds) applied directly to the stored
    norms: ``exploding`` / ``vanishing`` when a norm has been above / below its early level (the
    median of its first 20 log-norms) by 30x / 1000x for 10 / 50 recorded steps in a row, ``dead``
    when it has been exactly zero for 20; one event per (kind, step), layers in model order."""
    fired: dict[tuple[str, int], list[str]] = {}
    for name, by_step in norms.items():
        steps = sorted(by_step)
        # a zero or non-finite norm has no log: it breaks a vanishing run; non-finite counts as above
        logs = [math.log(by_step[t]) if 0 < by_step[t] < math.inf else math.nan for t in steps]
        early = statistics.median([v for v in logs if not math.isnan(v)][:20])
        runs = {"exploding": 0, "vanishing": 0, "dead": 0}
        for t, v in zip(steps, logs):
            bad = not math.isfinite(by_step[t])
            for kind, hit, window in (("exploding", bad or v > early + math.log(30.0), 10),
                                      ("vanishing", v < early - math.log(1000.0), 50),
                                      ("dead", by_step[t] == 0.0, 20)):
                runs[kind] = runs[kind] + 1 if hit else 0
                if runs[kind] == window:
                    fired.setdefault((kind, t), []).append(name)
    return [(k, t, names) for (k, t), names in sorted(fired.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def test_a_diverging_run_spikes_then_explodes(server: str) -> None:
    """The learning rate is raised 200x at step 150 (its first update lands at 151). Which layers
    cross a threshold at which step depends on the machine's floating-point reduction order, so
    the exact events are checked against the rules applied to the norms the run stored; the
    spikes (a robust moving average, not restated here) by where they fall and what they name."""
    run, losses = train(server, "boom", lr_boost_at=150, steps=250)
    assert max(losses[150:]) > 10 * max(losses[100:150])  # it diverged
    found = [(e["kind"], e["step"], e["layers"]) for e in events(server, run)]
    norms = _norms(server, run)
    assert all(step > 150 for _, step, _ in found), found  # the healthy phase raised nothing
    # spikes: at once, naming layers whose norm jumped past the rule's minimum factor (3x) over
    # its level late in the healthy phase
    spikes = [(step, layers) for kind, step, layers in found if kind == "spike"]
    assert spikes and all(151 <= step <= 155 for step, _ in spikes), found
    for step, layers in spikes:
        for name in layers:
            level = statistics.median(norms[name][t] for t in range(100, 150))
            assert norms[name][step] > 3 * level, (name, step, norms[name][step], level)
    # exploding, vanishing and dead: exactly what the rules give on the stored norms
    want = _trend_and_dead_reference(norms)
    assert [f for f in found if f[0] != "spike"] == want
    exploding = [f for f in want if f[0] == "exploding"]
    assert exploding and exploding[0][1] <= 170 and any("(total)" in f[2] for f in exploding), want
