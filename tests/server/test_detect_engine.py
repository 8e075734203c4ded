"""Detectors on synthetic streams: each fires where its condition starts, naming the right layers,
and a healthy noisy stream triggers none (many random cases)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from gradwatch.server.detect.engine import TOTAL_KEY, Found, State, StepInput, evaluate
from gradwatch.server.detect.rules import Rules

KEYS = np.arange(1, 6, dtype=np.int64)


def stream(n: int, norm: Callable[[int, int], float | None], *, seed: int = 0, noise: float = 0.2,
           total: bool = False, scale: Callable[[int], float] | None = None,
           coef: Callable[[int], float] | None = None, skipped: Callable[[int], bool] = lambda s: False,
           ) -> list[StepInput]:
    """``n`` steps of 5 layers; ``norm(step, layer)`` the noiseless norm (None: layer absent),
    multiplied by log-normal noise of ``noise`` (a healthy run's batch-to-batch spread)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        keys, l2 = [], []
        for k in KEYS.tolist():
            v = norm(s, k)
            if v is None:
                continue
            keys.append(k)
            l2.append(v * math.exp(noise * rng.standard_normal()) if math.isfinite(v) and v > 0 else v)
        arr = np.array(l2, float)
        nf = (~np.isfinite(arr)).astype(np.int64)
        out.append(StepInput(s, 1000.0 + s, np.array(keys, np.int64), arr, nf,
                             total_norm=float(np.sqrt(np.sum(arr ** 2))) if total else None,
                             loss_scale=scale(s) if scale else None, clip_coef=coef(s) if coef else None,
                             skipped=skipped(s)))
    return out


def healthy(s: int, k: int) -> float:
    """Norms that fall 10x over training, as a loss curve does, with layer-specific levels."""
    return 0.1 * k * (1 + 9 * math.exp(-s / 150))


def run(steps: list[StepInput], rules: Rules | None = None) -> list[Found]:
    return evaluate(rules or Rules(), State(), steps)


@pytest.mark.parametrize("seed", range(20))
def test_a_healthy_noisy_stream_triggers_nothing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    noise = float(rng.uniform(0.05, 0.4))
    found = run(stream(1500, healthy, seed=seed, noise=noise, total=True, scale=lambda s: 65536.0,
                       coef=lambda s: 1.0))
    assert found == [], [(f.kind, f.step, f.keys) for f in found]


@pytest.mark.parametrize("seed", range(5))
def test_spike_fires_at_the_step_and_names_the_layer(seed: int) -> None:
    at = 300 + seed * 7
    found = run(stream(600, lambda s, k: healthy(s, k) * (20 if (s == at and k == 3) else 1), seed=seed))
    assert [(f.kind, f.step, f.keys) for f in found] == [("spike", at, [3])]
    assert found[0].data["layers"][3]["factor"] > 10
    assert found[0].severity == "warning"


def test_spike_on_the_total_norm_and_critical_when_huge() -> None:
    found = run(stream(400, lambda s, k: healthy(s, k) * (1000 if s == 250 else 1), total=True))
    assert [(f.kind, f.step, sorted(f.keys)) for f in found] == [("spike", 250, [TOTAL_KEY, 1, 2, 3, 4, 5])]
    assert found[0].severity == "critical"


def test_no_spike_during_warmup_and_a_cooldown_after_one() -> None:
    rules = Rules.model_validate({"spike": {"cooldown": 30}})
    found = run(stream(300, lambda s, k: healthy(s, k) * (50 if (k == 1 and s in (5, 200, 210, 240)) else 1)),
                rules)
    assert [(f.kind, f.step) for f in found] == [("spike", 200), ("spike", 240)]


def test_vanishing_fires_after_the_sustained_window() -> None:
    found = run(stream(400, lambda s, k: healthy(s, k) * (1e-5 if (k == 2 and s >= 200) else 1)))
    assert [(f.kind, f.step, f.keys) for f in found] == [("vanishing", 249, [2])]
    assert found[0].data["layers"][2]["since_step"] == 200


def test_exploding_counts_nonfinite_norms_and_fires_once() -> None:
    found = run(stream(400, lambda s, k: (math.inf if s >= 260 else healthy(s, k) * 1000) if (k == 4 and s >= 250)
                       else healthy(s, k)))
    kinds = [(f.kind, f.step, f.keys) for f in found]
    assert ("exploding", 259, [4]) in kinds
    assert ("nonfinite_first", 260, [4]) in kinds
    assert [k for k in kinds if k[0] == "exploding"] == [("exploding", 259, [4])]
    assert all(f.keys == [4] for f in found if f.kind != "spike")


def test_dead_fires_for_zero_and_for_missing_gradients() -> None:
    def norm(s: int, k: int) -> float | None:
        if k == 1 and s >= 100:
            return 0.0
        if k == 5 and s >= 150:
            return None
        return healthy(s, k)
    found = run(stream(300, norm))
    assert [(f.kind, f.step, f.keys) for f in found] == [("dead", 119, [1]), ("dead", 169, [5])]
    assert found[0].data["layers"][1] == {"since_step": 100, "steps": 20}


def test_a_layer_that_never_had_a_gradient_is_not_dead() -> None:
    assert run(stream(200, lambda s, k: None if k == 2 else healthy(s, k))) == []


def test_nonfinite_first_once_per_layer_info_when_the_scaler_skipped() -> None:
    def norm(s: int, k: int) -> float:
        return math.nan if (k == 2 and s in (50, 60)) or (k == 3 and s == 80) else healthy(s, k)
    found = run(stream(100, norm, skipped=lambda s: s == 80))
    assert [(f.kind, f.step, f.keys, f.severity) for f in found] == [
        ("nonfinite_first", 50, [2], "critical"), ("nonfinite_first", 80, [3], "info")]


def test_scale_collapse_needs_repeated_backoffs_below_the_floor() -> None:
    scales = {s: 65536.0 / 2 ** max(0, (s - 100) // 5 + 1) if s >= 100 else 65536.0 for s in range(200)}
    found = run(stream(200, healthy, scale=lambda s: scales[s], noise=0.0))
    assert [(f.kind, f.step) for f in found] == [("scale_collapse", min(s for s in scales if scales[s] < 1.0))]
    assert found[0].data["loss_scale"] < 1.0


def test_clip_saturation_past_the_share_and_rearmed_below_half_of_it() -> None:
    def coef(s: int) -> float:
        return 0.5 if (100 <= s < 400) or s >= 700 else 1.0
    found = run(stream(900, healthy, coef=coef, noise=0.0))
    steps = [f.step for f in found if f.kind == "clip_saturation"]
    assert steps == [150, 750]  # > 50 % of the last 100 steps: the 51st clipped step


def test_disabled_detectors_fire_nothing() -> None:
    off = Rules.model_validate({k: {"enabled": False} for k in ("spike", "vanishing", "exploding", "dead",
                                                              "nonfinite_first")})
    found = run(stream(300, lambda s, k: 0.0 if s > 100 else (math.nan if s == 50 else healthy(s, k) *
                                                              (100 if s == 80 else 1))), off)
    assert found == []


def test_state_round_trips_through_json_mid_stream() -> None:
    """Evaluating in pieces with the state saved and loaded between them finds the same events."""
    import json

    steps = stream(500, lambda s, k: healthy(s, k) * (30 if s == 222 else 1) if s < 400 or k != 2 else 0.0, seed=3)
    whole = run(steps)
    st, pieces = State(), []
    for a in range(0, 500, 37):
        pieces += evaluate(Rules(), st, steps[a:a + 37])
        st = State.from_json(json.loads(json.dumps(st.to_json())))
    assert [(f.kind, f.step, f.keys) for f in pieces] == [(f.kind, f.step, f.keys) for f in whole]
    assert {f.kind for f in whole} >= {"spike", "dead"}


def test_steps_are_evaluated_once_late_ones_counted() -> None:
    steps = stream(100, healthy)
    st = State()
    evaluate(Rules(), st, steps[50:])
    evaluate(Rules(), st, steps[:60])
    assert (st.steps, st.late, st.last_step) == (50, 60, 99)
