"""The gradient noise scale (gradwatch.agent.noise): estimator test vectors, the device-side EMA
rules, and real DDP on 2 and 4 gloo ranks against a direct computation from each rank's gradient."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from gradwatch.agent import watch
from gradwatch.agent.noise import BETA, MIN_UPDATES, NoiseLayout, NoiseScale, _Bucket, estimates, finish

WORKER = Path(__file__).with_name("_noise_ddp_worker.py")


# -- test vectors of the estimators --------------------------------------------------------------


def test_closed_form_vector() -> None:
    g2, s = estimates(5.0, 2.0, 1, 4)
    assert g2 == pytest.approx(1.0) and s == pytest.approx(4.0)
    # a constant estimate through the bias-corrected EMAs: B_simple = 4 once settled
    m_g = m_s = 0.0
    for n in range(1, MIN_UPDATES + 1):
        m_g, m_s = BETA * m_g + (1 - BETA) * g2, BETA * m_s + (1 - BETA) * s
        b, eg, es = finish(n, m_g, m_s)
        assert eg == pytest.approx(1.0, rel=1e-12) and es == pytest.approx(4.0, rel=1e-12)
        assert (b is None) == (n < MIN_UPDATES)
    assert b == pytest.approx(4.0, rel=1e-12)


def test_monte_carlo_estimators_are_unbiased() -> None:
    """Per-example gradients ~ N(G, Σ), G = (1, 0), Σ = diag(2, 2) (tr Σ = 4, |G|² = 1), B_small = 2,
    B_big = 8, 10⁴ draws: the means of both estimators within 3 standard errors of the truth, for
    one small batch and for the DDP form (mean over 4 ranks of the local squared norms)."""
    gen = torch.Generator().manual_seed(1234)
    draws, b, w = 10_000, 2, 4
    ex = torch.tensor([1.0, 0.0], dtype=torch.float64) + math.sqrt(2.0) * torch.randn(
        draws, w, b, 2, generator=gen, dtype=torch.float64)
    local = ex.mean(2)  # (draws, ranks, 2): each rank's small-batch gradient
    big = local.mean(1).square().sum(-1)
    for small in (local[:, 0].square().sum(-1), local.square().sum(-1).mean(1)):
        g2, s = estimates(small, big, b, b * w)
        for est, truth in ((g2, 1.0), (s, 4.0)):
            se = est.std().item() / math.sqrt(draws)
            assert abs(est.mean().item() - truth) < 3 * se, (est.mean().item(), truth, se)
    # and the test can tell: the same data read with the wrong batch sizes (1 and 4: |G|²_est only
    # depends on their ratio, S_est on the sizes) puts S_est far outside 3 standard errors
    _, s_wrong = estimates(local[:, 0].square().sum(-1), big, 1, 4)
    assert abs(s_wrong.mean().item() - 4.0) > 10 * s_wrong.std().item() / math.sqrt(draws)


def test_zero_noise_gives_exactly_zero() -> None:
    g = torch.tensor([0.3, -1.25, 2.0], dtype=torch.float64)
    sq = float(g.square().sum())  # every example identical: small and big batch means are equal
    g2, s = estimates(sq, sq, 4, 16)
    assert s == 0.0 and g2 == pytest.approx(sq)
    m_g = m_s = 0.0
    for _ in range(MIN_UPDATES):
        m_g, m_s = BETA * m_g + (1 - BETA) * g2, BETA * m_s + (1 - BETA) * s
    assert finish(MIN_UPDATES, m_g, m_s)[0] == 0.0


def test_null_rules() -> None:
    assert finish(0, 0.0, 0.0) == (None, None, None)
    assert finish(MIN_UPDATES - 1, 1.0, 1.0)[0] is None
    assert finish(MIN_UPDATES, -0.1, 1.0)[0] is None  # EMA(|G|²) <= 0: no signal yet
    assert finish(MIN_UPDATES, 0.0, 1.0)[0] is None
    b, g2, s = finish(50, 0.5, 2.0)
    assert b == pytest.approx(4.0) and g2 == pytest.approx(0.5 / (1 - BETA ** 50))


# -- the device-side update (no DDP: buckets injected as the hook leaves them) -------------------


def _noise(n_layers: int, batch: int | None = None, world: int = 2) -> NoiseScale:
    ns = NoiseScale(None, lookup=lambda p: 0, n_layers=lambda: n_layers, batch_size=batch, active=lambda: True,
                    report=lambda k, e: (_ for _ in ()).throw(e))
    ns.installed, ns._tried, ns._world = True, True, world
    return ns


def _feed(ns: NoiseScale, layers: list[int], local_sum: list[float], big: list[float], **kw: Any) -> list[float]:
    ns._buckets = {0: _Bucket(torch.tensor(layers), torch.tensor(local_sum, dtype=torch.float64),
                              torch.tensor(big, dtype=torch.float64))}
    out = ns.update(**kw)
    assert out is not None
    return out[0].tolist()


def test_update_matches_host_ema_and_skips_bad_steps() -> None:
    """Two layers plus an unmeasured parameter (-1); world 2, per-rank batch 3. Skipped steps,
    a found_inf flag and non-finite norms leave the EMAs and counts unchanged; the loss scale
    is divided out (squared)."""
    ns = _noise(2, batch=3, world=2)
    gen = torch.Generator().manual_seed(5)
    ref = {"t": [0.0, 0.0, 0], 0: [0.0, 0.0, 0], 1: [0.0, 0.0, 0]}

    def host(key: Any, small: float, big: float) -> None:
        g2, s = estimates(small, big, 3, 6)
        r = ref[key]
        r[0], r[1], r[2] = BETA * r[0] + (1 - BETA) * g2, BETA * r[1] + (1 - BETA) * s, r[2] + 1

    for step in range(25):
        small = (torch.rand(2, generator=gen, dtype=torch.float64) + 1).tolist()
        big = [0.6 * x + 0.3 * y for x, y in zip(small, torch.rand(2, generator=gen, dtype=torch.float64).tolist())]
        kind = step % 5
        scale = 2.0 ** (step % 3)
        sums = [2 * x * scale ** 2 for x in small]  # what the all-reduce of the local squared norms sums
        bigs = [x * scale ** 2 for x in big]
        kw: dict[str, Any] = {"loss_scale": torch.tensor(scale)}
        if kind == 1:
            kw["skipped"] = True
        elif kind == 2:
            kw["found_inf"] = torch.tensor(1.0)
        elif kind == 3:
            sums[1] = math.nan  # layer 1 non-finite: the step total and layer 1 are not fed, layer 0 is not either
        v = _feed(ns, [0, 1, -1], sums + [99.0], bigs + [99.0], **kw)
        if kind in (0, 4):
            host("t", sum(small), sum(big))
            host(0, small[0], big[0])
            host(1, small[1], big[1])
        assert v[0] == ref["t"][2] and v[3] == ref[0][2] and v[4] == ref[1][2]
        assert v[1] == pytest.approx(ref["t"][0], rel=1e-12, abs=1e-15)
        assert v[2] == pytest.approx(ref["t"][1], rel=1e-12, abs=1e-15)
        for j in (0, 1):
            assert v[5 + j] == pytest.approx(ref[j][0], rel=1e-12, abs=1e-15)
            assert v[7 + j] == pytest.approx(ref[j][1], rel=1e-12, abs=1e-15)
    assert ref["t"][2] >= MIN_UPDATES and ref["t"][0] > 0 and ref[1][0] > 0
    step_fields, col = NoiseLayout(2).read(v, [1, 0, 7])
    assert step_fields["noise_scale"] == pytest.approx(ref["t"][1] / ref["t"][0], rel=1e-12)
    assert col[0] == pytest.approx(ref[1][1] / ref[1][0], rel=1e-12) and col[2] is None


def test_layer_table_growth_keeps_state() -> None:
    n = [1]
    ns = NoiseScale(None, lookup=lambda p: 0, n_layers=lambda: n[0], batch_size=None, active=lambda: True,
                    report=lambda k, e: None)
    ns.installed, ns._tried, ns._world = True, True, 2
    v1 = _feed(ns, [0], [4.0], [1.0])
    n[0] = 2
    v2 = _feed(ns, [0, 1], [4.0, 4.0], [1.0, 1.0])
    assert v1[3] == 1 and v2[3] == 2 and v2[4] == 1  # layer 0 kept its count, layer 1 starts
    # world 2, per-rank batches: small = 4/2 = 2, big = 1 -> |G|²_est = 0, S_est = 2 every time
    assert v2[5] == 0.0 and v2[6] == 0.0  # EMA(|G|²) of layers 0 and 1
    assert v2[7] == pytest.approx(2 * (1 - BETA) * (1 + BETA)) and v2[8] == pytest.approx(2 * (1 - BETA))


def test_without_ddp_or_accumulation_it_warns_once_and_records_nothing() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = watch(model, opt, server="memory", noise_scale=8)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
    msgs = [str(c.message) for c in caught if "noise_scale" in str(c.message)]
    assert len(msgs) == 1 and "DistributedDataParallel" in msgs[0]
    assert w.sink is not None
    steps = w.sink.steps  # type: ignore[attr-defined]
    assert len(steps) == 3 and all(s.noise_scale is None and s.layers["noise_scale"] == [None, None] for s in steps)
    w.close()


# -- gradient accumulation on one process ---------------------------------------------------------


def _accum_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _micro(step: int, i: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + i)
    x = torch.randn(b, 5, generator=g)
    return x, (x @ torch.randn(5, 3, generator=torch.Generator().manual_seed(9))).argmax(1)


def test_accumulation_first_micro_batch_is_rescaled_by_k() -> None:
    """Test vector 4: k = 4 micro-batches, each loss divided by 4: the small-batch norm the hook
    keeps, times k², equals the norm of an un-divided backward of the first micro-batch."""
    model = _accum_model()
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    ns = NoiseScale(model, lookup=lambda p: ids[id(p)], n_layers=lambda: 4, batch_size=2, active=lambda: True,
                    report=lambda k, e: (_ for _ in ()).throw(e))
    assert ns.install() and ns.mode == "accum"
    k = 4
    for i in range(k):
        x, y = _micro(0, i, 2)
        (torch.nn.functional.cross_entropy(model(x), y) / k).backward()
    got = ns._accum_take(False)
    assert got is not None
    lids, small, big, ratio, _ = got
    order = lids.tolist()  # the order the hooks fired (backward order)
    assert ratio == 4.0 and sorted(order) == [0, 1, 2, 3]
    ref = _accum_model()
    x, y = _micro(0, 0, 2)
    torch.nn.functional.cross_entropy(ref(x), y).backward()  # NOT divided by k
    want = [float(p.grad.double().square().sum()) for p in ref.parameters()]  # type: ignore[union-attr]
    assert small.tolist() == pytest.approx([want[i] for i in order], rel=1e-5)
    acc = [float(p.grad.double().square().sum()) for p in model.parameters()]  # type: ignore[union-attr]
    assert big.tolist() == pytest.approx([acc[i] for i in order], rel=1e-5)
    assert small.tolist() != pytest.approx(big.tolist(), rel=1e-2)  # the two batch sizes do differ
    ns.remove()


def test_accumulation_end_to_end_matches_direct_computation() -> None:
    """watch(noise_scale=b) on a plain model trained with k = 3 micro-batches per step: every
    step's recorded values equal the estimators and EMAs computed from gradients taken directly
    (first micro-batch alone, and the accumulated mean); step 0 is not measured (hook installed)."""
    b, k, steps = 4, 3, 14
    model = _accum_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = watch(model, opt, server="memory", noise_scale=b)
    ref = _accum_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    res: dict[str, Any] = {"world": k, "batch": b, "names": [n for n, _ in ref.named_parameters()], "expected": []}
    for step in range(steps):
        opt.zero_grad()
        for i in range(k):
            x, y = _micro(step, i, b)
            (torch.nn.functional.cross_entropy(model(x), y) / k).backward()
        opt.step()
        micro = []
        for i in range(k):
            ref.zero_grad()
            x, y = _micro(step, i, b)
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            micro.append([p.grad.detach().double().clone() for p in ref.parameters()])  # type: ignore[union-attr]
        mean = [sum(m[j] for m in micro) / k for j in range(len(micro[0]))]
        res["expected"].append({"small": [float(g.square().sum()) for g in micro[0]],
                                "big": [float(m.square().sum()) for m in mean]})
        for p, m in zip(ref.parameters(), mean):
            p.grad = m.float()
        ref_opt.step()
    table = {la.index: la.name for la in w.sink.layers}  # type: ignore[union-attr]
    res["steps"] = [{"step": s.step, "names": [table[i] for i in s.layer_ids], "noise_scale": s.noise_scale,
                     "noise_g2": s.noise_g2, "noise_trace": s.noise_trace, "layer_noise": s.layers["noise_scale"]}
                    for s in w.sink.steps]  # type: ignore[union-attr]
    w.close()
    assert check_against_direct(res) >= 1


def test_accumulation_under_gradwatch_grad_scaler() -> None:
    """gradwatch's GradScaler (scale 2¹⁰, backing off after an overflow): each step's loss scale is
    divided out, and the step whose gradients overflowed (skipped) feeds nothing; every recorded
    value equals the direct computation without any scaling."""
    from gradwatch.agent import GradScaler

    b, k, steps, bad = 4, 2, 14, 4
    model = _accum_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = watch(model, opt, server="memory", noise_scale=b)
    scaler = GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    ref = _accum_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    res: dict[str, Any] = {"world": k, "batch": b, "names": [n for n, _ in ref.named_parameters()], "expected": []}
    scales = []
    for step in range(steps):
        opt.zero_grad()
        for i in range(k):
            x, y = _micro(step, i, b)
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y) / k).backward()
        if step == bad:
            model[0].weight.grad[0, 0] = math.inf  # type: ignore[index]
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        micro = []
        for i in range(k):
            ref.zero_grad()
            x, y = _micro(step, i, b)
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            micro.append([p.grad.detach().double().clone() for p in ref.parameters()])  # type: ignore[union-attr]
        mean = [sum(m[j] for m in micro) / k for j in range(len(micro[0]))]
        res["expected"].append({"small": [float(g.square().sum()) for g in micro[0]],
                                "big": [float(m.square().sum()) for m in mean]})
        if step != bad:  # the skipped step does not move the parameters
            for p, m in zip(ref.parameters(), mean):
                p.grad = m.float()
            ref_opt.step()
    assert scales[bad] == 1024.0 and scales[-1] == 512.0  # the backoff happened: two scales were divided out
    res["steps"] = [{"step": s.step, "names": [w.sink.layers[i].name for i in s.layer_ids],  # type: ignore[union-attr]
                     "noise_scale": s.noise_scale, "noise_g2": s.noise_g2, "noise_trace": s.noise_trace,
                     "layer_noise": s.layers["noise_scale"]} for s in w.sink.steps]  # type: ignore[union-attr]
    assert [s.skipped for s in w.sink.steps] == [i == bad for i in range(steps)]  # type: ignore[union-attr]
    w.close()
    assert check_against_direct(res, skip=frozenset({bad})) >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads_scaled", [False, True])
def test_accumulation_divides_out_the_loss_scale(dtype: torch.dtype, grads_scaled: bool) -> None:
    """Micro-losses multiplied by S = 2¹⁰ (as a loss scaler does): with the scale given, the EMA
    snapshot equals the unscaled run's. ``grads_scaled``: the accumulated grads are still scaled at
    the step (fused optimizer) or were unscaled before it (torch's or gradwatch's scaler)."""
    S, k = 1024.0, 3
    snaps = []
    for scale in (1.0, S):
        model = _accum_model().to(dtype)
        ids = {id(p): i for i, p in enumerate(model.parameters())}
        ns = NoiseScale(model, lookup=lambda p, ids=ids: ids[id(p)], n_layers=lambda: 4, batch_size=2,
                        active=lambda: True, report=lambda k, e: (_ for _ in ()).throw(e))
        assert ns.install()
        for step in range(3):
            model.zero_grad()
            for i in range(k):
                x, y = _micro(step, i, 2)
                (torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y) / k * scale).backward()
            if scale != 1.0 and not grads_scaled:
                for p in model.parameters():
                    p.grad.div_(scale)  # type: ignore[union-attr]  # unscaled before the step
            out = ns.update(loss_scale=torch.tensor(scale) if scale != 1.0 else None,
                            grads_scaled=grads_scaled and scale != 1.0)
        assert out is not None
        snaps.append(out[0])
    assert snaps[0][0] == 3 and snaps[1].tolist() == pytest.approx(snaps[0].tolist(), rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "yes"])
def test_bad_option_is_a_clear_error(bad: Any) -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="noise_scale"):
        watch(model, torch.optim.SGD(model.parameters(), lr=0.1), server="memory", noise_scale=bad)


# -- the wire ---------------------------------------------------------------------------------------


def _batch(noise: dict[str, Any], col: list[Any]) -> Any:
    from gradwatch.agent import wire

    cols: dict[str, list[Any]] = {"numel": [3, 4], "mean": [0.0, 1.0], "m2": [1.0, 2.0], "l2": [1.0, 2.0],
                                  "maxabs": [1.0, 2.0], "nonfinite": [0, 0], "l2_post": [None, None],
                                  "wnorm": [1.0, 1.0], "noise_scale": col}
    return wire.Batch(run=wire.RunInfo(run_id="r1", project="p"), seq=1,
                      layers=[wire.LayerInfo(0, "a", [3], "float32"), wire.LayerInfo(1, "b", [4], "float32")],
                      steps=[wire.StepRecord(step=5, time=1.0, layer_ids=[0, 1], layers=cols, **noise)])


def test_wire_round_trip_and_old_servers() -> None:
    """Measured values (NaN and ±inf included) survive encode/decode; unmeasured ones are left
    out of the encoding entirely (a server that predates the fields still takes the batch); a
    malformed value is a WireError naming the field."""
    from gradwatch.agent import wire

    b = _batch({"noise_scale": 12.5, "noise_g2": math.inf, "noise_trace": math.nan}, [3.0, None])
    d = json.loads(wire.encode_batch(b))
    assert d["steps"][0]["noise_scale"] == 12.5 and d["steps"][0]["noise_g2"] == "Infinity"
    back = wire.decode_batch(wire.encode_batch(b)).steps[0]
    assert back.noise_scale == 12.5 and back.noise_g2 == math.inf and math.isnan(back.noise_trace or 0.0)
    assert back.layers["noise_scale"] == [3.0, None]
    quiet = _batch({}, [None, None])
    d = json.loads(wire.encode_batch(quiet))
    assert not {"noise_scale", "noise_g2", "noise_trace"} & d["steps"][0].keys()
    assert "noise_scale" not in d["steps"][0]["layers"]
    assert wire.decode_batch(wire.encode_batch(quiet)).steps[0].layers["noise_scale"] == [None, None]
    d["steps"][0]["noise_scale"] = "lots"
    with pytest.raises(wire.WireError, match="noise_scale"):
        wire.batch_from_dict(d)
    d["steps"][0]["noise_scale"] = None
    d["steps"][0]["layers"]["noise_scale"] = [1.0]  # wrong length
    with pytest.raises(wire.WireError, match="noise_scale"):
        wire.batch_from_dict(d)


# -- real DDP -----------------------------------------------------------------------------------


def run_workers(run_ranks: Any, tmp_path: Path, world: int, mode: str, steps: int, url: str = "memory",
                **extra_env: str) -> list[dict[str, Any]]:
    outs = [tmp_path / f"{mode}{world}-rank{r}.json" for r in range(world)]
    return run_ranks(WORKER, world, outs, [mode, str(steps), url], timeout=300, **extra_env)


def expected_series(res: dict[str, Any], last_fed: int | None = None, every: int = 1,
                    skip: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """What rank 0 must record at each step, from the per-rank gradients computed directly: the
    hook is registered at the first optimizer step, so step 0 is not measured (nor steps after
    ``last_fed``); with ``every`` > 1 only recorded steps (multiples of it) are measured."""
    world, b = res["world"], res["batch"]
    n_layers = len(res["names"])
    ema = {k: [0.0, 0.0, 0] for k in ["total", *range(n_layers)]}
    out: list[dict[str, Any]] = []
    for step, e in enumerate(res["expected"]):
        if step >= 1 and (last_fed is None or step <= last_fed) and step % every == 0 and step not in skip:
            pairs = [("total", sum(e["small"]), sum(e["big"]))] + [(i, e["small"][i], e["big"][i]) for i in range(n_layers)]
            for key, sm, bg in pairs:
                g2 = (world * b * bg - b * sm) / (world * b - b)
                s = (sm - bg) / (1 / b - 1 / (world * b))
                m = ema[key]
                m[0], m[1], m[2] = BETA * m[0] + (1 - BETA) * g2, BETA * m[1] + (1 - BETA) * s, m[2] + 1

        def settle(key: Any) -> tuple[float | None, float | None, float | None]:
            m = ema[key]
            if m[2] == 0:
                return None, None, None
            c = 1 - BETA ** m[2]
            g2, s = m[0] / c, m[1] / c
            return (s / g2 if m[2] >= MIN_UPDATES and g2 > 0 else None), g2, s

        bt, g2t, st = settle("total")
        out.append({"noise_scale": bt, "noise_g2": g2t, "noise_trace": st,
                    "layer_noise": [settle(i)[0] for i in range(n_layers)]})
    return out


def _close(got: float | None, want: float | None) -> bool:
    if want is None or got is None:
        return got is None and want is None
    return got == pytest.approx(want, rel=2e-3, abs=1e-9)


def check_against_direct(res: dict[str, Any], last_fed: int | None = None, every: int = 1,
                         skip: frozenset[int] = frozenset()) -> int:
    """Every recorded step of rank 0 equals the direct computation; returns the steps with a B_simple."""
    exp = expected_series(res, last_fed, every, skip)[::every]
    assert [s["step"] for s in res["steps"]] == list(range(0, len(res["expected"]), every))
    settled = 0
    for rec, want in zip(res["steps"], exp):
        assert rec["names"] == res["names"]
        for k in ("noise_scale", "noise_g2", "noise_trace"):
            assert _close(rec[k], want[k]), (rec["step"], k, rec[k], want[k])
        for j, (got, w) in enumerate(zip(rec["layer_noise"], want["layer_noise"])):
            assert _close(got, w), (rec["step"], res["names"][j], got, w)
        settled += rec["noise_scale"] is not None
    return settled


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_noise_scale_matches_direct_computation(tmp_path: Path, world: int, run_ranks: Any) -> None:
    results = run_workers(run_ranks, tmp_path, world, "plain", steps=16)
    r0 = results[0]
    assert all(r["params_match"] for r in results)  # training is exactly what it would be without gradwatch
    assert all(not r["warned"] for r in results)
    settled = check_against_direct(r0)
    assert settled >= 3  # steps 10.. carry B_simple (the signal is strong enough: EMA(|G|²) > 0)
    assert all(any(x is not None for x in s["layer_noise"]) for s in r0["steps"][-2:])


@pytest.mark.slow
def test_ddp_with_every_3_feeds_recorded_steps_only(tmp_path: Path, run_ranks: Any) -> None:
    """``every=3``: the hook measures only the steps that are recorded (the ranks agree on which
    from their step counters); the EMAs are fed at steps 3, 6, ... only."""
    results = run_workers(run_ranks, tmp_path, 2, "every3", steps=40)
    assert all(r["params_match"] for r in results)
    assert check_against_direct(results[0], every=3) >= 2


@pytest.mark.slow
def test_a_rank_that_closes_early_stops_the_feed_not_the_training(tmp_path: Path, run_ranks: Any) -> None:
    """Rank 1 closes its watcher after step 5 while both ranks train on: the collectives stay
    matched (training completes and equals the reference), and rank 0's EMAs stop being fed
    (rank 1 no longer measures, so no sum over ranks is valid) instead of taking wrong values."""
    results = run_workers(run_ranks, tmp_path, 2, "closeearly", steps=16)
    assert all(r["params_match"] for r in results)
    check_against_direct(results[0], last_fed=5)
    steps = results[0]["steps"]
    assert steps[-1]["noise_g2"] == steps[5]["noise_g2"] is not None


@pytest.mark.slow
def test_user_comm_hook_is_kept_warns_once_and_records_nothing(tmp_path: Path, run_ranks: Any) -> None:
    results = run_workers(run_ranks, tmp_path, 2, "userhook", steps=4)
    for r in results:
        assert r["params_match"]  # training unaffected
        assert r["user_calls"] >= 4  # their hook ran on every backward, ours never replaced it
        assert len(r["warned"]) == 1
    assert all(s["noise_scale"] is None and s["noise_g2"] is None and set(s["layer_noise"]) == {None}
               for s in results[0]["steps"])
    assert len(results[0]["steps"]) == 4  # the other statistics are still recorded


# -- end to end: real DDP ranks -> a real server on PostgreSQL -> REST -----------------------------


@pytest.mark.slow
def test_ddp_noise_scale_end_to_end_over_rest(tmp_path: Path, gw: Any, pg_database: str, run_ranks: Any) -> None:
    """70 steps (more than one 64-step rollup block) into ``gradwatch serve``: a live subscriber,
    /steps, /stats (raw points and a bucket read through the rollup) and the CSV and Parquet
    exports all carry the values the direct computation predicts."""
    import csv
    import io
    import urllib.request
    import uuid

    from websockets.sync.client import connect

    base = gw.serve(pg_database)
    rid = f"noise-e2e-{uuid.uuid4().hex[:8]}"
    with connect(base.replace("http", "ws") + f"/api/v1/runs/{rid}/live?layers=noise_scale") as live:
        assert json.loads(live.recv(timeout=30))["type"] == "subscribed"
        results = run_workers(run_ranks, tmp_path, 2, "server", steps=70, url=base, GRADWATCH_RUN_ID=rid)
        live_steps: dict[int, dict[str, Any]] = {}
        while len(live_steps) < 70:
            msg = json.loads(live.recv(timeout=60))
            live_steps.update({st["step"]: st for st in msg.get("steps", ())})
    r0 = results[0]
    assert all(r["params_match"] for r in results) and r0["run_id"] == rid
    exp = expected_series(r0)
    for step, want in enumerate(exp):  # the live stream (in-process path: from the decoded batch)
        st = live_steps[step]
        for k in ("noise_scale", "noise_g2", "noise_trace"):
            assert _close(st[k], want[k]), ("live", step, k, st[k], want[k])
        assert all(_close(g, w) for g, w in zip(st["layers"]["noise_scale"], want["layer_noise"])), ("live", step)
    api = f"{base}/api/v1/runs/{rid}"
    pts = gw.wait_for(lambda: (p := gw.get_json(f"{api}/steps?fields=noise_scale,noise_g2,noise_trace")["points"])
                      and len(p) == 70 and p, "70 step rows")
    assert [p["step"] for p in pts] == list(range(70)) and {p["rank"] for p in pts} == {0}
    for p, want in zip(pts, exp):
        for k in ("noise_scale", "noise_g2", "noise_trace"):
            assert _close(p[k], want[k]), (p["step"], k, p[k], want[k])
    assert sum(p["noise_scale"] is not None for p in pts) >= 50

    names = r0["names"]
    for j, name in enumerate(names):
        got = gw.get_json(f"{api}/stats?stat=noise_scale&layer={name}")["series"][0]
        assert got["name"] == name and not got["downsampled"]
        for pt, want in zip(got["points"], exp):
            assert _close(pt["value"], want["layer_noise"][j]), (name, pt["step"], pt["value"])
        # one bucket over all 70 steps: whole 64-step block from the rollup plus the rows after it
        b = gw.get_json(f"{api}/stats?stat=noise_scale&layer={name}&max_points=1")["series"][0]
        assert b["downsampled"]
        vals = [e["layer_noise"][j] for e in exp if e["layer_noise"][j] is not None]
        (bk,) = b["buckets"]
        assert bk["max"] == pytest.approx(max(vals), rel=2e-3) and bk["min"] == pytest.approx(min(vals), rel=2e-3)
        assert bk["mean"] == pytest.approx(sum(vals) / len(vals), rel=2e-3)  # the rollup's sum and count

    with urllib.request.urlopen(f"{api}/export?table=steps&format=csv", timeout=30) as r:
        rows = list(csv.DictReader(io.StringIO(r.read().decode())))
    assert len(rows) == 70
    for row, want in zip(rows, exp):
        got = float(row["noise_scale"]) if row["noise_scale"] else None
        assert _close(got, want["noise_scale"]), (row["step"], row["noise_scale"])
        assert row["skipped"] == "False"
    import pyarrow.parquet as pq

    with urllib.request.urlopen(f"{api}/export?table=steps&format=parquet", timeout=30) as r:
        tab = pq.read_table(io.BytesIO(r.read())).to_pydict()
    assert tab["skipped"] == [False] * 70
    for k in ("noise_scale", "noise_g2", "noise_trace"):
        assert all(_close(g, w[k]) for g, w in zip(tab[k], exp)), k
