"""gradwatch's GradScaler against torch.amp.GradScaler (docs/transforms.md, Loss scaling).

Twin runs: the same model, optimizer and gradients go through torch's scaler and ours; scale
sequences, skip decisions, return values and parameters must agree bit for bit.
"""

from __future__ import annotations

import copy
import math
import pickle
import random
import warnings

import pytest
import torch

from gradwatch.agent import ClipNorm, ClipValue, GradScaler
from gradwatch.agent.scaler import ScalerUsageError
from gradwatch.agent.wire import EVENT_KINDS, Event

INF, NAN = math.inf, math.nan


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    an, bn = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(an, bn) and torch.equal(a[~an], b[~bn]))


class RetSGD(torch.optim.SGD):
    """An optimizer whose step returns something, to compare step()'s return values."""

    def step(self, closure=None, tag="stepped"):  # noqa: D102
        super().step(closure)
        return tag


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "retsgd": lambda ps: RetSGD(ps, lr=0.05),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adamw_loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False, weight_decay=0.1),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True, amsgrad=True),
    # No momentum: torch 2.13's fused SGD leaves its momentum buffer uninitialized (empty_like)
    # when the first step is skipped through found_inf, so torch's own path is not deterministic.
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True, weight_decay=0.01),
}
FUSED = {"adamw_fused", "adam_fused", "sgd_fused"}


def _shape(rng):
    return rng.choice([(0,), (1,), (rng.randint(2, 30),), (rng.randint(1, 6), rng.randint(1, 6))])


def make_params(rng: random.Random, dtypes=(torch.float32,), device="cpu"):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    out = []
    for _ in range(rng.randint(1, 6)):
        shape = _shape(rng)
        out.append((torch.randn(shape, generator=gen), rng.choice(dtypes)))
    return out


def build(spec, device="cpu"):
    return [torch.nn.Parameter(t.to(dt).to(device)) for t, dt in spec]


def make_grads(rng: random.Random, params, p_dirty: float):
    """Per param a coefficient tensor (loss = sum(p * c)), or None (grad stays None)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    cs = []
    for p in params:
        if rng.random() < 0.15:
            cs.append(None)
            continue
        mag = 10 ** rng.uniform(-4, 2) if rng.random() > 0.03 else 1e34  # 1e34 * 65536 overflows fp32
        if rng.random() < 0.05:
            mag = 0.0  # an all-zero gradient
        cs.append((torch.randn(p.shape, generator=gen) * mag).to(p.dtype))
    live = [c for c in cs if c is not None and c.numel()]
    if live and rng.random() < p_dirty:
        c = rng.choice(live)
        c.view(-1)[rng.randrange(c.numel())] = rng.choice([INF, -INF, NAN])
    return cs


def backward(scaler, params, cs):
    terms = [(p * c.to(p.device)).sum() for p, c in zip(params, cs) if c is not None]
    if not terms:
        return False
    loss = torch.stack([t.float() for t in terms]).sum()
    scaler.scale(loss).backward()
    return True


def run_twin(seed, opt_name, steps=10, *, dtypes=(torch.float32,), clip=None, p_dirty=0.25, device="cpu",
             init_scale=2.0**16, growth_interval=3):
    rng = random.Random(seed)
    spec = make_params(rng, dtypes)
    mine, ref = build(spec, device), build(spec, device)
    opt_m, opt_r = OPTIMIZERS[opt_name](mine), OPTIMIZERS[opt_name](ref)
    kw = dict(init_scale=init_scale, growth_interval=growth_interval)
    ours = GradScaler(device, transforms=[clip] if clip else (), **kw)
    theirs = torch.amp.GradScaler(device, **kw)
    n_skipped = 0
    for _ in range(steps):
        cs = make_grads(rng, mine, p_dirty)
        opt_m.zero_grad()
        opt_r.zero_grad()
        if not backward(ours, mine, cs):
            continue
        backward(theirs, ref, cs)
        if clip is not None:  # torch's documented way: unscale_, clip, step
            theirs.unscale_(opt_r)
            torch.nn.utils.clip_grad_norm_(ref, clip.max_norm, norm_type=clip.norm_type)
        before = [p.detach().clone() for p in mine]
        try:
            r_m = ours.step(opt_m)
        except Exception as e:  # torch's fused SGD fails when a grad first appears late: so must torch's path
            with pytest.raises(type(e), match=str(e)[:30]):
                theirs.step(opt_r)
            return ours, n_skipped
        r_r = theirs.step(opt_r)
        assert r_m == r_r
        skipped = bool(sum(v.item() for v in ours._found_inf_per_device(opt_m).values()))
        if skipped:
            assert all(bits_equal(a, b) for a, b in zip(mine, before))
            assert r_m is None or opt_name in FUSED  # torch still calls a fused optimizer's step()
        n_skipped += skipped
        ours.update()
        theirs.update()
        assert ours.get_scale() == theirs.get_scale() == ours.loss_scale
        assert ours._get_growth_tracker() == theirs._get_growth_tracker()
        for a, b in zip(mine, ref):
            assert bits_equal(a, b), (opt_name, a, b)
            assert (a.grad is None) == (b.grad is None)
            # Deliberate difference: torch leaves a fused optimizer's grads scaled (its kernel
            # unscales privately); ours were unscaled before the step, as for other optimizers.
            if clip is None and a.grad is not None and opt_name not in FUSED:
                assert bits_equal(a.grad, b.grad)
    assert ours.state_dict() == theirs.state_dict()
    return ours, n_skipped


# ---------------------------------------------------------------------------------------------
# §1 test vectors, verbatim


def _vec_setup():
    s = GradScaler("cpu", init_scale=4.0, growth_interval=3)
    p = torch.nn.Parameter(torch.ones(3))
    return s, p, torch.optim.SGD([p], lr=0.1)


def test_vector_1_growth_after_interval():
    s, p, opt = _vec_setup()
    seen = []
    for _ in range(3):
        opt.zero_grad()
        s.scale((2 * p).sum()).backward()
        assert p.grad.tolist() == [8.0] * 3
        s.step(opt)
        assert p.grad.tolist() == [2.0] * 3
        s.update()
        seen.append((s.get_scale(), s._get_growth_tracker()))
    assert seen == [(4.0, 1), (4.0, 2), (8.0, 0)]
    opt.zero_grad()
    s.scale((2 * p).sum()).backward()
    assert p.grad.tolist() == [16.0] * 3


def test_vector_2_inf_skips_and_backs_off():
    s, p, opt = _vec_setup()
    s.load_state_dict({"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "_growth_tracker": 2})
    opt.zero_grad()
    s.scale((2 * p).sum()).backward()
    p.grad[0] = INF
    before = p.detach().clone()
    assert s.step(opt) is None
    assert torch.equal(p.detach(), before)
    assert s._found_inf_per_device(opt)[torch.device("cpu")].item() == 1.0
    s.update()
    assert (s.get_scale(), s._get_growth_tracker()) == (4.0, 0)


def test_vector_3_nan_leaves_other_elements_unscaled():
    s, p, opt = _vec_setup()
    s.load_state_dict({"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "_growth_tracker": 0})
    s.scale((2 * p).sum()).backward()
    p.grad = torch.tensor([16.0, NAN, 16.0])
    s.unscale_(opt)
    assert p.grad[0].item() == 2.0 and math.isnan(p.grad[1].item()) and p.grad[2].item() == 2.0


def test_vector_4_update_scale_rule():
    s, p, opt = _vec_setup()
    s.load_state_dict({"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2, "_growth_tracker": 1})
    s.scale((2 * p).sum()).backward()
    s.step(opt)
    s.update()
    assert (s.get_scale(), s._get_growth_tracker(), s.loss_scale) == (16.0, 0, 16.0)
    opt.zero_grad()
    s.scale((2 * p).sum()).backward()
    p.grad[1] = NAN
    s.step(opt)
    s.update()
    assert (s.get_scale(), s._get_growth_tracker(), s.loss_scale) == (8.0, 0, 8.0)


# ---------------------------------------------------------------------------------------------
# twin equivalence


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_twin_equivalence_random(opt_name):
    total_skipped = 0
    for seed in range(30):  # 7 optimizers x 30 seeds = 210 runs of 10 steps
        _, n = run_twin(f"{opt_name}-{seed}", opt_name)
        total_skipped += n
    if opt_name not in FUSED:
        assert total_skipped > 5  # the runs did exercise skipped steps


@pytest.mark.parametrize("opt_name", ["sgd", "adam_foreach", "adamw_loop"])
def test_twin_equivalence_bf16_params(opt_name):
    for seed in range(15):
        run_twin(f"bf16-{opt_name}-{seed}", opt_name, dtypes=(torch.float32, torch.bfloat16))


@pytest.mark.parametrize("opt_name", ["adamw_fused", "adam_fused", "sgd_fused"])
def test_twin_equivalence_fused_fp16_params(opt_name):
    """fp16 grads in a fused optimizer: torch's path (kernel unscales), identical results."""
    for seed in range(10):
        run_twin(f"fp16-{opt_name}-{seed}", opt_name, dtypes=(torch.float16, torch.float32), init_scale=256.0)


@pytest.mark.parametrize("opt_name", ["sgd", "adam_foreach", "adamw_fused", "sgd_fused"])
@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_twin_equivalence_with_clip_norm(opt_name, norm_type):
    for seed in range(12):
        if norm_type == INF and any(t.numel() == 0 for t, _ in make_params(random.Random(f"clip-{opt_name}-{norm_type}-{seed}"))):
            continue  # torch cannot take the inf-norm of an empty grad (tested in test_clip.py)
        run_twin(f"clip-{opt_name}-{norm_type}-{seed}", opt_name, clip=ClipNorm(0.5, norm_type=norm_type))


def test_scale_cap():
    """init 2**126 grows once to 2**127 then stays (growth would overflow fp32), tracker resets."""
    s = GradScaler("cpu", init_scale=2.0**126, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    seq = []
    for _ in range(6):
        opt.zero_grad()
        s.scale((p * 1e-30).sum()).backward()
        s.step(opt)
        s.update()
        seq.append((s.get_scale(), s._get_growth_tracker(), s.loss_scale))
    assert seq == [(2.0**126, 1, 2.0**126), (2.0**127, 0, 2.0**127), (2.0**127, 1, 2.0**127), (2.0**127, 0, 2.0**127)] * 1 + [(2.0**127, 1, 2.0**127), (2.0**127, 0, 2.0**127)]
    assert [e.kind for e in s.events] == ["scale_growth"]


def test_multiple_optimizers_share_scale():
    """A clean optimizer steps although the other one overflowed; the shared scale backs off."""
    rng = random.Random(7)
    for _trial in range(20):
        spec_a, spec_b = make_params(rng), make_params(rng)
        pa_m, pb_m, pa_r, pb_r = build(spec_a), build(spec_b), build(spec_a), build(spec_b)
        oa_m, ob_m = torch.optim.SGD(pa_m, lr=0.1), torch.optim.Adam(pb_m, lr=0.01)
        oa_r, ob_r = torch.optim.SGD(pa_r, lr=0.1), torch.optim.Adam(pb_r, lr=0.01)
        ours = GradScaler("cpu", init_scale=4.0, growth_interval=2)
        theirs = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=2)
        for _ in range(6):
            ca, cb = make_grads(rng, pa_m, 0.3), make_grads(rng, pb_m, 0.3)
            for o in (oa_m, ob_m, oa_r, ob_r):
                o.zero_grad()
            ok_m = [backward(ours, pa_m, ca), backward(ours, pb_m, cb)]
            ok_r = [backward(theirs, pa_r, ca), backward(theirs, pb_r, cb)]
            assert ok_m == ok_r
            if not any(ok_m):
                continue
            for ok, om, orr in zip(ok_m, (oa_m, ob_m), (oa_r, ob_r)):
                if ok:
                    assert ours.step(om) == theirs.step(orr)
            ours.update()
            theirs.update()
            assert ours.get_scale() == theirs.get_scale() == ours.loss_scale
            for a, b in zip(pa_m + pb_m, pa_r + pb_r):
                assert bits_equal(a, b)


def test_multiple_optimizers_documented_case():
    """ALGORITHMS §1: scale 4 -> 2 while the clean optimizer stepped."""
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    op, oq = torch.optim.SGD([p], lr=1.0), torch.optim.SGD([q], lr=1.0)
    s = GradScaler("cpu", init_scale=4.0)
    s.scale(p.sum() + q.sum()).backward()
    q.grad[0] = INF
    s.step(op)
    s.step(oq)
    s.update()
    assert p.tolist() == [0.0, 0.0] and q.tolist() == [1.0, 1.0] and s.get_scale() == 2.0
    kinds = [e.kind for e in s.events]
    assert kinds == ["overflow", "skipped"]
    assert s.events[0].data["layers"] == ["opt1.group0.param0"] and s.events[1].data["optimizer"] == 1


def test_explicit_unscale_then_step_and_step_args_forwarded():
    p = torch.nn.Parameter(torch.ones(3))
    opt = RetSGD([p], lr=0.1)
    s = GradScaler("cpu", init_scale=8.0)
    s.scale(p.sum()).backward()
    s.unscale_(opt)
    assert p.grad.tolist() == [1.0] * 3
    assert s.step(opt, None, tag="x") == "x"
    assert p.grad.tolist() == [1.0] * 3  # not unscaled twice
    s.update()


def test_unscale_only_optimizer_counts_in_update():
    """An optimizer that was unscale_-d but never stepped still feeds update(), as in torch."""
    res = []
    for cls in (torch.amp.GradScaler, GradScaler):
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.1)
        s = cls("cpu", init_scale=4.0)
        s.scale(p.sum()).backward()
        p.grad[0] = INF
        s.unscale_(opt)
        s.update()
        res.append(s.get_scale())
    assert res == [2.0, 2.0]
    assert [e.kind for e in s.events] == ["overflow"] and s.events[0].data["layers"] == ["group0.param0"]


# ---------------------------------------------------------------------------------------------
# transforms without a watcher


def test_transforms_apply_to_unscaled_grads_only_on_clean_steps():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    s = GradScaler("cpu", init_scale=1024.0, transforms=[ClipValue(0.5), ClipNorm(1.0)])
    assert [t.name for t in s.transforms] == ["clip_value", "clip_norm"]
    s.scale((torch.tensor([3.0, 4.0]) * p).sum()).backward()
    s.step(opt)
    assert p.grad.tolist() == [0.5, 0.5]  # clamped after unscaling (scaled grads would be 3072, 4096)
    assert s.last_reports["clip_norm"]["coef"].item() == 1.0
    s.update()
    opt.zero_grad()
    s.scale((torch.tensor([INF, 4.0]) * p).sum()).backward()
    s.step(opt)
    assert s.last_reports == {} and p.grad[1].item() == 4.0  # skipped: transforms not run
    s.update()


def test_transform_validation():
    with pytest.raises(ValueError, match="at most one global clipper"):
        GradScaler("cpu", transforms=[ClipNorm(1.0), ClipNorm(2.0)])
    with pytest.raises(TypeError):
        GradScaler("cpu", transforms=[lambda ps: None])


def test_fused_fp16_with_transforms_warns_and_skips_them():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = torch.optim.AdamW([p], fused=True)
    s = GradScaler("cpu", init_scale=256.0, transforms=[ClipValue(1e-6)])
    s.scale(p.float().sum()).backward()
    with pytest.warns(UserWarning, match="unscales its gradients inside its fused kernel"):
        s.step(opt)
    s.update()
    assert s.last_reports == {}


# ---------------------------------------------------------------------------------------------
# watcher protocol


class FakeWatcher:
    def __init__(self):
        self.calls = []
        self.events = []

    def _on_scaler_step(self, optimizer, *, scaler, skipped, transforms):
        grads = [None if p.grad is None else p.grad.clone() for g in optimizer.param_groups for p in g["params"]]
        params = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        self.calls.append({"opt": optimizer, "scaler": scaler, "skipped": skipped, "transforms": transforms,
                           "grads": grads, "params": params})

    def _on_scaler_event(self, kind, data):
        self.events.append((kind, data))

    def _param_name(self, p):
        return "fc.weight"


@pytest.mark.parametrize("attach", ["kwarg", "optimizer"])
@pytest.mark.parametrize("fused", [False, True])
def test_watcher_sees_unscaled_grads_before_step(attach, fused):
    w = FakeWatcher()
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
    clip = ClipNorm(1.0)
    if attach == "optimizer":
        opt._gradwatch_watcher = w
        s = GradScaler("cpu", init_scale=16.0, growth_interval=1, transforms=[clip])
    else:
        s = GradScaler("cpu", init_scale=16.0, growth_interval=1, watcher=w, transforms=[clip])
    s.scale((torch.tensor([3.0, 4.0]) * p).sum()).backward()
    s.step(opt)
    s.update()
    c = w.calls[-1]
    assert c["opt"] is opt and c["scaler"] is s and c["skipped"] is False and c["transforms"] == [clip]
    assert c["grads"][0].tolist() == [3.0, 4.0]  # unscaled, and the watcher (not the scaler) clips
    assert c["params"][0].tolist() == [1.0, 1.0]  # before optimizer.step()
    assert p.grad.tolist() == [3.0, 4.0] and s.last_reports == {}
    assert w.events == [("scale_growth", {"scale_before": 16.0, "scale_after": 32.0})]
    opt.zero_grad()
    s.scale((torch.tensor([NAN, 4.0]) * p).sum()).backward()
    before = p.detach().clone()
    s.step(opt)
    s.update()
    assert w.calls[-1]["skipped"] is True and torch.equal(p.detach(), before)
    assert w.events[-2][0] == "overflow" and w.events[-2][1]["layers"] == ["fc.weight"]
    assert w.events[-2][1]["scale_before"] == 32.0 and w.events[-2][1]["scale_after"] == 16.0
    assert w.events[-1] == ("skipped", {"optimizer": 0, "layers": ["fc.weight"]})
    assert not s.events


# ---------------------------------------------------------------------------------------------
# events and host syncs


def test_events_kinds_and_deque():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p, torch.nn.Parameter(torch.ones(1))], lr=0.1)
    s = GradScaler("cpu", init_scale=4.0, growth_interval=1)
    s.scale(p.sum()).backward()
    s.step(opt)
    s.update()
    s.scale(p.sum()).backward()
    s.step(opt)
    s.update(new_scale=2.0)
    opt.zero_grad()
    s.scale(p.sum() * INF).backward()
    s.step(opt)
    s.update(new_scale=torch.tensor(64.0))
    assert [(e.kind, e.step, e.data) for e in s.events] == [
        ("scale_growth", 0, {"scale_before": 4.0, "scale_after": 8.0}),
        ("manual_scale", 1, {"scale_before": 8.0, "scale_after": 2.0}),
        ("manual_scale", 2, {"scale_before": 2.0, "scale_after": 64.0}),
        ("skipped", 2, {"optimizer": 0, "layers": ["group0.param0"]}),
    ]
    assert all(isinstance(e, Event) and e.kind in EVENT_KINDS for e in s.events)
    assert s.loss_scale == s.get_scale() == 64.0
    assert s.events.maxlen == 10_000


def test_clean_update_does_not_read_device_and_step_reads_once(monkeypatch):
    """The host mirror: update() calls .item() on nothing; step() exactly once (as torch)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    s = GradScaler("cpu", init_scale=4.0, growth_interval=2, transforms=[ClipNorm(1.0)])
    real_item = torch.Tensor.item
    calls = []

    def item(t):
        calls.append(t)
        return real_item(t)

    for _ in range(5):
        s.scale(p.sum()).backward()
        monkeypatch.setattr(torch.Tensor, "item", item)
        s.step(opt)
        assert len(calls) == 1
        s.update()
        assert len(calls) == 1
        monkeypatch.setattr(torch.Tensor, "item", real_item)
        calls.clear()
        assert s.loss_scale == s.get_scale()
        opt.zero_grad()


# ---------------------------------------------------------------------------------------------
# errors: ALGORITHMS §1 table


def _scaled_setup(cls, **kw):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    s = cls("cpu", **kw)
    s.scale(p.sum()).backward()
    return s, p, opt


def both(fn):
    """Run fn on torch's scaler and ours; return the two exceptions."""
    out = []
    for cls in (torch.amp.GradScaler, GradScaler):
        with pytest.raises(Exception) as e:
            fn(cls)
        out.append(e.value)
    return out


def _assert_same(theirs, ours, ours_type):
    assert str(ours) == str(theirs)
    assert type(ours) is ours_type
    if isinstance(theirs, AssertionError):  # code written for torch keeps catching it
        assert isinstance(ours, AssertionError) and isinstance(ours, ValueError)
    else:
        assert isinstance(ours, type(theirs))


def test_error_unscale_twice():
    def f(cls):
        s, p, opt = _scaled_setup(cls)
        s.unscale_(opt)
        s.unscale_(opt)

    t, o = both(f)
    assert str(o) == "unscale_() has already been called on this optimizer since the last update()."
    _assert_same(t, o, RuntimeError)


def test_error_unscale_after_step():
    def f(cls):
        s, p, opt = _scaled_setup(cls)
        s.step(opt)
        s.unscale_(opt)

    t, o = both(f)
    assert str(o) == "unscale_() is being called after step()."
    _assert_same(t, o, RuntimeError)


def test_error_step_twice():
    def f(cls):
        s, p, opt = _scaled_setup(cls)
        s.step(opt)
        s.step(opt)

    t, o = both(f)
    assert str(o) == "step() has already been called since the last update()."
    _assert_same(t, o, RuntimeError)


def test_error_closure():
    t, o = both(lambda cls: _scaled_setup(cls)[0].step(_scaled_setup(cls)[2], closure=lambda: 0.0))
    _assert_same(t, o, RuntimeError)


@pytest.mark.parametrize("method", ["unscale_", "step", "update"])
def test_error_before_scale(method):
    def f(cls):
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.1)
        s = cls("cpu")
        getattr(s, method)(*([] if method == "update" else [opt]))

    t, o = both(f)
    assert str(o).startswith(f"Attempted {method} but _scale is None.")
    _assert_same(t, o, ScalerUsageError)


def test_error_step_without_grads():
    def f(cls):
        p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.1)
        s = cls("cpu")
        s.scale(q.sum()).backward()
        s.step(opt)

    t, o = both(f)
    assert str(o) == "No inf checks were recorded for this optimizer."
    _assert_same(t, o, ScalerUsageError)


def test_error_update_without_step():
    def f(cls):
        s, p, opt = _scaled_setup(cls)
        s.update()

    t, o = both(f)
    assert str(o) == "No inf checks were recorded prior to update."
    _assert_same(t, o, ScalerUsageError)


def test_error_fp16_grads_unscale():
    def f(cls):
        p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
        opt = torch.optim.SGD([p], lr=0.1)
        s = cls("cpu")
        s.scale(p.float().sum()).backward()
        s.step(opt)

    t, o = both(f)
    assert str(o) == "Attempting to unscale FP16 gradients."
    _assert_same(t, o, ValueError)


def test_error_new_scale_int():
    def f(cls):
        s, p, opt = _scaled_setup(cls)
        s.step(opt)
        s.update(new_scale=8)

    t, o = both(f)
    assert type(t) is AttributeError and type(o) is AttributeError


@pytest.mark.parametrize(
    "bad",
    [lambda: torch.tensor([2.0, 3.0]), lambda: torch.tensor(2.0, requires_grad=True), lambda: torch.tensor(2.0, device="meta")],
    ids=["numel", "requires_grad", "device"],
)
def test_error_new_scale_tensor(bad):
    def f(cls):
        s, p, opt = _scaled_setup(cls)
        s.step(opt)
        s.update(new_scale=bad())

    t, o = both(f)
    assert str(o).startswith("new_scale should be a float or a 1-element")
    _assert_same(t, o, ScalerUsageError)


@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF])
def test_error_new_scale_float_garbage(bad):
    s, p, opt = _scaled_setup(GradScaler)
    s.step(opt)
    with pytest.raises(ValueError, match="new_scale must be a positive finite float"):
        s.update(new_scale=bad)


def test_error_pickle_mid_iteration():
    def f(cls):
        s, p, opt = _scaled_setup(cls)
        s.unscale_(opt)
        pickle.dumps(s)

    t, o = both(f)
    assert str(o).startswith("A GradScaler instance may only be pickled")
    _assert_same(t, o, ScalerUsageError)


def test_error_load_empty_state_dict():
    t, o = both(lambda cls: cls("cpu").load_state_dict({}))
    _assert_same(t, o, RuntimeError)


@pytest.mark.parametrize(
    "kw, msg, typ",
    [
        ({"growth_factor": 1.0}, "The growth factor must be > 1.0.", ScalerUsageError),
        ({"growth_factor": 0.5}, "The growth factor must be > 1.0.", ScalerUsageError),
        ({"growth_factor": NAN}, "The growth factor must be > 1.0.", ScalerUsageError),
        ({"backoff_factor": 1.0}, "The backoff factor must be < 1.0.", ScalerUsageError),
        ({"backoff_factor": NAN}, "The backoff factor must be < 1.0.", ScalerUsageError),
        ({"backoff_factor": 0.0}, "The backoff factor must be > 0", ValueError),
        ({"growth_interval": 0}, "growth_interval must be a positive int", ValueError),
        ({"growth_interval": 2.5}, "growth_interval must be a positive int", ValueError),
        ({"growth_interval": True}, "growth_interval must be a positive int", ValueError),
        ({"init_scale": 0.0}, "init_scale must be a positive finite number", ValueError),
        ({"init_scale": INF}, "init_scale must be a positive finite number", ValueError),
        ({"init_scale": "big"}, "init_scale must be a number", ValueError),
        ({"device": "nonsense"}, "device must be a device type", ValueError),
        ({"device": 3}, "device must be a device type", ValueError),
    ],
)
def test_constructor_validation(kw, msg, typ):
    kw = {"device": "cpu", **kw}
    with pytest.raises(typ) as e:
        GradScaler(**kw)
    assert type(e.value) is typ and str(e.value).startswith(msg)
    if typ is ScalerUsageError and not any(v != v for v in kw.values() if isinstance(v, float)):
        # torch: AssertionError with the same text (torch lets NaN through)
        with pytest.raises(AssertionError, match=msg.replace(".", r"\.")):
            torch.amp.GradScaler(**kw)
    # validated even when disabled (torch only validates enabled scalers)
    with pytest.raises(typ):
        GradScaler(**{**kw, "enabled": False})


def test_setters_validate():
    s = GradScaler("cpu")
    with pytest.raises(ScalerUsageError):
        s.set_growth_factor(0.9)
    with pytest.raises(ScalerUsageError):
        s.set_backoff_factor(2.0)
    with pytest.raises(ValueError):
        s.set_growth_interval(0)
    s.set_growth_factor(4.0)
    s.set_backoff_factor(0.25)
    s.set_growth_interval(7)
    assert (s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (4.0, 0.25, 7)


def test_torch_device_object_accepted():
    s = GradScaler(torch.device("cpu"))
    assert s._device == "cpu"


# ---------------------------------------------------------------------------------------------
# disabled, state_dict, pickling


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_cuda_default_on_cpu_only_machine_warns_and_disables():
    with pytest.warns(UserWarning, match=r"CUDA is not available\.  Disabling\.") as rec:
        s = GradScaler()
    assert rec[0].filename == __file__  # the warning points at the caller, not at gradwatch
    assert not s.is_enabled() and s.get_scale() == 1.0 and s.state_dict() == {} and s.loss_scale == 1.0
    with pytest.warns(UserWarning):
        t = torch.amp.GradScaler()
    assert not t.is_enabled()


def test_disabled_is_a_pass_through_but_still_transforms():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = RetSGD([p], lr=1.0)
    s = GradScaler("cpu", enabled=False, transforms=[ClipValue(1.0)])
    x = torch.tensor([3.0, -4.0])
    out = s.scale((x * p).sum())
    out.backward()
    s.unscale_(opt)
    assert p.grad.tolist() == [3.0, -4.0]
    assert s.step(opt) == "stepped"
    assert p.tolist() == [-1.0, 1.0]  # clipped to [-1, 1] before the step
    s.update()
    s.load_state_dict({"scale": 3.0})
    assert s.get_scale() == 1.0 and s.state_dict() == {} and not s.events


def _continue(scaler, steps, seed):
    """Drive a scaler through steps with occasional inf; return the scale sequence."""
    rng = random.Random(seed)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.01)
    seq = []
    for _ in range(steps):
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        if rng.random() < 0.3:
            p.grad[0] = INF
        scaler.step(opt)
        scaler.update()
        seq.append((scaler.get_scale(), scaler._get_growth_tracker()))
    return seq


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_interoperable(direction):
    for seed in range(10):
        src_cls, dst_cls = (GradScaler, torch.amp.GradScaler) if direction == "ours_to_torch" else (torch.amp.GradScaler, GradScaler)
        a = src_cls("cpu", init_scale=2.0**10, growth_interval=2, growth_factor=4.0, backoff_factor=0.25)
        b = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2, growth_factor=4.0, backoff_factor=0.25)
        assert _continue(a, 7, seed) == _continue(b, 7, seed)
        sd = a.state_dict()
        assert sd == b.state_dict()
        assert list(sd) == ["scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"]
        for fresh in (dst_cls("cpu"), _primed(dst_cls)):  # before and after the lazy init of _scale
            fresh.load_state_dict(copy.deepcopy(sd))
            c = copy.deepcopy(b)
            assert _continue(fresh, 9, seed + 100) == _continue(c, 9, seed + 100)
            if isinstance(fresh, GradScaler):
                assert fresh.loss_scale == fresh.get_scale()


def _primed(cls):
    s = cls("cpu", init_scale=3.0)
    s.scale(torch.ones(()))
    return s


def test_pickle_round_trip_continues_like_torch():
    ours = GradScaler("cpu", init_scale=64.0, growth_interval=2, watcher=FakeWatcher(), transforms=[ClipNorm(5.0)])
    theirs = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=2)
    assert _continue(ours, 5, 1) == _continue(theirs, 5, 1)
    o2, t2 = pickle.loads(pickle.dumps(ours)), pickle.loads(pickle.dumps(theirs))
    assert isinstance(o2, torch.amp.GradScaler) and o2.watcher is None and not o2.events
    assert [t.max_norm for t in o2.transforms] == [5.0]
    assert o2.loss_scale == t2.get_scale()
    assert _continue(o2, 6, 2) == _continue(t2, 6, 2)
    o3 = copy.deepcopy(o2)
    assert o3.state_dict() == o2.state_dict()


def test_isinstance_and_lazy_export():
    import gradwatch.agent as agent

    assert agent.GradScaler is GradScaler
    assert isinstance(GradScaler("cpu"), torch.amp.GradScaler)


# ---------------------------------------------------------------------------------------------
# CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_twin_equivalence_cuda(opt_name):
    for seed in range(8):
        run_twin(f"cuda-{opt_name}-{seed}", opt_name, device="cuda")
        run_twin(f"cuda-clip-{opt_name}-{seed}", opt_name, device="cuda", clip=ClipNorm(0.5))


@pytest.mark.cuda
@cuda
def test_clean_step_syncs_like_torch_cuda():
    """On a clean step, step() syncs once (torch's found_inf.item()) and update() not at all."""
    p = torch.nn.Parameter(torch.ones(1000, device="cuda"))
    opt = torch.optim.SGD([p], lr=0.1)
    s = GradScaler("cuda", transforms=[ClipNorm(1.0)])
    for _ in range(3):
        s.scale(p.sum()).backward()
        s.step(opt)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            s.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert s.loss_scale == s.get_scale()
        opt.zero_grad()


@pytest.mark.cuda
@cuda
def test_cuda_overflow_event_names_layers():
    ps = [torch.nn.Parameter(torch.ones(4, device="cuda")) for _ in range(3)]
    opt = torch.optim.Adam(ps, fused=True)
    s = GradScaler("cuda", init_scale=8.0)
    s.scale(sum(p.sum() for p in ps)).backward()
    ps[2].grad[1] = NAN
    s.step(opt)
    s.update()
    assert [e.kind for e in s.events] == ["overflow", "skipped"]
    assert s.events[0].data["layers"] == ["group0.param2"] and s.get_scale() == 4.0


def test_no_warnings_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_twin("quiet", "adamw_fused", steps=4)


def test_watcher_checks_transform_conflicts_at_construction():
    class Checking(FakeWatcher):
        def _check_transforms(self, extra):
            from gradwatch.agent.transforms.base import order_transforms

            return order_transforms(list(extra) + [ClipNorm(9.0)])

    GradScaler("cpu", watcher=Checking(), transforms=[ClipValue(1.0)])
    with pytest.raises(ValueError, match="at most one global clipper"):
        GradScaler("cpu", watcher=Checking(), transforms=[ClipNorm(1.0)])


def test_with_real_watcher_events_name_layers():
    from gradwatch.agent import watch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    w = watch(model, opt, server="memory", transforms=[ClipNorm(1.0)])
    s = GradScaler("cpu", init_scale=16.0, growth_interval=1)
    for i in range(3):
        opt.zero_grad()
        s.scale(model(torch.ones(1, 3)).sum()).backward()
        if i == 1:
            model.bias.grad[0] = INF
        s.step(opt)
        s.update()
    assert not s.events  # delivered to the watcher instead
    ev = [(e.kind, e.data) for e in w.sink.events if e.kind in {"overflow", "skipped", "scale_growth"}]
    assert [k for k, _ in ev] == ["scale_growth", "overflow", "skipped", "scale_growth"]
    assert ev[1][1]["layers"] == ["bias"] and ev[1][1]["scale_before"] == 32.0 and ev[1][1]["scale_after"] == 16.0
    assert [st.skipped for st in w.sink.steps] == [False, True, False]
    w.close()


def test_state_dict_carries_the_scalers_transforms():
    """ZClip's running statistics resume with the scaler; torch's scaler loads the same dict
    (the extra key is ignored), and a scaler with other transforms refuses it."""
    from gradwatch.agent import AutoClip, ZClip

    def run(scaler, model, opt, steps):
        for s in range(steps):
            opt.zero_grad()
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(s))
            scaler.scale(model(x).square().sum()).backward()
            scaler.step(opt)
            scaler.update()

    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    zc = ZClip(warmup_steps=2, max_grad_norm=None)
    a = GradScaler("cpu", init_scale=4.0, transforms=[zc])
    run(a, m, opt, 5)
    sd = a.state_dict()
    assert "gradwatch_transforms" in sd and sd["gradwatch_transforms"][0][0] == "ZClip"
    b = GradScaler("cpu", transforms=[ZClip(warmup_steps=2, max_grad_norm=None)])
    b.load_state_dict(copy.deepcopy(sd))
    for k, v in zc.state_dict().items():
        w = b._gw_transforms[0].state_dict()[k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k
    assert b.get_scale() == a.get_scale()
    t = torch.amp.GradScaler("cpu")
    t.load_state_dict(copy.deepcopy(sd))
    assert t.get_scale() == a.get_scale()
    with pytest.raises(ValueError, match="do not match"):
        GradScaler("cpu", transforms=[AutoClip()]).load_state_dict(copy.deepcopy(sd))
    assert "gradwatch_transforms" not in GradScaler("cpu").state_dict()  # no transforms: torch's dict as is


def test_fp16_fused_transforms_warn_at_construction():
    """A fused optimizer with fp16 parameters keeps its grads scaled up to the kernel, so transforms
    cannot run under a loss scaler: watch() and GradScaler(watcher=) say so up front."""
    from gradwatch.agent import watch

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = torch.optim.AdamW([p], fused=True)
    with pytest.warns(UserWarning, match=r"watch\(transforms=...\): AdamW is fused and holds fp16.*ClipNorm"):
        w = watch(None, opt, server="memory", transforms=[ClipNorm(1.0)])
    with pytest.warns(UserWarning, match=r"GradScaler\(transforms=...\): AdamW is fused.*ClipValue"):
        GradScaler("cpu", watcher=w, transforms=[ClipValue(1.0)])
    w.close()
    q = torch.nn.Parameter(torch.ones(3))  # fp32 master parameters: no warning
    opt32 = torch.optim.AdamW([q], fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = watch(None, opt32, server="memory", transforms=[ClipNorm(1.0)])
        GradScaler("cpu", watcher=w, transforms=[ClipValue(1.0)])
    w.close()


@pytest.mark.parametrize("autocast", [False, True])
def test_watch_clipnorm_under_scaler_with_watcher_clips_like_torch(autocast):
    """watch(transforms=[ClipNorm]) + GradScaler(watcher=w) (tests/dashboard/trainer.py's set-up):
    the optimizer gets exactly torch's unscale + clip_grad_norm_, and each clipped step is recorded
    with its post-transform norm and a clip event (reported as never clipping; not reproduced)."""
    from gradwatch.agent import watch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for p in model.parameters()]))
    with watch(model, opt, server="memory", transforms=[ClipNorm(1.0)]) as w:
        scaler = GradScaler("cpu", init_scale=1024.0, growth_interval=3, watcher=w)
        tscaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        for i in range(6):
            x, y = torch.randn(32, 16) * (10.0 * i + 0.1), torch.randint(0, 4, (32,))
            for m, o, s in ((model, opt, scaler), (ref, ref_opt, tscaler)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                o.zero_grad()
                s.scale(loss).backward()
                if s is tscaler:
                    s.unscale_(o)
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
            scaler.step(opt)
            scaler.update()
            tscaler.step(ref_opt)
            tscaler.update()
            for a, b in zip(seen[-1], (p.grad for p in ref.parameters())):
                assert torch.equal(a, b)
            assert norm.item() > 1.0 or i == 0
        w.flush()
        steps = w.sink.steps
        clips = [e for e in w.sink.events if e.kind == "clip"]
    assert len(steps) == 6
    for r in steps[1:]:
        assert r.total_norm > 4.0 and abs(r.total_norm_post - 1.0) < 1e-5 and r.clip_coef < 1.0
    assert [e.step for e in clips] == [r.step for r in steps if r.total_norm > 1.0]
