"""ClipNorm / ClipValue against torch.nn.utils.clip_grad_norm_ / clip_grad_value_ (docs/transforms.md, ClipNorm)."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from torch.nn.utils import clip_grad_norm_, clip_grad_value_

from gradwatch.agent import ClipNorm, ClipValue
from gradwatch.agent.transforms.base import GradContext, apply_transforms, order_transforms

NORM_TYPES = [1.0, 2.0, 3.5, math.inf]
FOREACH = [None, True, False]
INF = math.inf
NAN = math.nan

def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values; NaN equals NaN (and -0.0 == 0.0, as torch.equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    an, bn = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(an, bn) and torch.equal(a[~an], b[~bn]))


def _shape(rng: random.Random) -> tuple[int, ...]:
    return rng.choice([(0,), (1,), (rng.randint(1, 40),), (rng.randint(1, 9), rng.randint(1, 9)), (2, 0, 3), (1, 1, 1)])


def random_params(rng: random.Random, dtypes=(torch.float32,), device="cpu", nonfinite=0.3) -> list[torch.nn.Parameter]:
    """1-7 params of random shapes, ~20% with grad None, inf/NaN injected at random layers."""
    n = rng.randint(1, 7)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    ps = []
    for _ in range(n):
        dt = rng.choice(dtypes)
        shape = _shape(rng)
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dt, device=device))
        if rng.random() > 0.2:
            scale = 10 ** rng.uniform(-3, 2)
            p.grad = (torch.randn(shape, generator=gen) * scale).to(dt).to(device)
        ps.append(p)
    if rng.random() < nonfinite:
        withgrad = [p for p in ps if p.grad is not None and p.grad.numel()]
        if withgrad:
            g = rng.choice(withgrad).grad
            g.view(-1)[rng.randrange(g.numel())] = rng.choice([INF, -INF, NAN])
    return ps


def inf_on_empty(ps, norm_type) -> bool:
    """torch raises on the inf-norm of an empty gradient (tested separately)."""
    return norm_type == INF and any(p.grad is not None and p.grad.numel() == 0 for p in ps)


def twin(ps: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_grads_equal(ours, theirs):
    for a, b in zip(ours, theirs):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert bits_equal(a.grad, b.grad), (a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# §2 test vectors, verbatim


def _pair(x, y):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor(x), torch.tensor(y)
    return a, b


def test_vector_1_clip_to_one():
    a, b = _pair([3.0, 0.0], [0.0, 4.0])
    r = ClipNorm(1.0)([a, b])
    assert r["total_norm"].item() == 5.0
    assert a.grad.tolist() == [torch.tensor(3.0 * (1 / (5 + 1e-6))).item(), 0.0]
    assert torch.allclose(a.grad, torch.tensor([0.59999990, 0.0])) and torch.allclose(b.grad, torch.tensor([0.0, 0.79999983]))
    assert r["total_norm_post"].item() == pytest.approx(1.0, abs=1e-6)
    assert r["coef"].item() == pytest.approx(1 / (5 + 1e-6))


def test_vector_2_no_clip_when_below():
    a, b = _pair([3.0, 0.0], [0.0, 4.0])
    r = ClipNorm(10.0)([a, b])
    assert r["total_norm"].item() == 5.0 and r["coef"].item() == 1.0
    assert a.grad.tolist() == [3.0, 0.0] and b.grad.tolist() == [0.0, 4.0]


def test_vector_3_inf_and_l1():
    a, b = _pair([3.0, -7.0], [0.0, 4.0])
    assert ClipNorm(1.0, norm_type=INF)([a, b])["total_norm"].item() == 7.0
    a, b = _pair([3.0, -7.0], [0.0, 4.0])
    assert ClipNorm(1.0, norm_type=1)([a, b])["total_norm"].item() == 14.0


def test_vector_4_coef_formula_matches_clip_grads_with_norm():
    # ALGORITHMS §2 vector 4 is about torch's clip_grads_with_norm_; ClipNorm uses the same formula,
    # so on grads whose total norm is 10 it must equal clip_grads_with_norm_(…, tensor(10.)).
    a, b = _pair([6.0, 0.0], [0.0, 8.0])
    ta, tb = twin([a, b])
    torch.nn.utils.clip_grads_with_norm_([ta, tb], 1.0, torch.tensor(10.0))
    ClipNorm(1.0)([a, b])
    assert_grads_equal([a, b], [ta, tb])
    a, b = _pair([3.0, 0.0], [0.0, 4.0])
    torch.nn.utils.clip_grads_with_norm_([a, b], 1.0, torch.tensor(10.0))
    assert torch.allclose(a.grad, torch.tensor([0.3, 0.0])) and torch.allclose(b.grad, torch.tensor([0.0, 0.4]))


def test_vector_5_clip_value():
    a, b = _pair([3.0, -7.0], [0.5, 4.0])
    r = ClipValue(2.0)([a, b])
    assert a.grad.tolist() == [2.0, -2.0] and b.grad.tolist() == [0.5, 2.0]
    assert r["clip_value"].item() == 2.0


# ---------------------------------------------------------------------------------------------
# random equivalence


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_norm_matches_torch_fp32(norm_type, foreach):
    rng = random.Random(f"clipnorm-{norm_type}-{foreach}")
    for _ in range(60):  # 12 combos x 60 = 720 cases
        ps = random_params(rng)
        max_norm = rng.choice([0.0, 1e-3, 0.1, 1.0, 5.0, 100.0, INF])
        ref = twin(ps)
        if inf_on_empty(ps, norm_type):
            # torch cannot take the inf-norm of an empty tensor; we fail the same way
            with pytest.raises(RuntimeError) as theirs:
                clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=foreach)
            with pytest.raises(RuntimeError) as ours:
                ClipNorm(max_norm, norm_type=norm_type, foreach=foreach)(ps)
            assert str(ours.value) == str(theirs.value)
            assert_grads_equal(ps, ref)
            continue
        want = clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=foreach)
        got = ClipNorm(max_norm, norm_type=norm_type, foreach=foreach)(ps)
        assert bits_equal(got["total_norm"], want), (got["total_norm"], want)
        assert_grads_equal(ps, ref)
        coef = torch.clamp(max_norm / (want + 1e-6), max=1.0)
        assert bits_equal(got["coef"], coef)
        assert bits_equal(got["total_norm_post"], want * coef)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_norm_in_pipeline_reuses_stats_norms(norm_type, monkeypatch):
    """With the statistics pass's norms cached, L2 clipping does no reduction and leaves the
    cache equal to the clipped grads' norms; the result is still bit-identical to torch."""
    rng = random.Random(f"pipeline-{norm_type}")
    real = torch._foreach_norm
    for _ in range(40):
        ps = random_params(rng, nonfinite=0.0)
        if inf_on_empty(ps, norm_type):
            continue
        ref = twin(ps)
        want = clip_grad_norm_(ref, 0.5, norm_type=norm_type)
        ctx = GradContext(ps)
        if not len(ctx):
            continue
        _ = ctx.norms  # the statistics pass
        calls: list = []

        def counting(*a, calls=calls, **k):
            calls.append(a)
            return real(*a, **k)

        monkeypatch.setattr(torch, "_foreach_norm", counting)
        apply_transforms(ctx, [ClipNorm(0.5, norm_type=norm_type)])
        monkeypatch.setattr(torch, "_foreach_norm", real)
        assert (len(calls) == 0) == (norm_type == 2.0)
        assert bits_equal(ctx.reports["clip_norm"]["total_norm"], want)
        assert_grads_equal(ps, ref)
        measured = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in ctx.params])
        torch.testing.assert_close(ctx.norms, measured, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_norm_reduced_precision_close_to_torch(dtype):
    """fp16/bf16: norms in fp32 on purpose, so equal to torch only within rounding."""
    rng = random.Random(f"lowp-{dtype}")
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    checked = 0
    for _ in range(150):
        ps = random_params(rng, dtypes=(dtype, torch.float32), nonfinite=0.0)
        norm_type = rng.choice(NORM_TYPES)
        if inf_on_empty(ps, norm_type):
            continue
        ref = twin(ps)
        want = clip_grad_norm_(ref, 0.5, norm_type=norm_type)
        got = ClipNorm(0.5, norm_type=norm_type)(ps)
        assert got["total_norm"].dtype == torch.float32
        if not torch.isfinite(want):
            continue
        checked += 1
        torch.testing.assert_close(got["total_norm"], want.float(), rtol=tol, atol=0)
        for a, b in zip(ps, ref):
            if a.grad is not None:
                torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=1e-6)
    assert checked > 100


def test_clip_norm_fp16_does_not_overflow_where_torch_does():
    """ALGORITHMS §2: 4 x 40000 in fp16 -> torch's norm is inf and zeroes the grads; ours is 80000."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.full((4,), 40000.0, dtype=torch.float16)
    (q,) = twin([p])
    assert clip_grad_norm_([q], 1.0).item() == INF and q.grad.abs().sum().item() == 0.0
    r = ClipNorm(1.0)([p])
    assert r["total_norm"].item() == 80000.0
    assert torch.allclose(p.grad.float(), torch.full((4,), 0.5), rtol=1e-3)


@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_clip_norm_nonfinite_like_torch(bad):
    a, b = _pair([1.0, 2.0], [3.0, bad])
    ref = twin([a, b])
    want = clip_grad_norm_(ref, 1.0)
    got = ClipNorm(1.0)([a, b])
    assert bits_equal(got["total_norm"], want)
    assert_grads_equal([a, b], ref)
    if math.isnan(bad):
        assert torch.isnan(a.grad).all() and torch.isnan(b.grad).all()
    else:
        assert a.grad.tolist() == [0.0, 0.0] and math.isnan(b.grad[1].item())


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("bad", [INF, NAN])
def test_error_if_nonfinite_same_error_as_torch(norm_type, bad):
    a, b = _pair([1.0, 2.0], [3.0, bad])
    ref = twin([a, b])
    with pytest.raises(RuntimeError) as theirs:
        clip_grad_norm_(ref, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        ClipNorm(1.0, norm_type=norm_type, error_if_nonfinite=True)([a, b])
    assert str(ours.value) == str(theirs.value)
    assert_grads_equal([a, b], ref)  # nothing touched by either
    a, b = _pair([1.0, 2.0], [3.0, 4.0])
    ref = twin([a, b])
    assert bits_equal(ClipNorm(1.0, norm_type=norm_type, error_if_nonfinite=True)([a, b])["total_norm"],
                      clip_grad_norm_(ref, 1.0, norm_type=norm_type, error_if_nonfinite=True))
    assert_grads_equal([a, b], ref)


def test_empty_and_all_none():
    assert ClipNorm(1.0)([])["total_norm"].item() == clip_grad_norm_([], 1.0).item() == 0.0
    p = torch.nn.Parameter(torch.ones(3))
    r = ClipNorm(1.0)([p])
    assert r["total_norm"].item() == 0.0 and r["coef"].item() == 1.0 and p.grad is None
    with pytest.warns(UserWarning, match="empty generator"):
        ClipNorm(1.0)(x for x in [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClipNorm(1.0)([])  # a list is not a generator: no warning, as in torch


def test_single_tensor_argument():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    (q,) = twin([p])
    assert bits_equal(ClipNorm(1.0)(p)["total_norm"], clip_grad_norm_(q, 1.0))
    assert_grads_equal([p], [q])


def test_sparse_grads_are_skipped():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 2)
    lin(emb(torch.tensor([1, 2, 1]))).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(NotImplementedError):
        clip_grad_norm_(list(emb.parameters()), 0.1)
    sparse_before = emb.weight.grad.to_dense().clone()
    ref = twin(list(lin.parameters()))
    want = clip_grad_norm_(ref, 0.1)
    got = ClipNorm(0.1)(list(emb.parameters()) + list(lin.parameters()))
    assert bits_equal(got["total_norm"], want)
    assert_grads_equal(list(lin.parameters()), ref)
    assert torch.equal(emb.weight.grad.to_dense(), sparse_before)


def test_foreach_true_on_unsupported_device_raises_like_torch():
    p = torch.nn.Parameter(torch.zeros(2, device="meta"))
    p.grad = torch.zeros(2, device="meta")
    with pytest.raises(RuntimeError, match="foreach=True was passed, but can't use the foreach API on meta tensors"):
        ClipNorm(1.0, foreach=True, norm_type=3.0)([p])
    with pytest.raises(RuntimeError, match="foreach=True was passed, but can't use the foreach API on meta tensors"):
        ClipValue(1.0, foreach=True)([p])


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_value_matches_torch(foreach):
    rng = random.Random(f"clipvalue-{foreach}")
    for _ in range(150):
        ps = random_params(rng, dtypes=(torch.float32, torch.float32, torch.float16, torch.bfloat16))
        v = rng.choice([0.0, 1e-3, 0.05, 1.0, 10.0, INF])
        ref = twin(ps)
        if all(p.grad is None for p in ps):
            continue  # torch crashes there (test_clip_value_without_grads_is_a_noop)
        clip_grad_value_(ref, v, foreach=foreach)
        order = GradContext(ps).params  # reports are aligned with torch's (device, dtype) order
        before = [p.grad.clone() for p in order]
        r = ClipValue(v, foreach=foreach, count_clipped=True)(ps)
        assert_grads_equal(ps, ref)
        if r:
            assert r["clip_value"].item() == torch.tensor(v).item()
            expect = [(g.abs() > v).sum().item() for g in before]
            assert r["clipped"].tolist() == expect


def test_clip_value_without_grads_is_a_noop():
    """Deliberate deviation: torch 2.13's clip_grad_value_ fails on an internal check when no
    parameter has a gradient; ours does nothing, like clip_grad_norm_ does."""
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError):
        clip_grad_value_([p], 1.0)
    assert ClipValue(1.0)([p]) == {} and p.grad is None
    assert ClipValue(1.0)([]) == {}


def test_clip_value_inf_is_noop_and_nan_stays():
    a, b = _pair([3.0, NAN], [-1e30, 4.0])
    ClipValue(INF)([a, b])
    assert a.grad[0].item() == 3.0 and math.isnan(a.grad[1].item()) and b.grad.tolist() == torch.tensor([-1e30, 4.0]).tolist()
    ClipValue(1.0)([a, b])
    assert a.grad[0].item() == 1.0 and math.isnan(a.grad[1].item()) and b.grad.tolist() == [-1.0, 1.0]


def test_clip_value_invalidates_cached_norms_clip_norm_keeps_them():
    a, b = _pair([3.0, -7.0], [0.5, 4.0])
    ctx = GradContext([a, b])
    _ = ctx.norms
    apply_transforms(ctx, order_transforms([ClipNorm(100.0), ClipValue(2.0)]))
    want = torch.stack([torch.linalg.vector_norm(a.grad), torch.linalg.vector_norm(b.grad)])
    torch.testing.assert_close(ctx.norms, want)
    assert [t.name for t in order_transforms([ClipNorm(1.0), ClipValue(1.0)])] == ["clip_value", "clip_norm"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ClipNorm(-1.0),
        lambda: ClipNorm(NAN),
        lambda: ClipNorm("big"),
        lambda: ClipNorm(True),
        lambda: ClipNorm(1.0, norm_type=0),
        lambda: ClipNorm(1.0, norm_type=-2.0),
        lambda: ClipNorm(1.0, norm_type=NAN),
        lambda: ClipNorm(1.0, foreach="yes"),
        lambda: ClipValue(-0.5),
        lambda: ClipValue(NAN),
        lambda: ClipValue(1.0, foreach=1),
    ],
)
def test_invalid_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_accepted_edge_arguments_match_torch():
    for max_norm in (0.0, INF, 1):
        a, b = _pair([3.0, 0.0], [0.0, 4.0])
        ref = twin([a, b])
        clip_grad_norm_(ref, max_norm)
        ClipNorm(max_norm)([a, b])
        assert_grads_equal([a, b], ref)
    a, b = _pair([3.0, 0.0], [0.0, 4.0])
    ref = twin([a, b])
    clip_grad_norm_(ref, 1.0, norm_type="inf")
    ClipNorm(1.0, norm_type="inf")([a, b])
    assert_grads_equal([a, b], ref)


def test_clip_events():
    t = ClipNorm(1.0)
    assert t.events({"coef": 0.5, "total_norm": 2.0}) == [
        ("clip", {"transform": "clip_norm", "total_norm": 2.0, "coef": 0.5, "max_norm": 1.0})
    ]
    assert t.events({"coef": 1.0, "total_norm": 0.5}) == []
    assert t.events({"coef": NAN, "total_norm": NAN}) == []
    assert ClipValue(1.0).events({"clip_value": 1.0}) == []
    assert ClipValue(1.0).events({"clip_value": 1.0, "clipped": [0.0, 3.0]})[0][1]["clipped"] == 3.0


def test_report_needs_no_host_sync_and_state_is_empty():
    t = ClipNorm(1.0)
    assert t.state_dict() == {}
    a, b = _pair([3.0, 0.0], [0.0, 4.0])
    r = t([a, b])
    assert set(r) == {"total_norm", "total_norm_post", "coef", "max_norm"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in r.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_norm_and_value_match_torch_cuda(norm_type, foreach):
    rng = random.Random(f"cuda-{norm_type}-{foreach}")
    for _ in range(30):
        ps = random_params(rng, device="cuda")
        if inf_on_empty(ps, norm_type):
            continue
        max_norm = rng.choice([0.0, 0.1, 1.0, 100.0])
        ref = twin(ps)
        want = clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=foreach)
        got = ClipNorm(max_norm, norm_type=norm_type, foreach=foreach)(ps)
        assert bits_equal(got["total_norm"], want)
        assert_grads_equal(ps, ref)
        if any(p.grad is not None for p in ref):  # torch 2.11's foreach grouping refuses an empty list
            clip_grad_value_(ref, 0.01, foreach=foreach)
        ClipValue(0.01, foreach=foreach)(ps)
        assert_grads_equal(ps, ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clip_norm_has_no_host_sync_cuda():
    ps = random_params(random.Random(1), device="cuda", nonfinite=0.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ClipNorm(1.0)(ps)
        ClipValue(1.0)(ps)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_clip_value_one_pass_on_large_tensors_matches_torch_bit_for_bit():
    """foreach=None clamps tensors of >= _ONE_PASS_NUMEL elements with one clamp_ (torch: the
    foreach clamp_min_/clamp_max_ pair): same elements, signed zeros, NaN and inf included."""
    from gradwatch.agent.transforms.clip import _ONE_PASS_NUMEL

    rng = random.Random("clipvalue-large")
    gen = torch.Generator().manual_seed(7)
    for case in range(12):
        ps = []
        for _ in range(rng.randint(1, 4)):
            n = rng.choice([_ONE_PASS_NUMEL - 1, _ONE_PASS_NUMEL, 3 * _ONE_PASS_NUMEL + 5, 17, 0])
            dt = rng.choice([torch.float32, torch.float16, torch.bfloat16])
            g = torch.randn(n, generator=gen) * 10 ** rng.uniform(-3, 1)
            if n:
                k = torch.randint(0, n, (8,), generator=gen)
                g[k] = torch.tensor([0.0, -0.0, INF, -INF, NAN, 0.0, -0.0, NAN])
            g = g.to(dt).reshape(-1, 1) if n % 2 else g.to(dt)
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=dt))
            p.grad = g
            ps.append(p)
        v = rng.choice([0.0, 1e-3, 0.05, 1.0, INF])
        ref = twin(ps)
        clip_grad_value_(ref, v)
        ClipValue(v)(ps)
        for a, b in zip(ps, ref):
            assert bits_equal(a.grad, b.grad) and torch.equal(torch.signbit(a.grad), torch.signbit(b.grad)), case
