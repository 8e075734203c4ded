"""AGC, ZClip and AutoClip: reference formulas, the published packages on clean inputs, and
their failure on NaN/inf next to ours working (docs/transforms.md)."""

from __future__ import annotations

import itertools
import math
import random

import autoclip.torch as autoclip_torch
import numpy as np
import pytest
import torch
import zclip as zclip_pkg

from gradwatch.agent import AGC, AutoClip, ZClip
from gradwatch.agent.transforms.base import GradContext, Slot

SHAPES = [(5,), (1,), (1, 1), (0, 3), (3, 4), (1, 6), (6, 1), (2, 3, 3, 3), (2, 2, 2, 2, 2), (4,)]


def _tensors(t):
    """A transform's running state without its saved settings (``config``)."""
    return {k: v for k, v in t.state_dict().items() if k != "config"}


def make_params(shapes, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * float(torch.rand((), generator=gen) * 2)).to(dtype))
        p.grad = (torch.randn(s, generator=gen) * scale * float(torch.rand((), generator=gen) * 0.1)).to(dtype)
        ps.append(p)
    return ps


def set_grads(ps, grads):
    for p, g in zip(ps, grads):
        p.grad = g.clone()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(4, 3))
        self.b = torch.nn.Parameter(torch.zeros(3))
        self.c = torch.nn.Parameter(torch.zeros(2, 2, 3))


def grads_with_norms(norms, seed):
    """Per step, random grads for Net rescaled to the given total norm."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in norms:
        gs = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen), torch.randn(2, 2, 3, generator=gen)]
        tot = math.sqrt(sum(float(g.square().sum()) for g in gs))
        out.append([g * (x / tot) for g in gs])
    return out


def spiky_norms(rng, n, base=1.0):
    xs = []
    for _ in range(n):
        x = base * math.exp(rng.gauss(0, 0.2))
        if rng.random() < 0.15:
            x *= rng.uniform(3, 20)
        xs.append(x)
    return xs


# ---------------------------------------------------------------------------------- AGC


def test_agc_spec_vectors():
    W = torch.nn.Parameter(torch.tensor([[3.0, 4], [0, 1]]))
    W.grad = torch.tensor([[0.3, 0.4], [0.1, 0]])
    r = AGC()([W])
    torch.testing.assert_close(W.grad, torch.tensor([[0.03, 0.04], [0.01, 0]]))
    assert r["clipped_units"].tolist() == [2.0]
    W.grad = torch.tensor([[0.01, 0], [0.001, 0]])
    r = AGC()([W])
    assert torch.equal(W.grad, torch.tensor([[0.01, 0], [0.001, 0]]))
    assert r["clipped_units"].tolist() == [0.0] and r["layers"].tolist() == [0.0]
    Z = torch.nn.Parameter(torch.zeros(2, 2))
    Z.grad = torch.tensor([[1.0, 0], [0, 0]])
    AGC()([Z])
    torch.testing.assert_close(Z.grad, torch.tensor([[1e-5, 0], [0, 0]]))
    b = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b.grad = torch.tensor([1.0, 0.0])
    AGC()([b])
    torch.testing.assert_close(b.grad, torch.tensor([0.05, 0.0]))
    assert AGC.slot == Slot.UNITWISE


def ref_agc(p, g, lam, eps):
    g, w = g.double(), p.detach().double()
    if g.numel() == 0:
        return g
    if g.ndim <= 1:
        gn, wn = g.norm(), w.norm()
    else:
        dims = tuple(range(1, g.ndim))
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    mx = lam * wn.clamp_min(eps)
    return torch.where(gn < mx, g, g * (mx / gn.clamp_min(1e-6)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_agc_random_reference(dtype):
    rng = random.Random(5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for case in range(150):
        lam = rng.choice([0.01, 0.05, 0.3])
        eps = rng.choice([1e-3, 1e-1])
        ps = make_params([rng.choice(SHAPES) for _ in range(rng.randint(1, 5))], dtype, case,
                         scale=rng.choice([0.01, 1.0, 30.0]))
        raw = [p.grad.clone() for p in ps]
        AGC(lam, eps)(ps)
        for p, g in zip(ps, raw):
            want = ref_agc(p, g, lam, eps)
            torch.testing.assert_close(p.grad.double(), want, rtol=4 * tol, atol=1e-7)


def test_agc_exclude_by_name_pattern_tensor_and_module():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    AGC(exclude=["2.*"])(model.named_parameters())
    assert torch.equal(model[2].weight.grad, torch.full((2, 4), 10.0))
    assert model[0].weight.grad.abs().max() < 1.0
    for excl in ([model[2]], [model[2].weight, model[2].bias], model[2]):
        for p in model.parameters():
            p.grad = torch.full_like(p, 10.0)
        AGC(exclude=excl)(model.parameters())
        assert torch.equal(model[2].weight.grad, torch.full((2, 4), 10.0))
        assert torch.equal(model[2].bias.grad, torch.full((2,), 10.0))
        assert model[0].bias.grad.abs().max() < 1.0
    with pytest.raises(TypeError):
        AGC(exclude=[3])
    with pytest.raises(ValueError):
        AGC(clipping=0.0)


def test_agc_nonfinite_units_left_alone():
    W = torch.nn.Parameter(torch.ones(3, 2))
    W.grad = torch.tensor([[float("inf"), 1.0], [float("nan"), 0.0], [5.0, 5.0]])
    AGC()([W])
    assert W.grad[0, 0].item() == float("inf") and W.grad[0, 1].item() == 1.0
    assert W.grad[1, 0].isnan() and W.grad[1, 1].item() == 0.0
    assert not W.grad[2].isnan().any() and W.grad[2].norm().item() == pytest.approx(0.01 * math.sqrt(2), rel=1e-5)
    W2 = torch.nn.Parameter(torch.tensor([[float("inf"), 1.0]]))
    W2.grad = torch.tensor([[3.0, 4.0]])
    AGC()([W2])
    assert torch.equal(W2.grad, torch.tensor([[3.0, 4.0]]))


def test_agc_keeps_norm_cache_valid():
    rng = random.Random(9)
    for case in range(30):
        ps = make_params([rng.choice(SHAPES) for _ in range(4)] + [(3, 4)], seed=case, scale=10.0)
        ctx = GradContext(ps)
        _ = ctx.norms
        AGC(0.05).apply_(ctx)
        fresh = torch.stack([p.grad.norm() for p in ctx.params])
        torch.testing.assert_close(ctx.norms, fresh, rtol=1e-5, atol=1e-7)


# AGC against straightforward references: the vectorized implementation must agree with a per-tensor
# one (bit for bit on CPU: same reductions, same rounding of the coefficient to the grad's dtype)
# and with a per-unit Python loop (within fp32 rounding), on mixed layouts, dtypes and NaN/inf.

MIXED_SHAPES = [(), (1,), (7,), (3, 5), (1, 9), (6, 1), (4, 3, 3, 3), (2, 1, 2, 3, 2), (0,), (0, 4), (3, 0),
                (5, 2, 0, 1), (16, 8), (2, 3)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def agc_ref_per_tensor(ctx, lam, eps, excluded):
    """The per-tensor formulation (one tensor at a time, units along dims 1..ndim-1), returning
    (clipped, min_coef, new_norm or None) per layer, grads edited in place."""
    out = []
    for p, g in zip(ctx.params, ctx.grads):
        if id(p) in excluded or g.numel() == 0:
            out.append((0.0, 1.0, None))
            continue
        dims = tuple(range(1, g.ndim)) if g.ndim >= 2 else None
        gn = torch.linalg.vector_norm(g, 2, dim=dims, keepdim=g.ndim >= 2, dtype=torch.float32)
        wn = torch.linalg.vector_norm(p.detach(), 2, dim=dims, keepdim=p.ndim >= 2, dtype=torch.float32)
        mx = lam * wn.clamp_min(eps)
        keep = (gn < mx) | ~torch.isfinite(gn) | ~torch.isfinite(mx)
        coef = torch.where(keep, torch.ones_like(gn), mx / gn.clamp_min(1e-6))
        g.mul_(coef.to(g.dtype))
        out.append((float((~keep).sum()), float(coef.min()), float(torch.linalg.vector_norm((gn * coef).double()))))
    return out


def agc_ref_per_unit(p, g, lam, eps):
    """One output unit at a time, in float64 (the definition, docs/transforms.md, AGC)."""
    g, w = g.double().clone(), p.detach().double()
    if g.numel() == 0:
        return g, 0
    units = [(None, g, w)] if g.ndim <= 1 else [(i, g[i], w[i]) for i in range(g.shape[0])]
    clipped = 0
    for i, gu, wu in units:
        gn, mx = float(gu.norm()), lam * max(float(wu.norm()), eps)
        if gn < mx or not math.isfinite(gn) or not math.isfinite(mx):
            continue
        clipped += 1
        c = mx / max(gn, 1e-6)
        if i is None:
            g.mul_(c)
        else:
            g[i].mul_(c)
    return g, clipped


def random_agc_case(rng, case, dtypes=DTYPES):
    """Parameters with mixed shapes and dtypes, some grads None, NaN/inf in some grad and weight
    units, scales spread so that some units clip and others do not."""
    gen = torch.Generator().manual_seed(case)
    ps = []
    for _ in range(rng.randint(1, 9)):
        shape = rng.choice(MIXED_SHAPES)
        dt = rng.choice(dtypes)
        w = torch.randn(shape, generator=gen) * rng.choice([0.0, 1e-3, 0.3, 1.0, 5.0])
        g = torch.randn(shape, generator=gen) * rng.choice([1e-4, 1e-2, 0.1, 3.0])
        if w.ndim >= 2 and w.shape[0] > 1 and rng.random() < 0.3:
            w[rng.randrange(w.shape[0])] = 0.0  # a dead unit: the eps floor decides
        for t, bads in ((g, [float("nan"), float("inf"), -float("inf")]), (w, [float("inf"), float("nan")])):
            if t.numel() and rng.random() < 0.3:
                t.view(-1)[rng.randrange(t.numel())] = rng.choice(bads)
        p = torch.nn.Parameter(w.to(dt))
        p.grad = None if rng.random() < 0.12 else g.to(dt)
        ps.append(p)
    return ps


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,), DTYPES])
def test_agc_vectorized_matches_per_tensor_reference_bitwise(dtypes):
    rng = random.Random(hash(dtypes) % 1000)
    for case in range(120):
        ps = random_agc_case(rng, case, dtypes)
        lam, eps = rng.choice([0.01, 0.05, 0.3]), rng.choice([1e-3, 1e-1, 0.0])
        excluded = {id(p) for p in ps if rng.random() < 0.15}
        twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        for p, t in zip(ps, twins):
            t.grad = None if p.grad is None else p.grad.clone()
        ctx = GradContext(ps)
        if not len(ctx):
            continue
        _ = ctx.norms
        AGC(lam, eps, exclude=[p for p in ps if id(p) in excluded]).apply_(ctx)
        rctx = GradContext(twins)
        want = agc_ref_per_tensor(rctx, lam, eps, {id(t) for p, t in zip(ps, twins) if id(p) in excluded})
        for a, b in zip(ctx.grads, rctx.grads):
            assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), case
        rep = ctx.reports["agc"]
        assert rep["clipped_units"].tolist() == [w[0] for w in want]
        assert rep["min_coef"].tolist() == [pytest.approx(w[1], rel=0, abs=0) for w in want]
        assert rep["layers"].tolist() == [float(w[0] > 0) for w in want]
        assert rep["clipped_units"].dtype == rep["min_coef"].dtype == torch.float32
        old_norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in rctx.grads])
        for i, w in enumerate(want):
            got = float(ctx.norms[i])
            if w[2] is None:  # untouched layer: the cache entry is the one handed in
                continue
            if math.isfinite(w[2]):
                assert got == pytest.approx(w[2], rel=1e-6)
            else:
                assert not math.isfinite(got) and (math.isnan(got) == math.isnan(w[2]))
        # and the cache says what a fresh measurement of the clipped grads says
        # (within the rounding of the clipped grads to their dtype)
        rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
        for got, fresh, g in zip(ctx.norms.tolist(), old_norms.tolist(), rctx.grads):
            if math.isfinite(fresh):
                assert got == pytest.approx(fresh, rel=rtol[g.dtype], abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_agc_vectorized_matches_per_unit_loop(dtype):
    rng = random.Random(11)
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for case in range(100):
        ps = random_agc_case(rng, 1000 + case, (dtype,))
        lam, eps = rng.choice([0.01, 0.05, 0.3]), rng.choice([1e-3, 1e-1])
        raw = [None if p.grad is None else p.grad.clone() for p in ps]
        ctx = GradContext(ps)
        if not len(ctx):
            continue
        AGC(lam, eps).apply_(ctx)
        clipped = dict(zip(map(id, ctx.params), ctx.reports["agc"]["clipped_units"].tolist()))
        for p, g in zip(ps, raw):
            if g is None:
                assert p.grad is None
                continue
            want, n = agc_ref_per_unit(p, g, lam, eps)
            got = p.grad.double()
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
            fin = torch.isfinite(want)
            tiny = torch.finfo(dtype).smallest_normal  # fp16 subnormals carry few bits
            torch.testing.assert_close(got[fin], want[fin], rtol=4 * tol, atol=tiny)
            # a unit exactly at the threshold could go either way in fp32; random data never is
            assert clipped[id(p)] == n


def test_agc_nonfinite_units_and_weights_untouched_with_coef_one():
    W = torch.nn.Parameter(torch.tensor([[1.0, 1.0], [float("inf"), 1.0], [1.0, float("nan")], [1.0, 1.0]]))
    W.grad = torch.tensor([[float("inf"), 9.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])
    b = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b.grad = torch.tensor([float("nan"), 1.0])
    ctx = GradContext([W, b])
    _ = ctx.norms
    AGC().apply_(ctx)
    assert W.grad[0, 0].item() == float("inf") and W.grad[0, 1].item() == 9.0  # non-finite grad unit
    assert torch.equal(W.grad[1:3], torch.full((2, 2), 5.0))  # non-finite weight units
    torch.testing.assert_close(W.grad[3].norm(), torch.tensor(0.01 * math.sqrt(2)))
    assert b.grad[0].isnan() and b.grad[1].item() == 1.0
    rep = ctx.reports["agc"]
    assert rep["clipped_units"].tolist() == [1.0, 0.0] and rep["layers"].tolist() == [1.0, 0.0]
    assert rep["min_coef"][0].item() < 1.0 and rep["min_coef"][1].item() == 1.0


def test_agc_excluded_empty_and_all_excluded_layers():
    a = torch.nn.Parameter(torch.ones(3, 2))
    e = torch.nn.Parameter(torch.ones(0, 4))
    s = torch.nn.Parameter(torch.tensor(2.0))
    for p in (a, e, s):
        p.grad = torch.full_like(p, 10.0)
    ctx = GradContext([a, e, s])
    _ = ctx.norms
    before = ctx.norms.clone()
    AGC(exclude=[a]).apply_(ctx)
    assert torch.equal(a.grad, torch.full((3, 2), 10.0)) and s.grad.item() == pytest.approx(0.02)
    rep = ctx.reports["agc"]
    assert rep["clipped_units"].tolist() == [0.0, 0.0, 1.0]
    assert ctx.norms[:2].tolist() == before[:2].tolist() and ctx.norms[2].item() == pytest.approx(0.02)
    ctx = GradContext([a, e])
    AGC(exclude=[a]).apply_(ctx)
    assert ctx.reports["agc"]["clipped_units"].tolist() == [0.0, 0.0]
    assert ctx.reports["agc"]["min_coef"].tolist() == [1.0, 1.0]


def test_agc_plan_follows_layout_changes_and_new_excludes():
    rng = random.Random(3)
    agc = AGC(0.05)
    layouts = [random_agc_case(rng, 500 + k, (torch.float32,)) for k in range(3)]
    for step in range(9):
        ps = layouts[step % 3]
        for p in ps:
            if p.grad is not None:
                p.grad.normal_()
        raw = [None if p.grad is None else p.grad.clone() for p in ps]
        if step == 6:
            agc.add_exclude(ps[0])
        ctx = GradContext(ps)
        if not len(ctx):
            continue
        agc.apply_(ctx)
        for p, g in zip(ps, raw):
            if g is None:
                continue
            if step >= 6 and p is ps[0]:
                assert torch.equal(p.grad, g)
            else:
                want, _ = agc_ref_per_unit(p, g, 0.05, 1e-3)
                fin = torch.isfinite(want)
                torch.testing.assert_close(p.grad.double()[fin], want[fin], rtol=1e-5, atol=1e-30)
    assert len(agc._plans) <= 8


def test_agc_no_host_sync_on_the_training_path():
    """No Tensor method that reads a value on the host is called (a sync on an accelerator)."""
    rng = random.Random(4)
    ps = random_agc_case(rng, 77)
    ps.append(torch.nn.Parameter(torch.randn(8, 4)))
    ps[-1].grad = torch.randn(8, 4)
    agc = AGC()
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
    saved = {m: getattr(torch.Tensor, m) for m in names}
    calls = []

    def spy(m):
        def f(self, *a, **k):
            calls.append(m)
            return saved[m](self, *a, **k)
        return f

    try:
        for m in names:
            setattr(torch.Tensor, m, spy(m))
        for _ in range(2):  # the first step builds the plan, the second reuses it
            ctx = GradContext(ps)
            _ = ctx.norms
            agc.apply_(ctx)
    finally:
        for m, f in saved.items():
            setattr(torch.Tensor, m, f)
    assert calls == []


# ---------------------------------------------------------------------------------- ZClip


def test_zclip_spec_vectors():
    p = torch.nn.Parameter(torch.zeros(1))

    def run(zc, vals):
        out = []
        for v in vals:
            p.grad = torch.tensor([float(v)])
            r = zc([p])
            out.append((p.grad.item(), r))
        return out

    zc = ZClip(warmup_steps=3, max_grad_norm=None)
    res = run(zc, [1, 2, 3])
    assert [g for g, _ in res] == [1.0, 2.0, 3.0]
    sd = zc.state_dict()
    assert sd["mean"].item() == pytest.approx(2.0) and sd["var"].item() == pytest.approx(0.6666667, rel=1e-6)
    (g, r), = run(zc, [10])
    assert g == pytest.approx(2.520833, rel=1e-6) and r["z"].item() == pytest.approx(9.7980, rel=1e-4)
    assert r["spike"].item() == 1.0 and r["coef"].item() < 1
    assert zc.state_dict()["mean"].item() == pytest.approx(2.0156250, rel=1e-7)
    assert zc.state_dict()["var"].item() == pytest.approx(0.6543237, rel=1e-6)
    (g, r), = run(zc, [2])
    assert g == 2.0 and zc.state_dict()["mean"].item() == pytest.approx(2.0151563, rel=1e-7)
    assert zc.state_dict()["var"].item() == pytest.approx(0.6347009, rel=1e-6)
    assert [k for k, _ in zc.events({"coef": 0.5, "norm": 10.0, "threshold": 5.0, "spike": 1.0, "z": 9.0})] == [
        "clip", "spike"]
    assert zc.events({"coef": 1.0, "spike": 0.0}) == []

    res = run(ZClip(warmup_steps=3, max_grad_norm=None, clip_option="mean"), [1, 2, 3, 10])
    assert res[-1][0] == pytest.approx(1.9999998, rel=1e-7)
    res = run(ZClip(warmup_steps=3, max_grad_norm=None, mode="percentile"), [1, 2, 3, 10])
    assert res[-1][0] == pytest.approx(4.0412412, rel=1e-6)
    assert res[-1][1]["threshold"].item() == pytest.approx(4.0412415, rel=1e-6)
    res = run(ZClip(warmup_steps=3), [1, 2, 3, 10])
    assert all(g == pytest.approx(0.999999, rel=1e-6) for g, _ in res)


def test_zclip_rejects_bad_args():
    with pytest.raises(ValueError, match="mode"):
        ZClip(mode="ema")
    with pytest.raises(ValueError, match="clip_option"):
        ZClip(clip_option="median")
    with pytest.raises(ValueError, match="max_grad_norm"):
        ZClip(max_grad_norm=0.0)


CONFIGS = [
    dict(mode=m, clip_option=o, max_grad_norm=mg, warmup_steps=w, skip_update_on_spike=s, clip_factor=cf)
    for (m, o), mg, w, s, cf in itertools.product(
        [("zscore", "adaptive_scaling"), ("zscore", "mean"), ("percentile", "adaptive_scaling")],
        [None, 1.0, 3.0], [0, 3, 12], [False, True], [1.0, 0.7])
]


def test_zclip_matches_package_step_by_step():
    """All modes, caps, warm-ups, skip_update_on_spike and clip factors, on spiky norm sequences."""
    rng = random.Random(0)
    for k, cfg in enumerate(CONFIGS):
        norms = spiky_norms(rng, 40, base=rng.choice([0.5, 2.0]))
        seq = grads_with_norms(norms, seed=k)
        theirs, ours = Net(), Net()
        zp, zo = zclip_pkg.ZClip(**cfg), ZClip(**cfg)
        for step, grads in enumerate(seq):
            set_grads(list(theirs.parameters()), grads)
            set_grads(list(ours.parameters()), grads)
            was_warmup = not zp.initialized
            zp.step(theirs)
            r = zo(ours.parameters())
            for a, b in zip(theirs.parameters(), ours.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=2e-6, atol=1e-9, msg=f"{cfg} step {step}")
            assert bool(r["warmup"].item()) == was_warmup
            if zp.initialized:
                sd = zo.state_dict()
                assert sd["mean"].item() == pytest.approx(zp.mean, rel=1e-6), (cfg, step)
                assert sd["var"].item() == pytest.approx(zp.var, rel=1e-5, abs=1e-12), (cfg, step)


def _zclip_run(zc, seq, params):
    outs = []
    for grads in seq:
        set_grads(params, grads)
        r = zc(params) if isinstance(zc, ZClip) else zc.step(params)
        outs.append(([p.grad.clone() for p in params], r))
    return outs


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_zclip_package_breaks_on_nonfinite_ours_keeps_working(kind):
    cfg = dict(warmup_steps=5, max_grad_norm=None)
    rng = random.Random(1)
    norms = [math.exp(rng.gauss(0, 0.1)) for _ in range(12)] + [10.0] + [1.0] * 3 + [12.0]
    seq = grads_with_norms(norms, seed=2)
    bad_at = 8
    bad = [g.clone() for g in seq[bad_at]]
    bad[0][1, 2] = float(kind)

    # the package: EMA poisoned forever, later spikes pass unclipped; inf is turned into NaN
    net = Net()
    zp = zclip_pkg.ZClip(**cfg)
    for i, grads in enumerate(seq):
        set_grads(list(net.parameters()), bad if i == bad_at else grads)
        zp.step(net)
        if i == bad_at:
            new_nans = net.a.grad.isnan().sum().item() - bad[0].isnan().sum().item()
    total = math.sqrt(sum(float(p.grad.square().sum()) for p in net.parameters()))
    if kind == "nan":
        assert math.isnan(zp.mean) and math.isnan(zp.var)
        assert total == pytest.approx(12.0, rel=1e-5)  # the last spike went through unclipped
    else:  # z = inf: coefficient mean/inf = 0, and inf * 0 = NaN
        assert new_nans == 1

    # ours: the bad step changes nothing, later steps equal a twin that never saw it
    a, b = ZClip(**cfg), ZClip(**cfg)
    na, nb = Net(), Net()
    for i, grads in enumerate(seq):
        if i == bad_at:
            set_grads(list(na.parameters()), bad)
            r = a(na.parameters())
            assert r["skipped_update"].item() == 1.0 and r["coef"].item() == 1.0
            assert torch.equal(na.a.grad.isnan(), bad[0].isnan())  # nothing new became NaN
            for k, v in _tensors(a).items():
                assert torch.equal(v, _tensors(b)[k]), k
            continue
        set_grads(list(na.parameters()), grads)
        set_grads(list(nb.parameters()), grads)
        ra, rb = a(na.parameters()), b(nb.parameters())
        for p, q in zip(na.parameters(), nb.parameters()):
            assert torch.equal(p.grad, q.grad)
        assert torch.equal(ra["coef"], rb["coef"])
    assert rb["coef"].item() < 0.5  # the final spike is clipped
    assert all(torch.isfinite(v).all() for k, v in _tensors(a).items() if k != "buffer")

    if kind == "inf":  # the package turns inf into NaN with its default fixed cap; ours never does
        zp2 = zclip_pkg.ZClip(warmup_steps=1)  # default max_grad_norm=1.0 -> coefficient 0 on inf
        net = Net()
        g0 = grads_with_norms([1.0], 3)[0]
        set_grads(list(net.parameters()), g0)
        zp2.step(net)
        set_grads(list(net.parameters()), bad)
        zp2.step(net)
        assert net.a.grad.isnan().sum() > bad[0].isnan().sum()
        z = ZClip(warmup_steps=1)
        set_grads(list(net.parameters()), g0)
        z(net.parameters())
        set_grads(list(net.parameters()), bad)
        z(net.parameters())
        assert net.a.grad.isnan().sum() == 0 and net.a.grad.isinf().sum() == 1


def test_zclip_found_inf_from_scaler_skips_update():
    """With a loss scaler's found_inf the step is guarded even if these grads look finite."""
    ps = make_params([(3, 4), (4,)], seed=1)
    zc = ZClip(warmup_steps=1, max_grad_norm=None)
    zc(ps)
    before = zc.state_dict()
    raw = [p.grad.clone() for p in ps]
    ctx = GradContext(ps, found_inf=torch.tensor(1.0))
    zc.apply_(ctx)
    r = ctx.reports["zclip"]
    assert r["skipped_update"].item() == 1.0 and r["coef"].item() == 1.0
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, raw))
    for k, v in _tensors(zc).items():
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------------------------- AutoClip


def test_autoclip_spec_vector():
    p = torch.nn.Parameter(torch.zeros(1))
    ac = AutoClip(10.0)
    for v in [1, 2, 3, 4, 10]:
        p.grad = torch.tensor([float(v)])
        r = ac([p])
    assert r["threshold"].item() == pytest.approx(1.4)
    assert p.grad.item() == pytest.approx(1.4, rel=1e-6)
    assert r["history_len"].item() == 5.0
    assert [k for k, _ in ac.events({k: v for k, v in r.items()})] == ["clip"]
    ac = AutoClip(50.0)
    for _ in range(4):
        p.grad = torch.tensor([3.0])
        r = ac([p])
        assert p.grad.item() == pytest.approx(3.0, rel=1e-6)  # constant norms: no effective clip


@pytest.mark.parametrize("include_current", [True, False])
def test_autoclip_threshold_equals_numpy_percentile(include_current):
    """Random histories, ring wrap-around included: thr == numpy.percentile of the valid part."""
    rng = random.Random(4)
    for case in range(40):
        hist_len = rng.choice([1, 2, 5, 17])
        pct = rng.choice([0.0, 10.0, 37.5, 50.0, 90.0, 100.0])
        ac = AutoClip(pct, history=hist_len, include_current=include_current)
        ps = make_params([(3, 4), (5,)], seed=case)
        seen: list[float] = []
        for step in range(rng.randint(1, 30)):
            scale = math.exp(rng.gauss(0, 1))
            for p in ps:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(case * 100 + step)) * scale
            x = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps])))
            r = ac(ps)
            assert r["norm"].item() == pytest.approx(x, rel=1e-6)
            x = float(r["norm"].double())
            window = (seen + [x])[-hist_len:] if include_current else seen[-hist_len:]
            want = float(np.percentile(np.array(window), pct)) if window else math.inf
            assert r["threshold"].double().item() == pytest.approx(want, rel=1e-6), (case, step)
            post = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps])))
            assert post == pytest.approx(x * min(1.0, want / (x + 1e-6)), rel=2e-6)  # clip_grad_norm_ rule
            seen.append(x)


@pytest.mark.parametrize("per_parameter", [False, True])
@pytest.mark.parametrize("include_current", [True, False])
def test_autoclip_sorted_history_gives_nanquantile_bit_for_bit(per_parameter, include_current):
    """The threshold comes from a sorted copy of the ring kept in step by insert/remove instead of
    a sort per step: it must equal ``torch.nanquantile`` of the ring exactly, through wrap-around,
    repeated norms (ties), non-finite steps that must not enter, and a state_dict round trip."""
    rng = random.Random(31 + 2 * per_parameter + include_current)
    for case in range(25):
        hist_len = rng.choice([1, 2, 3, 5, 8, 13])
        pct = rng.choice([0.0, 10.0, 33.3, 50.0, 90.0, 99.9, 100.0])
        ac = AutoClip(pct, history=hist_len, include_current=include_current, per_parameter=per_parameter)
        net = Net()
        ps = list(net.parameters())
        pool = [float(v) for v in np.round(np.exp(np.random.default_rng(case).normal(size=6)), 2)]
        for step in range(rng.randint(hist_len, 3 * hist_len + 5)):
            before = ac.state_dict()["history"].clone()
            gs = grads_with_norms([rng.choice(pool)], seed=case * 1000 + step)[0]  # ties on purpose
            if rng.random() < 0.15:
                gs[rng.randrange(3)].view(-1)[0] = rng.choice([float("nan"), float("inf")])
            set_grads(ps, gs)
            r = ac(ps)
            hist = ac.state_dict()["history"]
            ref = hist if include_current else before
            if ref.numel() == 0:  # per-parameter histories are allocated at the first step
                ref = torch.full_like(hist, float("nan"))
            want = torch.nanquantile(ref, pct / 100.0, dim=-1)
            want = torch.where(torch.isnan(want), torch.full_like(want, float("inf")), want)
            got = r["layer_threshold"].double() if per_parameter else r["threshold"].double()
            want = want.float().double()
            assert torch.equal(got, want), (case, step)
            q64 = ac._quantile()  # float64, against nanquantile of the ring after this step
            assert torch.equal(q64.nan_to_num(nan=1e300, posinf=1e300), torch.nanquantile(
                hist.view(-1, hist_len), pct / 100.0, dim=1).nan_to_num(nan=1e300, posinf=1e300)), (case, step)
            s = ac._sorted_hist()
            full_sort = torch.where(torch.isnan(hist), torch.full_like(hist, float("inf")), hist)
            assert torch.equal(s, full_sort.view(-1, hist_len).sort(dim=1).values), (case, step)
            if step == hist_len:  # resume from a state_dict: the sorted copy is rebuilt
                twin = AutoClip(pct, history=hist_len, include_current=include_current, per_parameter=per_parameter)
                twin.load_state_dict(ac.state_dict())
                ac = twin


def test_autoclip_steady_state_has_no_sort():
    """Once the sorted copy exists, a step does not sort (a full 10 000-entry history would cost
    a 10 000-element sort per step)."""
    from torch.profiler import ProfilerActivity, profile

    ac = AutoClip()
    ps = make_params([(4, 3), (3,)])
    for _ in range(3):
        ac(ps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ac(ps)
    names = {e.name for e in prof.events()}
    assert not {n for n in names if "sort" in n and "searchsorted" not in n}
    assert not {n for n in names if "quantile" in n}


def test_autoclip_matches_package_global_quantile_clip():
    """include_current=False has the semantics of autoclip 0.2.1 QuantileClip(global_threshold=True)."""
    rng = random.Random(6)
    for case, (q, hl) in enumerate([(0.9, 1000), (0.5, 7), (0.1, 3), (0.75, 20)]):
        norms = spiky_norms(rng, 40)
        seq = grads_with_norms(norms, seed=case)
        theirs, ours = Net(), Net()
        qc = autoclip_torch.QuantileClip(theirs.parameters(), quantile=q, history_length=hl, global_threshold=True)
        ac = AutoClip(percentile=100 * q, history=hl, include_current=False)
        for step, grads in enumerate(seq):
            set_grads(list(theirs.parameters()), grads)
            set_grads(list(ours.parameters()), grads)
            qc.step()
            ac(ours.parameters())
            for a, b in zip(theirs.parameters(), ours.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=2e-6, atol=1e-9, msg=f"case {case} step {step}")


def test_autoclip_per_parameter_matches_package_default_quantile_clip():
    """per_parameter=True, include_current=False == autoclip 0.2.1 QuantileClip() (local thresholds)."""
    rng = random.Random(12)
    for case, (q, hl) in enumerate([(0.9, 1000), (0.5, 4), (0.2, 9)]):
        seq = grads_with_norms(spiky_norms(rng, 30), seed=40 + case)
        for grads in seq:  # give each tensor its own spikes
            for g in grads:
                g.mul_(rng.choice([1.0, 1.0, 1.0, 8.0]))
        theirs, ours = Net(), Net()
        qc = autoclip_torch.QuantileClip(theirs.parameters(), quantile=q, history_length=hl)
        ac = AutoClip(percentile=100 * q, history=hl, include_current=False, per_parameter=True)
        clipped = 0
        for step, grads in enumerate(seq):
            set_grads(list(theirs.parameters()), grads)
            set_grads(list(ours.parameters()), grads)
            qc.step()
            r = ac(ours.parameters())
            clipped += int((r["layer_coef"] < 1).sum())
            for a, b in zip(theirs.parameters(), ours.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=2e-6, atol=1e-9, msg=f"case {case} step {step}")
        assert clipped > 0


def test_autoclip_per_parameter_nan_package_vs_ours():
    seq = grads_with_norms([1.0 + 0.05 * i for i in range(12)], seed=5)
    bad = [g.clone() for g in seq[4]]
    bad[0][0, 0] = float("nan")
    net = Net()
    qc = autoclip_torch.QuantileClip(net.parameters(), quantile=0.5, history_length=100)
    for i, grads in enumerate(seq):
        set_grads(list(net.parameters()), bad if i == 4 else grads)
        qc.step()
    assert net.a.grad.isnan().all()  # the poisoned tensor's gradient stays NaN
    a, b = AutoClip(50.0, 100, include_current=False, per_parameter=True), \
        AutoClip(50.0, 100, include_current=False, per_parameter=True)
    na, nb = Net(), Net()
    for i, grads in enumerate(seq):
        if i == 4:
            set_grads(list(na.parameters()), bad)
            r = a(na.parameters())
            assert r["skipped_update"].item() == 1.0 and torch.equal(r["layer_coef"], torch.ones(3))
            continue
        set_grads(list(na.parameters()), grads)
        set_grads(list(nb.parameters()), grads)
        a(na.parameters()), b(nb.parameters())
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(na.parameters(), nb.parameters()))
    assert torch.isfinite(na.a.grad).all()
    with pytest.raises(ValueError, match="histories"):
        a(list(na.parameters())[:2])


def test_autoclip_package_breaks_on_nan_ours_keeps_working():
    norms = [1.0 + 0.1 * i for i in range(10)] + [1.0] * 10
    seq = grads_with_norms(norms, seed=3)
    bad_at = 5
    bad = [g.clone() for g in seq[bad_at]]
    bad[2][0, 1, 1] = float("nan")

    net = Net()
    qc = autoclip_torch.QuantileClip(net.parameters(), quantile=0.5, history_length=1000, global_threshold=True)
    poisoned = 0
    for i, grads in enumerate(seq):
        set_grads(list(net.parameters()), bad if i == bad_at else grads)
        qc.step()
        if i > bad_at:
            poisoned += int(net.a.grad.isnan().all())
    assert poisoned == len(seq) - bad_at - 1  # every later step's gradients multiplied by NaN

    for include_current in (True, False):
        a = AutoClip(50.0, history=1000, include_current=include_current)
        b = AutoClip(50.0, history=1000, include_current=include_current)
        na, nb = Net(), Net()
        for i, grads in enumerate(seq):
            if i == bad_at:
                set_grads(list(na.parameters()), bad)
                r = a(na.parameters())
                assert r["skipped_update"].item() == 1.0 and r["coef"].item() == 1.0
                assert torch.equal(na.c.grad.isnan(), bad[2].isnan())
                for k, v in _tensors(a).items():
                    assert torch.equal(v.nan_to_num(-1.0), _tensors(b)[k].nan_to_num(-1.0)), k
                continue
            set_grads(list(na.parameters()), grads)
            set_grads(list(nb.parameters()), grads)
            ra, rb = a(na.parameters()), b(nb.parameters())
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(na.parameters(), nb.parameters()))
            assert torch.equal(ra["threshold"], rb["threshold"])
            assert torch.isfinite(ra["threshold"]) or (i == 0 and not include_current)


def test_autoclip_inf_not_turned_into_nan():
    ps = make_params([(3, 4)], seed=0)
    ac = AutoClip(10.0)
    ac(ps)
    ps[0].grad[0, 0] = float("inf")
    r = ac(ps)
    assert r["coef"].item() == 1.0 and not ps[0].grad.isnan().any()
    assert r["history_len"].item() == 1.0


def test_autoclip_rejects_bad_args():
    with pytest.raises(ValueError):
        AutoClip(percentile=120)
    with pytest.raises(ValueError):
        AutoClip(history=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_clippers_low_precision(dtype):
    for make in (lambda: ZClip(warmup_steps=1, max_grad_norm=0.5), lambda: AutoClip(10.0)):
        ps = make_params([(8, 8), (8,)], dtype, seed=1, scale=50.0)
        t = make()
        t(ps)
        raw = [p.grad.clone() for p in ps]
        for p in ps:
            p.grad.mul_(3)
        raw = [p.grad.clone() for p in ps]
        r = t(ps)
        c = r["coef"].item()
        assert c < 1.0
        for p, g in zip(ps, raw):
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad.float(), (g.float() * c).to(dtype).float(), rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------- state


@pytest.mark.parametrize("make", [lambda: ZClip(warmup_steps=4, max_grad_norm=None),
                                  lambda: ZClip(warmup_steps=10, mode="percentile"),
                                  lambda: AutoClip(30.0, history=6),
                                  lambda: AutoClip(90.0, history=50, include_current=False),
                                  lambda: AutoClip(70.0, history=5, per_parameter=True)])
def test_state_dict_resume_exactly(make):
    rng = random.Random(8)
    seq = grads_with_norms(spiky_norms(rng, 30), seed=8)
    for cut in (2, 7, 15):
        a = make()
        na, nb = Net(), Net()
        for grads in seq[:cut]:
            set_grads(list(na.parameters()), grads)
            a(na.parameters())
        b = make()
        b.load_state_dict(a.state_dict())
        for grads in seq[cut:]:
            set_grads(list(na.parameters()), grads)
            set_grads(list(nb.parameters()), grads)
            ra, rb = a(na.parameters()), b(nb.parameters())
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(na.parameters(), nb.parameters()))
            for k in ra:
                assert torch.equal(ra[k].nan_to_num(), rb[k].nan_to_num()), k
    a.reset()
    assert a.state_dict().keys() == make().state_dict().keys()
    with pytest.raises(ValueError):
        (ZClip(warmup_steps=99) if isinstance(a, ZClip) else AutoClip(history=99)).load_state_dict(b.state_dict())


def test_autoclip_per_parameter_histories_belong_to_their_parameters():
    """Same number of grads, other tensors (one grad became None, another appeared): comparing a
    tensor against another's history would clip it silently; it raises instead."""
    ac = AutoClip(50.0, 10, per_parameter=True)
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad, c.grad = torch.ones(3), torch.ones(3) * 100, None
    ac([a, b, c])
    ac([a, b, c])  # the same set again is fine
    a.grad, c.grad = None, torch.ones(3)
    before = b.grad.clone()
    with pytest.raises(ValueError, match="parameters with gradients changed"):
        ac([a, b, c])
    assert torch.equal(b.grad, before)  # refused before touching anything
    # a count change is refused too; after reset() a new set starts fresh
    a.grad = torch.ones(3)
    with pytest.raises(ValueError, match="keeps 2 histories, this step has 3"):
        ac([a, b, c])
    ac.reset()
    r = ac([a, b, c])
    assert r["history_len"].item() == 1.0 and r["layer_threshold"].tolist() == pytest.approx([3 ** 0.5, 30000 ** 0.5, 3 ** 0.5])
    # after load_state_dict (a new process: other tensors) the rows bind to the next step's set
    twin = AutoClip(50.0, 10, per_parameter=True)
    twin.load_state_dict(ac.state_dict())
    x, y, z = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    x.grad, y.grad, z.grad = torch.ones(3), torch.ones(3), torch.ones(3)
    twin([x, y, z])


@pytest.mark.parametrize("make,other", [
    (lambda: ZClip(z_thresh=2.5), lambda: ZClip(z_thresh=3.0)),
    (lambda: ZClip(mode="percentile"), lambda: ZClip(mode="zscore")),
    (lambda: AutoClip(percentile=10.0), lambda: AutoClip(percentile=25.0)),
    (lambda: AutoClip(include_current=False), lambda: AutoClip(include_current=True)),
])
def test_state_saved_with_other_settings_is_refused(make, other):
    a = make()
    p = torch.nn.Parameter(torch.zeros(3))
    for v in (1.0, 2.0, 3.0):
        p.grad = torch.full((3,), v)
        a([p])
    b = other()
    with pytest.raises(ValueError, match="saved with other settings"):
        b.load_state_dict(a.state_dict())
    make().load_state_dict(a.state_dict())  # the same settings: accepted
    legacy = {k: v for k, v in a.state_dict().items() if k != "config"}
    other().load_state_dict(legacy)  # a state from before settings were saved: accepted as it is
