"""AutoscaledNorm, Centralize and ZScoreNorm against reference formulas (docs/transforms.md).

Random cases cover 1-D, [1,1], empty, Linear, Conv2d (4-D) and Conv3d (5-D) shapes in fp32,
fp16 and bf16; NaN/inf are injected at random layers and steps and compared with a twin that
never saw the bad step.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from gradwatch.agent import AutoscaledNorm, Centralize, ZScoreNorm
from gradwatch.agent.transforms.base import GradContext, Slot
from gradwatch.agent.transforms.normalize import ALPHA_MODES

SHAPES = [(5,), (1,), (1, 1), (0, 3), (3, 0), (3, 4), (1, 6), (6, 1), (2, 3, 3, 3), (2, 2, 2, 2, 2), (4, 1, 3, 3), (7,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_params(shapes, dtype=torch.float32, seed=0, scale=1.0, offset=True):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
        g = torch.randn(s, generator=gen) * scale * float(torch.rand((), generator=gen) * 3 + 0.1)
        if offset:  # give layers a non-zero mean so centering matters
            g = g + float(torch.randn((), generator=gen)) * scale
        p.grad = g.to(dtype)
        ps.append(p)
    return ps


def random_shapes(rng, k=None):
    return [rng.choice(SHAPES) for _ in range(k or rng.randint(1, 6))]


def set_grads(ps, grads):
    for p, g in zip(ps, grads):
        p.grad = g.clone()


def gan_eligible(g):
    return g.ndim > 1 and g.numel() >= 2


def ref_sigma(grads):
    el = [g.double().flatten() for g in grads if gan_eligible(g)]
    return torch.cat(el).std().item() if el else float("nan")


def ref_gan_sequence(seq, mode="ratio_to_initial", clamp_max=1.0):
    """Reference for a sequence of finite steps: list of (outputs, alpha)."""
    out, ref = [], None
    for grads in seq:
        s = ref_sigma(grads)
        r = s if ref is None else ref
        if mode == "none":
            a = 1.0
        else:
            a = s / r if r > 0 else 1.0
            if mode == "sqrt_ratio_to_initial":
                a = math.sqrt(a)
            if clamp_max is not None:
                a = min(a, clamp_max)
        ref = s if (mode == "ratio_to_previous" or ref is None) else ref
        res = [(a * (g.double() - g.double().mean())) if gan_eligible(g) else g.double() for g in grads]
        out.append((res, a))
    return out


# ---------------------------------------------------------------------------------- AutoscaledNorm


def test_gan_spec_vector():
    g1 = torch.nn.Parameter(torch.zeros(2, 2))
    g2 = torch.nn.Parameter(torch.zeros(1, 4))
    b = torch.nn.Parameter(torch.zeros(1))
    t = AutoscaledNorm()
    set_grads([g1, g2, b], [torch.tensor([[1.0, 3], [5, 7]]), torch.tensor([[2.0, -2, 0, 4]]), torch.tensor([9.0])])
    r = t([g1, g2, b])
    assert torch.equal(g1.grad, torch.tensor([[-3.0, -1], [1, 3]]))
    assert torch.equal(g2.grad, torch.tensor([[1.0, -3, -1, 3]]))
    assert torch.equal(b.grad, torch.tensor([9.0]))
    assert r["alpha"].item() == 1.0
    assert r["sigma"].item() == pytest.approx(2.8784916, rel=1e-6)
    assert r["layers"].tolist() == [1.0, 1.0, 0.0]
    # a later step whose pooled std is half: every centered grad times 0.5
    set_grads([g1, g2, b], [torch.tensor([[1.0, 3], [5, 7]]) * 0.5, torch.tensor([[2.0, -2, 0, 4]]) * 0.5,
                            torch.tensor([9.0])])
    r = t([g1, g2, b])
    assert r["alpha"].item() == pytest.approx(0.5, rel=1e-6)
    assert r["sigma"].item() == pytest.approx(1.4392458, rel=1e-6)
    torch.testing.assert_close(g1.grad, torch.tensor([[-0.75, -0.25], [0.25, 0.75]]))
    torch.testing.assert_close(g2.grad, torch.tensor([[0.25, -0.75, -0.25, 0.75]]))
    assert r["sigma_ref"].item() == pytest.approx(2.8784916, rel=1e-6)


def test_gan_never_amplifies_with_clamp():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    t = AutoscaledNorm()
    for s in [1.0, 5.0, 50.0]:
        p.grad = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)) * s
        c = p.grad - p.grad.mean()
        r = t([p])
        assert r["alpha"].item() == 1.0
        torch.testing.assert_close(p.grad, c)
    # without the cap the ratio may exceed 1
    t = AutoscaledNorm(clamp_max=None)
    p.grad = torch.ones(3, 3).cumsum(0)
    t([p])
    p.grad = torch.ones(3, 3).cumsum(0) * 4
    assert t([p])["alpha"].item() == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gan_invariants_random(dtype):
    """Hundreds of random cases: zero-mean eligible grads, bit-identical others, one common factor
    across eligible layers, never amplified, reported sigma equals the pooled unbiased std."""
    rng = random.Random(hash(str(dtype)) % 1000)
    tol = TOL[dtype]
    for case in range(120):
        shapes = random_shapes(rng)
        t = AutoscaledNorm()
        ps = None
        for step in range(3):
            ps = make_params(shapes, dtype, seed=case * 10 + step, scale=rng.choice([1e-3, 1.0, 30.0]))
            raw = [p.grad.clone() for p in ps]
            r = t(ps)
            el = [i for i, g in enumerate(raw) if gan_eligible(g)]
            alpha = r["alpha"].item()
            assert 0.0 < alpha <= 1.0
            if el:
                assert r["sigma"].item() == pytest.approx(ref_sigma(raw), rel=tol * 5)
            for i, (p, g) in enumerate(zip(ps, raw)):
                if i not in el:
                    assert torch.equal(p.grad, g), (case, step, i)  # bit-identical
                    continue
                out = p.grad.double()
                c = g.double() - g.double().mean()
                scale_ = max(g.double().abs().max().item(), 1e-30)
                assert abs(out.mean().item()) <= 4 * tol * scale_, (case, step, i)
                # common factor: out == alpha * c for every eligible layer
                torch.testing.assert_close(out, alpha * c, rtol=3 * tol, atol=4 * tol * scale_)
                assert out.norm().item() <= c.norm().item() * (1 + 4 * tol) + 4 * tol * scale_


@pytest.mark.parametrize("mode", ALPHA_MODES)
@pytest.mark.parametrize("clamp_max", [1.0, None, 0.5])
def test_gan_alpha_modes_match_reference(mode, clamp_max):
    rng = random.Random(7)
    for case in range(12):
        shapes = random_shapes(rng, 4) + [(3, 5)]
        seq = []
        for step in range(5):
            ps = make_params(shapes, seed=100 * case + step, scale=rng.uniform(0.2, 2.0))
            seq.append([p.grad.clone() for p in ps])
        ref = ref_gan_sequence(seq, mode, clamp_max)
        t = AutoscaledNorm(alpha_mode=mode, clamp_max=clamp_max)
        ps = make_params(shapes)
        for grads, (want, a) in zip(seq, ref):
            set_grads(ps, grads)
            r = t(ps)
            assert r["alpha"].item() == pytest.approx(a, rel=1e-5)
            for p, w in zip(ps, want):
                torch.testing.assert_close(p.grad.double(), w, rtol=1e-5, atol=1e-5)


def test_gan_rejects_bad_args():
    with pytest.raises(ValueError, match="alpha_mode"):
        AutoscaledNorm(alpha_mode="ratio")
    with pytest.raises(ValueError, match="clamp_max"):
        AutoscaledNorm(clamp_max=0.0)
    assert AutoscaledNorm.slot == Slot.NORMALIZE


def test_gan_no_eligible_is_noop():
    ps = make_params([(5,), (1, 1), (0, 4)])
    raw = [p.grad.clone() for p in ps]
    r = AutoscaledNorm()(ps)
    assert r["alpha"].item() == 1.0
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, raw))


def test_gan_zero_reference_gives_alpha_one():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    t = AutoscaledNorm()
    p.grad = torch.full((2, 2), 3.0)  # sigma 0 at the first step
    t([p])
    assert torch.equal(p.grad, torch.zeros(2, 2))
    assert not t.state_dict()["initialized"].item()  # a zero sigma is no reference
    p.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r = t([p])
    assert r["alpha"].item() == 1.0 and r["sigma_ref"].item() == r["sigma"].item() > 0
    p.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * 0.5
    assert t([p])["alpha"].item() == pytest.approx(0.5, rel=1e-6)


def _inject(grads, rng, kind):
    bad = [g.clone() for g in grads]
    cands = [i for i, g in enumerate(bad) if g.numel() > 0]
    i = rng.choice(cands)
    flat = bad[i].view(-1)
    flat[rng.randrange(flat.numel())] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    return bad


def _same(a, b):
    return torch.equal(torch.nan_to_num(a, 1.0, 2.0, 3.0), torch.nan_to_num(b, 1.0, 2.0, 3.0)) and torch.equal(
        a.isnan(), b.isnan())


@pytest.mark.parametrize("make", [AutoscaledNorm, lambda: AutoscaledNorm("ratio_to_previous"), Centralize,
                                  lambda: Centralize(conv_only=True), ZScoreNorm])
def test_nonfinite_step_is_identity_and_state_frozen(make):
    """A NaN/inf at a random layer and step: grads of that step come back untouched (no inf turned
    into NaN), the state does not move, and later outputs equal those of a twin that skipped it."""
    rng = random.Random(3)
    for case in range(25):
        shapes = random_shapes(rng, 4) + [(3, 4), (2, 2, 3, 3)]
        seq = [[p.grad.clone() for p in make_params(shapes, seed=case * 20 + s, scale=rng.uniform(0.1, 3))]
               for s in range(5)]
        bad_at = rng.randrange(5)
        kind = rng.choice(["nan", "inf", "-inf"])
        a, b = make(), make()
        pa, pb = make_params(shapes), make_params(shapes)
        for s, grads in enumerate(seq):
            if s == bad_at:
                bad = _inject(grads, rng, kind)
                set_grads(pa, bad)
                r = a(pa)
                assert r["skipped_update"].item() == 1.0
                assert r["layers"].sum().item() == 0.0
                for p, g in zip(pa, bad):
                    assert _same(p.grad, g)
                assert a.state_dict().keys() == b.state_dict().keys()
                for k, v in a.state_dict().items():
                    w = b.state_dict()[k]
                    assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), k
            set_grads(pa, grads)
            set_grads(pb, grads)
            ra, rb = a(pa), b(pb)
            assert ra["skipped_update"].item() == 0.0
            for p, q in zip(pa, pb):
                assert torch.equal(p.grad, q.grad)
            for k in ra:
                assert torch.equal(ra[k], rb[k]), k


def test_gan_state_dict_resume():
    shapes = [(3, 4), (2, 2, 3, 3), (4,)]
    seq = [[p.grad.clone() for p in make_params(shapes, seed=s, scale=1.0 / (s + 1))] for s in range(6)]
    for mode in ALPHA_MODES:
        a = AutoscaledNorm(mode)
        ps = make_params(shapes)
        for grads in seq[:3]:
            set_grads(ps, grads)
            a(ps)
        sd = a.state_dict()
        b = AutoscaledNorm(mode)
        b.load_state_dict(sd)
        qs = make_params(shapes)
        for grads in seq[3:]:
            set_grads(ps, grads)
            set_grads(qs, grads)
            ra, rb = a(ps), b(qs)
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))
            assert torch.equal(ra["alpha"], rb["alpha"])
        with pytest.raises(ValueError, match="alpha_mode"):
            AutoscaledNorm("none" if mode != "none" else "ratio_to_initial").load_state_dict(sd)
    a.reset()
    assert not a.state_dict()["initialized"].item()


def test_gan_first_step_alpha_is_one_even_if_first_step_nonfinite():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    t = AutoscaledNorm()
    p.grad = torch.tensor([[1.0, float("nan"), 2.0], [0.0, 1.0, 2.0]])
    assert t([p])["skipped_update"].item() == 1.0
    assert not t.state_dict()["initialized"].item()
    p.grad = torch.tensor([[1.0, 5.0, 2.0], [0.0, 1.0, 2.0]])
    r = t([p])
    assert r["alpha"].item() == 1.0 and r["sigma"].item() == r["sigma_ref"].item()


@pytest.mark.parametrize("make", [AutoscaledNorm, Centralize, ZScoreNorm])
def test_norm_cache_stays_valid(make):
    """When the context already holds norms, the normalizer updates them without a pass; they
    must equal freshly computed norms of the edited grads."""
    rng = random.Random(11)
    for case in range(30):
        ps = make_params(random_shapes(rng) + [(3, 4)], seed=case)
        ctx = GradContext(ps)
        _ = ctx.norms  # fill the cache, as the statistics pass does
        make().apply_(ctx)
        fresh = torch.stack([p.grad.float().norm() for p in ctx.params])
        torch.testing.assert_close(ctx.norms, fresh, rtol=1e-4, atol=1e-4 * float(fresh.max()))


def test_low_precision_uses_cached_norms_consistently():
    for dtype in (torch.float16, torch.bfloat16):
        ps = make_params([(8, 8), (4, 2, 3, 3)], dtype, seed=5)
        raw = [p.grad.clone() for p in ps]
        r = AutoscaledNorm()(ps)
        assert r["sigma"].item() == pytest.approx(ref_sigma(raw), rel=1e-3)
        for p in ps:
            assert p.grad.dtype == dtype


# ---------------------------------------------------------------------------------- Centralize


def test_gc_spec_vectors():
    c = torch.nn.Parameter(torch.zeros(2, 1, 1, 2))
    lin = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(2))
    set_grads([c, lin, b], [torch.tensor([[[[1.0, 3]]], [[[2.0, 2]]]]), torch.tensor([[1.0, 2, 3], [4, 4, 4]]),
                            torch.tensor([1.0, 2.0])])
    r = Centralize()([c, lin, b])
    assert torch.equal(c.grad, torch.tensor([[[[-1.0, 1]]], [[[0.0, 0]]]]))
    assert torch.equal(lin.grad, torch.tensor([[-1.0, 0, 1], [0, 0, 0]]))
    assert torch.equal(b.grad, torch.tensor([1.0, 2.0]))
    assert r["layers"].tolist() == [1.0, 1.0, 0.0]
    # conv-only leaves the Linear alone
    set_grads([c, lin], [torch.tensor([[[[1.0, 3]]], [[[2.0, 2]]]]), torch.tensor([[1.0, 2, 3], [4, 4, 4]])])
    Centralize(conv_only=True)([c, lin])
    assert torch.equal(c.grad, torch.tensor([[[[-1.0, 1]]], [[[0.0, 0]]]]))
    assert torch.equal(lin.grad, torch.tensor([[1.0, 2, 3], [4, 4, 4]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gc_random_reference_and_invariants(dtype):
    rng = random.Random(21)
    tol = TOL[dtype]
    for case in range(120):
        conv_only = rng.random() < 0.3
        ps = make_params(random_shapes(rng), dtype, seed=case, scale=rng.choice([1e-2, 1.0, 10.0]))
        raw = [p.grad.clone() for p in ps]
        Centralize(conv_only)(ps)
        for p, g in zip(ps, raw):
            elig = g.numel() >= 2 and g.ndim >= (4 if conv_only else 2)
            if not elig:
                assert torch.equal(p.grad, g)
                continue
            dims = tuple(range(1, g.ndim))
            want = g.double() - g.double().mean(dim=dims, keepdim=True)
            scale_ = g.double().abs().max().item()
            torch.testing.assert_close(p.grad.double(), want, rtol=tol, atol=2 * tol * scale_)
            rows = p.grad.double().sum(dim=dims)
            unit = g.numel() // g.shape[0]
            assert rows.abs().max().item() <= 4 * tol * scale_ * unit
            assert p.grad.double().norm() <= g.double().norm() * (1 + tol)
        if dtype == torch.float32:  # idempotent
            again = [p.grad.clone() for p in ps]
            Centralize(conv_only)(ps)
            for p, g in zip(ps, again):
                if g.numel() == 0:
                    continue
                torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6 * max(g.abs().max().item(), 1e-30))


def test_gc_inf_not_turned_into_nan():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.tensor([[1.0, float("inf"), 2.0], [0.0, 1.0, 2.0]])
    r = Centralize()([p])
    assert not p.grad.isnan().any()
    assert r["skipped_update"].item() == 1.0


# ---------------------------------------------------------------------------------- ZScoreNorm


def test_zscore_spec_vectors():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.tensor([[1.0, 3], [5, 7]])
    r = ZScoreNorm()([p])
    torch.testing.assert_close(p.grad, torch.tensor([[-1.1619, -0.3873], [0.3873, 1.1619]]), atol=1e-4, rtol=0)
    assert r["amplification"].item() == pytest.approx(1 / 2.5819889, rel=1e-6)
    p.grad = torch.full((2, 2), 2.0)
    ZScoreNorm()([p])
    assert torch.equal(p.grad, torch.zeros(2, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_zscore_random_reference(dtype):
    rng = random.Random(31)
    tol = TOL[dtype]
    for case in range(120):
        ps = make_params(random_shapes(rng), dtype, seed=case, scale=rng.choice([1e-3, 1.0, 100.0]))
        raw = [p.grad.clone() for p in ps]
        r = ZScoreNorm()(ps)
        for i, (p, g) in enumerate(zip(ps, raw)):
            if not gan_eligible(g):
                assert torch.equal(p.grad, g)
                assert r["amplification"][i].item() == 1.0
                continue
            gd = g.double()
            std = gd.std()
            want = (gd - gd.mean()) / (std + 1e-12)
            torch.testing.assert_close(p.grad.double(), want, rtol=4 * tol, atol=8 * tol)
            assert r["amplification"][i].item() == pytest.approx(1 / (std.item() + 1e-12), rel=4 * tol)
            if dtype == torch.float32:
                out = p.grad.double()
                assert abs(out.mean().item()) < 1e-5
                assert out.std().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("make", [AutoscaledNorm, ZScoreNorm])
def test_ill_conditioned_layers_mean_far_above_std(make):
    """|mean| up to 1e6 x std: the fast variance (s2/n - mean^2 from fp32 sums) would cancel to
    noise; the result must still match the float64 reference, the norm cache must stay right,
    and a clipper after the normalizer must honour its bound."""
    from gradwatch.agent import ClipNorm
    from gradwatch.agent.transforms.base import apply_transforms

    rng = random.Random(5)
    for case in range(40):
        shapes = [(rng.randint(2, 40), rng.randint(2, 40)), (rng.randint(2, 8), 3, 3, 3), (7,)]
        ps = make_params(shapes, seed=case, offset=False)
        ratio = 10.0 ** rng.uniform(1, 6)
        for p in ps[:2]:
            p.grad.mul_(1.0 / ratio).add_(rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 10))
        raw = [p.grad.double().clone() for p in ps]
        t = make()
        ctx = GradContext(ps)
        _ = ctx.norms  # as the statistics pass leaves it
        t.apply_(ctx)
        if make is ZScoreNorm:
            want = [(g - g.mean()) / (g.std() + 1e-12) for g in raw[:2]]
        else:
            want = [g - g.mean() for g in raw[:2]]  # the first step: alpha = 1
        for p, w in zip(ps[:2], want):
            torch.testing.assert_close(p.grad.double(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
        assert torch.equal(ps[2].grad.double(), raw[2])
        fresh = torch.stack([p.grad.float().norm() for p in ctx.params])
        torch.testing.assert_close(ctx.norms, fresh, rtol=1e-4, atol=1e-6 * float(fresh.max()))
        # normalizer then a tight clip, in one pipeline: the clipped total norm is the bound
        qs = make_params(shapes, seed=case, offset=False)
        for q, g in zip(qs, raw):
            q.grad.copy_(g)
        ctx = GradContext(qs)
        _ = ctx.norms
        bound = 0.5 * sum(float(w.norm()) ** 2 for w in want) ** 0.5
        apply_transforms(ctx, [make(), ClipNorm(bound)])
        total = float(torch.stack([q.grad.double().norm() for q in qs[:2]]).norm())
        assert total <= bound * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize("value", [0.1, 3.0, -7.7, 1e-3, 12345.678])
@pytest.mark.parametrize("shape", [(2, 2), (30, 30), (100, 1000), (4, 3, 5, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_gradient_becomes_exact_zeros(value, shape, dtype):
    p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    p.grad = torch.full(shape, value, dtype=dtype)
    r = ZScoreNorm()([p])
    assert torch.equal(p.grad, torch.zeros(shape, dtype=dtype))
    assert r["amplification"].item() == pytest.approx(1e12, rel=1e-6)  # 1/(0 + eps): std is exactly 0
    p.grad = torch.full(shape, value, dtype=dtype)
    AutoscaledNorm()([p])
    assert torch.equal(p.grad, torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("std", [1e-7, 1e-5, 1e-3])
def test_zscore_low_precision_large_amplification_stays_finite(dtype, std):
    """An fp16 scale above 65504 must not overflow: subtract first, scale in fp32, round once."""
    g = (torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) * std).to(dtype)
    p = torch.nn.Parameter(torch.zeros(64, 64, dtype=dtype))
    p.grad = g.clone()
    ZScoreNorm()([p])
    out = p.grad.double()
    assert torch.isfinite(out).all()
    gd = g.double()
    want = (gd - gd.mean()) / (gd.std() + 1e-12)
    torch.testing.assert_close(out, want, rtol=TOL[dtype] * 4, atol=TOL[dtype] * 8)


# ---------------------------------------------------------------------------------- sums from the stats pass


def _twin(ps):
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("make", [AutoscaledNorm, ZScoreNorm])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,), tuple(DTYPES)])
def test_sums_from_statistics_pass_give_identical_results(make, dtypes):
    """The statistics pass's sum column is the same ``g.sum(dtype=float32)`` the normalizer would
    compute: handing it in changes nothing, bit for bit (grads, reports, state, norm cache)."""
    from gradwatch.agent.stats import layer_moments

    rng = random.Random(21)
    a, b = make(), make()
    for case in range(40):
        ps = []
        for k, s in enumerate(random_shapes(rng) + [(3, 4)]):
            ps += make_params([s], rng.choice(dtypes), seed=100 * case + k)
        if rng.random() < 0.2:  # a non-finite step: identity either way
            g = rng.choice(ps).grad
            if g.numel():
                g.view(-1)[0] = rng.choice([float("nan"), float("inf")])
        qs = _twin(ps)
        cp, cq = GradContext(ps), GradContext(qs)
        m = layer_moments(cp.grads)
        cp.set_norms(m[:, 1].contiguous())
        cp.set_sums(m[:, 0])
        cq.set_norms(m[:, 1].contiguous())
        assert cp.cached_sums() is not None
        a.apply_(cp)
        b.apply_(cq)
        for x, y in zip(cp.grads, cq.grads):
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
        for k, v in cp.reports[a.name].items():
            assert torch.equal(v.nan_to_num(), cq.reports[b.name][k].nan_to_num()), k
        assert torch.equal(cp.norms.nan_to_num(), cq.norms.nan_to_num())
        for k, v in a.state_dict().items():
            assert (v == b.state_dict()[k]) if not isinstance(v, torch.Tensor) else torch.equal(v, b.state_dict()[k])


@pytest.mark.parametrize("make", [AutoscaledNorm, ZScoreNorm])
def test_handed_in_sums_skip_the_sum_read_and_stale_sums_are_ignored(make, monkeypatch):
    ps = make_params([(4, 3), (2, 3, 3, 3), (5,)], seed=3)
    calls = []
    orig = torch.Tensor.sum

    def counting_sum(self, *a, **k):
        calls.append(tuple(self.shape))
        return orig(self, *a, **k)

    ctx = GradContext(ps)
    _ = ctx.norms
    ctx.set_sums(torch.stack([g.sum(dtype=torch.float32) for g in ctx.grads]))
    monkeypatch.setattr(torch.Tensor, "sum", counting_sum)
    make().apply_(ctx)
    assert not [c for c in calls if c in {(4, 3), (2, 3, 3, 3)}]  # no read of an eligible grad
    assert ctx.cached_sums() is None  # the normalizer edited the grads: the sums are stale now
    monkeypatch.undo()

    # sums handed in, then a grad edited in place: the stale sums must not be used
    ps = make_params([(4, 3), (6, 2)], seed=4)
    qs = _twin(ps)
    cp, cq = GradContext(ps), GradContext(qs)
    cp.set_sums(torch.stack([g.sum(dtype=torch.float32) for g in cp.grads]))
    for c in (cp, cq):
        c.grads[0].add_(5.0)
        _ = c.norms
    assert cp.cached_sums() is None
    make().apply_(cp)
    make().apply_(cq)
    for x, y in zip(cp.grads, cq.grads):
        assert torch.equal(x, y)


@pytest.mark.parametrize("make", [AutoscaledNorm, ZScoreNorm])
@pytest.mark.parametrize("dtype", DTYPES)
def test_accelerator_routes_match_the_reference(make, dtype, monkeypatch):
    """The routes taken on CUDA (exact ``var_mean`` moments, foreach ``sub_`` then ``mul_``, no
    host reads) run here on CPU with the device check patched: same references, same
    invariants, non-finite steps still exact identities, and no host read at all."""
    import gradwatch.agent.transforms.normalize as normalize

    monkeypatch.setattr(normalize, "_host_is_device", lambda dev: False)
    rng = random.Random(77)
    tol = TOL[dtype]
    reads = []
    for case in range(60):
        ps = make_params(random_shapes(rng) + [(5, 4)], dtype, seed=case, scale=rng.choice([1e-3, 1.0, 100.0]))
        if case % 5 == 4:  # |mean| = 1000 std: the exact moments need no special route here
            g = ps[-1].grad
            g.copy_((torch.randn(g.shape, generator=torch.Generator().manual_seed(case)) * 1e-2 + 10.0).to(dtype))
        raw = [p.grad.clone() for p in ps]
        nonfinite = case % 7 == 6
        if nonfinite:
            ps[-1].grad.view(-1)[0] = float("nan")
            raw[-1] = ps[-1].grad.clone()
        ctx = GradContext(ps)
        _ = ctx.norms
        orig = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self, orig=orig: reads.append(1) or orig(self))
        make().apply_(ctx)
        monkeypatch.setattr(torch.Tensor, "tolist", orig)
        for p, g in zip(ps, raw):
            if nonfinite or not gan_eligible(g):
                assert torch.equal(p.grad.isnan(), g.isnan()) and torch.equal(p.grad.nan_to_num(), g.nan_to_num())
                continue
            gd = g.double()
            want = (gd - gd.mean()) / (gd.std() + 1e-12) if make is ZScoreNorm else gd - gd.mean()
            torch.testing.assert_close(p.grad.double(), want, rtol=4 * tol, atol=8 * tol * float(want.abs().max()))
    assert not reads


def test_gc_warns_once_for_a_weight_with_one_element_per_unit():
    p = torch.nn.Parameter(torch.zeros(4, 1))
    q = torch.nn.Parameter(torch.zeros(4, 3))
    t = Centralize()
    with pytest.warns(UserWarning, match="one element per output unit"):
        p.grad, q.grad = torch.randn(4, 1), torch.randn(4, 3)
        t([p, q])
    assert torch.equal(p.grad, torch.zeros(4, 1))
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        p.grad, q.grad = torch.randn(4, 1), torch.randn(4, 3)
        t([p, q])  # once per parameter
