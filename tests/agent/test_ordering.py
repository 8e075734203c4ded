"""Composition (docs/transforms.md, Order): normalize, then unit-wise clip, then element-wise, then global
clip; contradictory lists are refused; the transforms work inside watch() and GradScaler()."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from gradwatch.agent import (
    AGC,
    AutoClip,
    AutoscaledNorm,
    Centralize,
    ClipNorm,
    ClipValue,
    GradScaler,
    ZClip,
    ZScoreNorm,
    watch,
)
from gradwatch.agent.transforms.base import GradContext, Slot, apply_transforms, order_transforms

NORMALIZERS = [AutoscaledNorm, Centralize, ZScoreNorm]
GLOBALS = [lambda: ClipNorm(1.0), ZClip, AutoClip]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _loss(m: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    return nn.functional.cross_entropy(m(x), y) * 50.0  # large enough to clip


def test_slots():
    assert {t.slot for t in (AutoscaledNorm(), Centralize(), ZScoreNorm())} == {Slot.NORMALIZE}
    assert AGC().slot == Slot.UNITWISE
    assert {t.slot for t in (ZClip(), AutoClip())} == {Slot.GLOBAL}


def test_every_permutation_sorts_to_the_canonical_order():
    for norm, glob in itertools.product(NORMALIZERS, GLOBALS):
        ts = [norm(), AGC(), ClipValue(1.0), glob()]
        for perm in itertools.permutations(ts):
            assert order_transforms(perm) == ts


@pytest.mark.parametrize("a,b", list(itertools.combinations(range(3), 2)))
def test_two_normalizers_are_refused(a, b):
    with pytest.raises(ValueError, match="at most one normalizer"):
        order_transforms([NORMALIZERS[a](), AGC(), NORMALIZERS[b]()])


@pytest.mark.parametrize("a,b", list(itertools.combinations(range(3), 2)))
def test_two_global_clippers_are_refused(a, b):
    with pytest.raises(ValueError, match="at most one global clipper"):
        order_transforms([GLOBALS[a](), Centralize(), GLOBALS[b]()])


def test_same_instance_twice_and_non_transforms_are_refused():
    t = AGC()
    with pytest.raises(ValueError, match="twice"):
        order_transforms([t, t])
    with pytest.raises(TypeError, match="Transform"):
        order_transforms([AGC(), torch.nn.utils.clip_grad_norm_])
    assert order_transforms([AGC(), AGC()])  # two unit-wise clippers are not contradictory


def _grads(m):
    return [p.grad.clone() for p in m.parameters()]


def test_pipeline_equals_manual_sequence_in_canonical_order():
    """apply_transforms over a shuffled list == each transform called alone, in slot order; and the
    global clipper sees (and bounds) the gradient after normalization and AGC."""
    for seed in range(4):
        a, b = _model(seed), _model(seed)
        _loss(a, seed).backward()
        _loss(b, seed).backward()
        mk = lambda: [ClipNorm(0.5), AGC(0.05), AutoscaledNorm()]  # noqa: E731
        ctx = GradContext(list(a.parameters()))
        _ = ctx.norms  # as after the statistics pass: the cache must be kept valid throughout
        apply_transforms(ctx, order_transforms(mk()))
        clip, agc, gan = mk()
        gan(b.parameters())
        agc(b.parameters())
        rb = clip(b.parameters())
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-8)
        post = math.sqrt(sum(p.grad.double().norm().item() ** 2 for p in a.parameters()))
        assert post <= 0.5 + 1e-5
        assert ctx.reports["clip_norm"]["total_norm"].item() == pytest.approx(rb["total_norm"].item(), rel=1e-5)
        assert set(ctx.reports) == {"autoscaled_norm", "agc", "clip_norm"}


def test_wrong_order_would_break_the_bound():
    """Why the order matters: normalizing after a global clip leaves the norm above max_norm; the
    pipeline, given the same list in the wrong order, puts the clip last."""
    m = _model(1)
    _loss(m, 1).backward()
    ClipNorm(0.5)(m.parameters())
    ZScoreNorm()(m.parameters())
    post_wrong = math.sqrt(sum(p.grad.double().norm().item() ** 2 for p in m.parameters()))
    assert post_wrong > 0.5
    m.zero_grad()
    _loss(m, 1).backward()
    ctx = GradContext(list(m.parameters()))
    apply_transforms(ctx, order_transforms([ClipNorm(0.5), ZScoreNorm()]))
    assert math.sqrt(sum(p.grad.double().norm().item() ** 2 for p in m.parameters())) <= 0.5 + 1e-5


def test_known_skipped_step_touches_nothing():
    m = _model()
    _loss(m, 0).backward()
    raw = _grads(m)
    ts = order_transforms([AutoscaledNorm(), AGC(), ZClip(warmup_steps=1), ])
    before = [t.state_dict() for t in ts]
    ctx = GradContext(list(m.parameters()), skip=True)
    apply_transforms(ctx, ts)
    assert ctx.reports == {}
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), raw))
    for t, sd in zip(ts, before):
        for k, v in t.state_dict().items():
            assert torch.equal(v, sd[k]) if isinstance(v, torch.Tensor) else v == sd[k]


def test_unknown_skip_with_nan_guards_on_device():
    """skip=None and a NaN in one layer: every transform leaves its state alone and the reports say so."""
    m = _model()
    _loss(m, 0).backward()
    m[3].bias.grad[1] = float("nan")
    ts = order_transforms([AutoscaledNorm(), AGC(), AutoClip()])
    ctx = GradContext(list(m.parameters()))
    apply_transforms(ctx, ts)
    assert ctx.reports["autoscaled_norm"]["skipped_update"].item() == 1.0
    assert ctx.reports["autoclip"]["skipped_update"].item() == 1.0
    assert ts[0].state_dict()["initialized"].item() is False
    assert ts[2].state_dict()["len"].item() == 0


# ---------------------------------------------------------------------------------- integration


def _train(m, opt, steps, w=None, scaler=None, inject_at=None):
    for s in range(steps):
        opt.zero_grad()
        loss = _loss(m, s)
        if scaler is not None:
            scaler.scale(loss).backward()
            if s == inject_at:
                m[0].weight.grad[0, 0, 0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if s == inject_at:
                m[0].weight.grad[0, 0, 0, 0] = float("nan")
            opt.step()


def test_inside_watch_records_each_transforms_values():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    ts = [ZClip(warmup_steps=2, max_grad_norm=None), AGC(0.05, exclude=["3.*"]), AutoscaledNorm()]
    w = watch(m, opt, server="memory", transforms=ts)
    assert w.transforms == [ts[2], ts[1], ts[0]]
    _train(m, opt, 5, w=w, inject_at=3)
    w.close()
    steps = w.sink.steps
    assert len(steps) == 5
    for rec in steps:
        assert set(rec.transforms) >= {"autoscaled_norm", "agc", "zclip"}
        gan = rec.transforms["autoscaled_norm"]
        assert 0 < gan["alpha"] <= 1.0
        assert len(gan["layers"]) == len(rec.layer_ids)
        # the last Linear was excluded from AGC by name
        assert rec.transforms["agc"]["clipped_units"][-2:] == [0.0, 0.0]
    # the NaN step (no scaler, so the optimizer does step and the weights go NaN, hence step 4 is
    # non-finite too): guarded on the device, the running statistics did not move
    for i in (3, 4):
        assert steps[i].transforms["zclip"]["skipped_update"] == 1.0
        assert steps[i].transforms["autoscaled_norm"]["skipped_update"] == 1.0
        assert steps[i].transforms["zclip"]["mean"] == steps[2].transforms["zclip"]["mean"]
        assert steps[i].transforms["zclip"]["std"] == steps[2].transforms["zclip"]["std"]
        assert steps[i].transforms["autoscaled_norm"]["sigma_ref"] == steps[2].transforms["autoscaled_norm"]["sigma_ref"]
    assert math.isfinite(steps[4].transforms["zclip"]["mean"])
    assert steps[0].transforms["autoscaled_norm"]["alpha"] == 1.0
    assert steps[2].transforms["zclip"]["warmup"] == 0.0


def test_inside_grad_scaler_and_skip_on_overflow():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    gan, zc = AutoscaledNorm(), ZClip(warmup_steps=2, max_grad_norm=None)
    scaler = GradScaler("cpu", init_scale=2.0**10, transforms=[zc, gan])
    assert scaler.transforms == [gan, zc]
    _train(m, opt, 2, scaler=scaler)
    assert set(scaler.last_reports) == {"autoscaled_norm", "zclip"}
    assert scaler.last_reports["autoscaled_norm"]["skipped_update"].item() == 0.0
    before = {"gan": gan.state_dict(), "zc": zc.state_dict()}
    _train(m, opt, 1, scaler=scaler, inject_at=0)  # overflow: the scaler skips, transforms must not act
    assert scaler.get_scale() == 2.0**9
    for t, sd in ((gan, before["gan"]), (zc, before["zc"])):
        for k, v in t.state_dict().items():
            assert torch.equal(v, sd[k]) if isinstance(v, torch.Tensor) else v == sd[k]
    _train(m, opt, 2, scaler=scaler)
    assert zc.state_dict()["initialized"].item() is True
    # grads the optimizer saw were centered by GAN (the conv weight mean is ~0 after the transforms)
    assert abs(m[0].weight.grad.double().mean().item()) < 1e-6 * m[0].weight.grad.abs().max().item() + 1e-12


def test_watch_and_scaler_together_refuse_two_global_clippers():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="global clipper"):
        watch(m, opt, server="memory", transforms=[ZClip(), AutoClip()])
    with pytest.raises(ValueError, match="global clipper"):
        GradScaler("cpu", transforms=[ClipNorm(1.0), AutoClip()])


@pytest.mark.parametrize("make", [AutoscaledNorm, ZScoreNorm, Centralize])
def test_normalizer_inside_watch_equals_the_standalone_transform(make):
    """Inside watch() the normalizers reuse the statistics pass's per-layer sums instead of reading
    the gradients again; the gradients they leave must be exactly the standalone result."""
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.01)
    t_a, t_b = make(), make()
    w = watch(a, opt_a, server="memory", transforms=[t_a])
    grads = []

    def keep(*_):
        grads.append([p.grad.clone() for p in a.parameters()])

    opt_a.register_step_pre_hook(keep)  # registered after watch's own: sees the transformed grads
    for s in range(4):
        for m, opt, t in ((a, opt_a, None), (b, opt_b, t_b)):
            opt.zero_grad()
            _loss(m, s).backward()
            if t is not None:
                t(m.parameters())
                for g, p in zip(grads[s], m.parameters()):
                    assert torch.equal(g, p.grad), (s, make.__name__)
            opt.step()
    w.close()
    assert len(grads) == 4


def test_scaler_without_watcher_conflicting_with_the_watcher_raises_at_its_first_step():
    """A GradScaler built without watcher= meets the watcher at its first step: a contradiction
    (two global clippers) must raise there, not silently drop the watcher's transforms."""
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    w = watch(m, opt, server="memory", transforms=[AutoscaledNorm(), ClipNorm(1.0)])
    scaler = GradScaler("cpu", transforms=[ZClip(max_grad_norm=None)])
    opt.zero_grad()
    scaler.scale(_loss(m, 0)).backward()
    with pytest.raises(ValueError, match="conflicts with watch.*global clipper"):
        scaler.step(opt)
    w.close()
    # and without a conflict both lists run: the watcher's normalizer and the scaler's clipper
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    w = watch(m, opt, server="memory", transforms=[AutoscaledNorm()])
    scaler = GradScaler("cpu", transforms=[ZClip(max_grad_norm=None)])
    opt.zero_grad()
    scaler.scale(_loss(m, 0)).backward()
    scaler.step(opt)
    scaler.update()
    assert set(w.sink.steps[0].transforms) == {"autoscaled_norm", "zclip"}
    assert abs(m[0].weight.grad.double().mean().item()) < 1e-6 * m[0].weight.grad.abs().max().item()
    w.close()


def test_watch_refuses_a_scaler_whose_transforms_conflict():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    scaler = GradScaler("cpu", transforms=[ZClip()])
    with pytest.raises(ValueError, match="transforms: conflict with the scaler"):
        watch(m, opt, server="memory", scaler=scaler, transforms=[ClipNorm(1.0)])


def test_agc_name_patterns_without_names_raise_instead_of_matching_nothing():
    m = _model()
    for p in m.parameters():
        p.grad = torch.full_like(p, 10.0)
    with pytest.raises(ValueError, match="name patterns need parameter names"):
        AGC(exclude=["3.*"])(m.parameters())
    before = m[3].weight.grad.clone()
    r = AGC(exclude=["3.*"])(m.named_parameters())  # names known: the classifier is left alone
    assert torch.equal(m[3].weight.grad, before) and r["layers"].tolist()[-2:] == [0.0, 0.0]
    assert r["layers"].tolist()[0] == 1.0
    # inside a GradScaler with no watcher there are no names either
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    scaler = GradScaler("cpu", transforms=[AGC(exclude=["3.*"])])
    opt.zero_grad()
    scaler.scale(_loss(m, 0)).backward()
    with pytest.raises(ValueError, match="name patterns need parameter names"):
        scaler.step(opt)


def test_agc_in_watch_leaves_the_final_classifier_alone_by_default():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    agc = AGC(1e-6)
    w = watch(m, opt, server="memory", transforms=[agc])
    opt.zero_grad()
    _loss(m, 0).backward()
    raw = m[3].weight.grad.clone(), m[3].bias.grad.clone()
    opt.step()
    assert torch.equal(m[3].weight.grad, raw[0]) and torch.equal(m[3].bias.grad, raw[1])
    assert w.sink.steps[0].transforms["agc"]["layers"] == [1.0, 1.0, 0.0, 0.0]
    w.close()


@pytest.mark.parametrize("first", ["centralize", "agc"])
def test_row_stats_from_the_statistics_pass_first_transform_reads_no_rows_itself(first, monkeypatch):
    """Inside watch() the statistics pass takes the row sums (Centralize) or gradient row norms
    (AGC) its first transform needs, in its own read: the transform computes none of them
    itself, and leaves exactly the grads the standalone transform leaves."""
    import gradwatch.agent.transforms.adaptive as adaptive
    import gradwatch.agent.transforms.normalize as normalize

    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.01), torch.optim.SGD(b.parameters(), lr=0.01)
    make = {"centralize": lambda: [Centralize()], "agc": lambda: [AGC(1e-3), ClipNorm(0.5)]}[first]
    w = watch(a, opt_a, server="memory", transforms=make())
    standalone = make()
    if first == "agc":
        standalone[0].add_exclude([b[3]])  # what watch() does for the final classifier
    calls: list[int] = []
    for mod, fn in ((normalize, "row_sums"), (adaptive, "row_norms")):
        orig = getattr(mod, fn)

        def spy(g, orig=orig):  # noqa: ANN001, ANN202
            calls.append(g.data_ptr())
            return orig(g)

        monkeypatch.setattr(mod, fn, spy)
    seen = []
    opt_a.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in a.parameters()]))
    for s in range(3):
        opt_a.zero_grad()
        _loss(a, s).backward()
        calls.clear()
        opt_a.step()
        # no gradient's rows taken by the transform (AGC still takes the weights': not gradients)
        assert not set(calls) & {p.grad.data_ptr() for p in a.parameters()}
        opt_b.zero_grad()
        _loss(b, s).backward()
        ctx = GradContext(list(b.parameters()), [n for n, _ in b.named_parameters()])
        calls.clear()
        apply_transforms(ctx, order_transforms(standalone))
        assert set(calls) & {p.grad.data_ptr() for p in b.parameters()}  # standalone: it reads them
        for x, y in zip(seen[s], b.parameters()):
            assert torch.equal(x, y.grad), (s, first)
        opt_b.step()
    w.close()
