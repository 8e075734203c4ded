"""gradwatch.agent.stats against a naive per-tensor torch reference (definitions: docs/statistics.md)."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch.agent.stats import (
    HostCopy,
    finalize,
    layer_moments,
    merge,
    pack_dtype,
    row_norms,
    row_stats,
    row_sums,
)


def _ref(t: torch.Tensor) -> tuple[int, float, float, float, float, float, int]:
    """n, mean, var (population), std, l2, maxabs, nonfinite in float64, one tensor at a time."""
    x = t.detach().to(torch.float64).reshape(-1)
    n = x.numel()
    if n == 0:
        return 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0
    return (n, x.mean().item(), x.var(correction=0).item(), x.std(correction=0).item(), x.norm().item(),
            x.abs().max().item(), int((~torch.isfinite(x)).sum()))


def _stats(grads: list[torch.Tensor], **kw):  # type: ignore[no-untyped-def]
    m = layer_moments(grads, **kw).tolist()
    return [finalize(g.numel(), *row) for g, row in zip(grads, m)]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_matches_naive_reference(dtype: torch.dtype, rtol: float) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (128,), (16, 4, 3, 3), (1,), (0,), (33, 5)]
    grads = [(torch.randn(s, generator=g) * 0.3 + 0.05).to(dtype) for s in shapes]
    for t, st in zip(grads, _stats(grads)):
        n, mean, var, std, l2, mx, nf = _ref(t)
        assert st.numel == n and st.nonfinite == nf == 0
        for got, want in ((st.mean, mean), (st.l2, l2), (st.maxabs, mx)):
            assert got == pytest.approx(want, rel=rtol, abs=1e-6)
        # var from the centred M2 is as exact as the reference, low-precision inputs included
        assert st.var == pytest.approx(var, rel=1e-6, abs=1e-12)
        assert st.std == pytest.approx(std, rel=1e-6, abs=1e-9)


def test_mixed_dtypes_keep_input_order() -> None:
    grads = [torch.full((3,), 1.0), torch.full((2,), 2.0, dtype=torch.bfloat16), torch.full((4,), -3.0),
             torch.full((1,), 5.0, dtype=torch.float16)]
    m = layer_moments(grads)
    assert m[:, 0].tolist() == [3.0, 4.0, -12.0, 5.0]
    assert m.dtype == torch.float32


def test_vectors_from_algorithms_md() -> None:
    (a,) = _stats([torch.tensor([3.0])])
    assert (a.numel, a.mean, a.var, a.std, a.l2, a.maxabs, a.nonfinite) == (1, 3.0, 0.0, 0.0, 3.0, 3.0, 0)
    (b,) = _stats([torch.tensor([1.0, -3.0])])
    assert (b.numel, b.mean, b.maxabs) == (2, -1.0, 3.0)
    # var comes from the centred M2 (exact here), not from l2**2/n - mean**2
    assert b.var == 4.0 and b.std == 2.0
    assert b.l2 == pytest.approx(math.sqrt(10), rel=1e-7)
    # merge([1,-3], [2,2]) == stats of [1,-3,2,2]
    ma = (2, -2.0, math.sqrt(10), 3.0, 0.0, 8.0)
    mb = (2, 4.0, math.sqrt(8), 2.0, 0.0, 0.0)
    n, s1, l2, mx, nf, m2 = merge(ma, mb)
    st = finalize(n, s1, l2, mx, nf, m2)
    assert (st.numel, st.mean, st.maxabs) == (4, 0.5, 3.0)
    assert st.var == pytest.approx(4.25, rel=1e-12)
    assert l2 * l2 == pytest.approx(18.0, rel=1e-12)
    (c,) = _stats([torch.tensor([float("nan"), 2.0])])
    assert c.nonfinite == 1 and math.isnan(c.l2) and math.isnan(c.maxabs)


@pytest.mark.parametrize("eager", [False, True])
def test_nonfinite_counts_exact(eager: bool) -> None:
    inf = float("inf")
    grads = [torch.tensor([1.0, inf, -inf, 2.0]), torch.tensor([float("nan")] * 3 + [0.0]),
             torch.tensor([1e30, 1e30]), torch.ones(5)]
    m = layer_moments(grads, eager_nonfinite=eager)
    assert m[:, 3].tolist() == [2.0, 3.0, 0.0, 0.0]
    # 1e30 overflows the fp32 norm but every element is finite: the lazy rule recounts
    assert math.isinf(m[2, 1].item())


def test_empty_and_single_element() -> None:
    sts = _stats([torch.zeros(0), torch.tensor([-2.5]), torch.zeros(0, 3, dtype=torch.bfloat16)])
    assert sts[0].numel == 0 and sts[0].mean == 0.0 and sts[0].l2 == 0.0
    assert (sts[1].mean, sts[1].var, sts[1].std, sts[1].maxabs) == (-2.5, 0.0, 0.0, 2.5)
    assert sts[2].numel == 0
    assert layer_moments([]).shape == (0, 5)


def test_sparse_values_path() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 1, 4])).sum().backward()
    g = emb.weight.grad
    assert g.is_sparse
    vals = g.coalesce()._values()
    (st,) = _stats([vals])
    n, mean, var, *_ = _ref(vals)
    assert st.numel == 6 and st.mean == pytest.approx(mean) and st.var == pytest.approx(var, rel=1e-5)


def test_cancellation_is_clamped_not_negative() -> None:
    st = finalize(3, 3e8, math.sqrt(3) * 1e8, 1e8, 0, -1e-3)  # three equal values: M2 0 up to rounding
    assert st.var >= 0.0 and st.std >= 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_stats_feed_the_layer_columns(dtype: torch.dtype) -> None:
    """Tensors measured row-wise (for Centralize/AGC) get their layer sum and L2 norm from their
    rows: the same values as the direct reductions up to fp32 summation order; the other columns
    and the other tensors are unchanged, NaN/inf included."""
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 3), (128,), (16, 4, 3, 3), (1, 5), (0, 4), (33, 5), (2, 1, 2, 3, 2)]
    for case in range(20):
        grads = [(torch.randn(s, generator=g) * 0.3 + 0.05).to(dtype) for s in shapes]
        if case % 4 == 1:
            grads[2].view(-1)[5] = float("nan")
        if case % 4 == 2:
            grads[5][3, 1] = float("inf")
        sums_for, norms_for = [0, 2, 4, 6] if case % 2 else [5], [0, 2, 5, 3] if case % 3 else []
        rows = row_stats(grads, sums_for, norms_for)
        assert set(rows.sums) == set(sums_for) - {4} and set(rows.norms) == set(norms_for)  # (0, 4): no rows
        for i, r in rows.sums.items():
            want = grads[i].sum(dim=tuple(range(1, grads[i].ndim)), dtype=torch.float32)
            assert r.dtype == torch.float32 and torch.equal(r.nan_to_num(), want.nan_to_num())
            assert torch.equal(row_sums(grads[i]).nan_to_num(), r.nan_to_num())
        for i, r in rows.norms.items():
            assert torch.equal(row_norms(grads[i]).nan_to_num(), r.nan_to_num()) and r.shape == (grads[i].shape[0],)
        direct, derived = layer_moments(grads), layer_moments(grads, rows=rows)
        for i in range(len(grads)):
            a, b = direct[i], derived[i]
            assert torch.equal(a[2:4].nan_to_num(), b[2:4].nan_to_num())  # maxabs, nonfinite: not from rows
            # M2 is centred on the sum's mean, whose rounding may differ: the same up to rounding
            assert torch.allclose(a[4], b[4], rtol=1e-5, atol=1e-6, equal_nan=True)
            if i not in rows.sums and i not in rows.norms:
                assert torch.equal(a.nan_to_num(), b.nan_to_num())
                continue
            assert torch.equal(torch.isfinite(a), torch.isfinite(b))
            fin = torch.isfinite(a[:2])
            torch.testing.assert_close(b[:2][fin], a[:2][fin], rtol=2e-6, atol=1e-6)


def test_host_copy_cpu_roundtrip() -> None:
    packed = torch.tensor([1.0, float("nan"), 3.5], dtype=pack_dtype(torch.device("cpu")))
    vals = HostCopy().submit(packed).values()
    assert vals[0] == 1.0 and math.isnan(vals[1]) and vals[2] == 3.5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_moments_no_sync_and_pinned_ring() -> None:
    grads = [torch.randn(100, device="cuda"), torch.randn(7, 3, device="cuda", dtype=torch.bfloat16)]
    grads[0][3] = float("nan")
    hc = HostCopy(ring=2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m = layer_moments(grads)
        pend = hc.submit(m.reshape(-1).to(torch.float64))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    vals = pend.values()
    assert vals[3] == 1.0  # non-finite count of the first grad, counted eagerly on device
    assert pend._buf.is_pinned()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_cuda_moments_match_float64_reference(dtype: torch.dtype, rtol: float) -> None:
    """The accelerator route on random shapes (empty, one element, past a chunk: 2^22 + 3), a
    |mean| far above the std, NaN and ±inf: counts exact, variance within 1e-6 of a float64
    two-pass reference of the same values, the other columns within the dtype's rounding."""
    g = torch.Generator().manual_seed(11)
    mean = 1e4 if dtype == torch.float32 else 30.0
    grads = [(torch.randn(s, generator=g) * 0.3 + 0.05).to(dtype) for s in [(7, 3), (0,), (1,), (16, 4, 3, 3), ((1 << 22) + 3,)]]
    grads += [(torch.randn(5000, generator=g, dtype=torch.float64) + mean).to(dtype),
              torch.cat([grads[3].reshape(-1), torch.tensor([float("inf"), 1.0], dtype=dtype)]),
              torch.cat([grads[0].reshape(-1), torch.tensor([float("-inf"), float("inf")], dtype=dtype)]),
              torch.cat([grads[0].reshape(-1), torch.tensor([float("nan")], dtype=dtype)])]
    got = _stats([t.cuda() for t in grads])
    for k, (t, st) in enumerate(zip(grads, got)):
        n, mean_, var, std, l2, mx, nf = _ref(t)
        assert st.numel == n and st.nonfinite == nf, k
        want_mean, want_var = _two_pass(t) if n else (0.0, 0.0)
        if nf:
            assert not math.isfinite(st.l2) and not math.isfinite(st.var), k
            continue
        assert st.var == pytest.approx(want_var, rel=1e-6, abs=1e-12 * max(1.0, want_mean**2)), k
        for a, b in ((st.mean, mean_), (st.l2, l2), (st.maxabs, mx)):
            assert a == pytest.approx(b, rel=rtol, abs=1e-6), k


def _two_pass(t: torch.Tensor) -> tuple[float, float]:
    """float64 two-pass mean and population variance of the same values (NaN/inf propagate)."""
    x = t.detach().to(torch.float64).reshape(-1)
    mean = x.sum() / x.numel()
    return mean.item(), ((x - mean) ** 2).sum().item() / x.numel()


def _close(got: float, want: float, rel: float, scale: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return got == want or abs(got - want) <= rel * abs(want) + 1e-12 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(8))
def test_variance_exact_where_mean_dwarfs_std(dtype: torch.dtype, seed: int) -> None:
    """Recorded variance within 1e-6 relative of a float64 two-pass reference computed from the
    same gradient values, with |mean| = 1e4·std, one element, all-equal elements, ±inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 5000, (1,), generator=g))
    std = 10.0 ** float(torch.empty(1).uniform_(-3, 1, generator=g))
    sign = 1.0 if seed % 2 else -1.0
    mean = sign * 1e4 * std if dtype == torch.float32 else sign * 30.0 * std  # fp16's range stops at 65504
    big = (torch.randn(n, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    grads = [big, torch.full((1,), mean, dtype=dtype), torch.full((n,), mean, dtype=dtype),
             torch.cat([big[:-2], torch.tensor([float("inf"), 1.0], dtype=dtype)]),
             torch.cat([big[:-2], torch.tensor([float("-inf"), float("inf")], dtype=dtype)]),
             torch.cat([big[:-1], torch.tensor([float("nan")], dtype=dtype)]),
             (torch.randn(n, generator=g) * std).to(dtype)]
    for k, (t, st) in enumerate(zip(grads, _stats(grads))):
        want_mean, want_var = _two_pass(t)
        scale = want_mean * want_mean if math.isfinite(want_mean) else 1.0
        assert _close(st.var, want_var, 1e-6, scale), (k, st.var, want_var)
        assert _close(st.mean, want_mean, 1e-6, abs(want_mean) if math.isfinite(want_mean) else 1.0), k


def test_naive_formula_fails_where_m2_holds() -> None:
    """The old ``l2²/n − mean²`` is off by orders of magnitude at |mean| = 1e4·std; M2 is not."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(100_000, generator=g) * 0.01 + 100.0
    want = _two_pass(t)[1]
    m = layer_moments([t]).double()[0]
    naive = (m[1] ** 2 / t.numel() - (m[0] / t.numel()) ** 2).item()
    (st,) = _stats([t])
    assert abs(naive - want) / want > 1e-2
    assert abs(st.var - want) / want < 1e-6


def test_merged_moments_equal_the_concatenation() -> None:
    """Chan's merge over parts (ranks, steps of a block, blocks of a bucket) gives the moments of
    the concatenated values."""
    from gradwatch.agent.spec import Moments, merge_all

    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(int(k), generator=g, dtype=torch.float64) * s + 1e4 * s
             for k, s in ((1, 1.0), (17, 2.0), (300, 0.5), (2, 3.0), (1000, 1.0))]
    mom = [Moments(p.numel(), p.mean().item(), ((p - p.mean()) ** 2).sum().item()) for p in parts]
    got = merge_all(mom)
    mean, var = _two_pass(torch.cat(parts))
    assert got.n == sum(p.numel() for p in parts)
    assert got.mean == pytest.approx(mean, rel=1e-12) and got.var == pytest.approx(var, rel=1e-9)
