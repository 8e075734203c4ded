"""The statistics pass costs one aten op per gradient tensor plus a constant per (device, dtype)
group (issue 10, point 5), counted with ``TorchDispatchMode`` on many layouts; and it stays exact
on the chunked route (docs/statistics.md, "How the moments are computed").

The constant :data:`C` does not depend on the tensor count: the layouts go from 1 to 400 tensors
with the same bound, so a route with two ops per tensor (the previous one: 704 ops at 302
tensors) fails here from ~130 tensors on.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch.agent.stats as stats
from gradwatch.agent import AutoscaledNorm, ClipNorm, watch
from gradwatch.agent.stats import finalize, layer_moments

#: ops per (device, dtype) group beyond one per tensor (statistics pass; at most
#: ``_MAX_CHUNKS + 1`` chunks of 8 foreach ops each, plus the packing around them)
C = 110
#: the same for a whole recorded step (packing the record, the ‖w‖ pass, the transforms)
C_STEP = 160

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Count(TorchDispatchMode):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += 1
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _shape(rng: random.Random) -> tuple[int, ...]:
    kind = rng.random()
    if kind < 0.05:
        return (0,) if rng.random() < 0.5 else (0, rng.randint(1, 4))
    if kind < 0.1:
        return ()
    if kind < 0.4:
        return (rng.randint(1, 300),)
    if kind < 0.8:
        return (rng.randint(1, 64), rng.randint(1, 64))
    if kind < 0.97:
        return (rng.randint(1, 16), rng.randint(1, 8), 3, 3)
    return (rng.randint(300, 700), 512)  # past one chunk


def _layout(seed: int, n: int, dtypes: tuple[torch.dtype, ...]) -> list[torch.Tensor]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randn(_shape(rng), generator=g) * 10 ** rng.uniform(-3, 1) + rng.choice((0.0, 0.0, 5.0, -1e-2))
        out.append(t.to(rng.choice(dtypes)))
    return out


def _groups(ts: list[torch.Tensor]) -> int:
    return len({(t.device, t.dtype) for t in ts})


#: ops of the CPU per-tensor route beyond the tensor's sum (amax, amin, view, slice, sub,
#: square_, sum)
LARGE_OPS = 7


def _large(ts: list[torch.Tensor]) -> int:
    """Tensors the CPU per-tensor route measures (docs/statistics.md): each costs LARGE_OPS more."""
    return sum(1 for t in ts if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
               and t.numel() >= stats._LARGE and t.is_contiguous())


@pytest.mark.parametrize("n", [1, 2, 5, 17, 60, 150, 302, 400])
@pytest.mark.parametrize("dtypes", [(torch.float32,), _DTYPES])
@pytest.mark.parametrize("eager", [False, True])
def test_statistics_pass_is_one_op_per_tensor_plus_a_constant(n: int, dtypes: tuple[torch.dtype, ...], eager: bool) -> None:
    for seed in range(2):
        grads = _layout(1000 * n + seed, n, dtypes)
        with _Count() as c:
            layer_moments(grads, eager_nonfinite=eager)
        assert c.n <= n + LARGE_OPS * _large(grads) + C * _groups(grads), (n, c.n, sorted(c.ops.items(), key=lambda kv: -kv[1])[:8])


def test_non_finite_everywhere_costs_no_op_per_tensor() -> None:
    """An overflowing step (every gradient has an inf, as under a too-large loss scale): the CPU
    route counts the non-finite elements of every tensor, still with foreach ops."""
    grads = _layout(7, 300, (torch.float32,))
    for t in grads:
        if t.numel():
            t.view(-1)[0] = float("inf")
    with _Count() as c:
        m = layer_moments(grads)
    assert c.n <= 300 + LARGE_OPS * _large(grads) + C
    assert m[:, 3].tolist() == [1.0 if t.numel() else 0.0 for t in grads]


class _Params(nn.Module):
    """Parameters of mixed shapes and dtypes; a few never get a gradient (None grads)."""

    def __init__(self, seed: int, n: int, dtypes: tuple[torch.dtype, ...]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(t) for t in _layout(seed, n, dtypes)])
        rng = random.Random(seed + 1)
        self.unused = {i for i in range(n) if rng.random() < 0.1}

    def loss(self, step: int) -> torch.Tensor:
        total = torch.zeros(())
        for i, p in enumerate(self.ps):
            if i not in self.unused:
                total = total + (p.float() * (1.0 + 0.1 * ((i + step) % 7))).square().mean()
        return total


def _step_ops(model: _Params, opt: torch.optim.Optimizer, step: int, standalone: list[Any] = ()) -> int:
    opt.zero_grad(set_to_none=True)
    model.loss(step).backward()
    with _Count() as c:
        for t in standalone:
            t([p for p in model.ps if p.grad is not None])
        opt.step()
    return c.n


def _transforms(kind: str) -> list[Any]:
    return {"none": [], "clip": [ClipNorm(1.0)], "autoscaled": [AutoscaledNorm()]}[kind]


@pytest.mark.parametrize("n", [1, 9, 150, 400])
@pytest.mark.parametrize("dtypes", [(torch.float32,), _DTYPES])
@pytest.mark.parametrize("transforms", ["none", "clip", "autoscaled"])
def test_recorded_step_is_one_op_per_tensor_plus_a_constant(n: int, dtypes: tuple[torch.dtype, ...], transforms: str) -> None:
    """A whole watched ``optimizer.step()`` (every= 2, with transforms) against an unwatched twin
    on the same layout that runs the same transforms by hand: what watching adds stays under
    n + C_STEP per group on recorded steps, under a constant on the others. (The transforms'
    own edits are in both; inside watch() they reuse the statistics pass's sums and norms.)"""
    seed = 77 * n + len(dtypes)
    base, watched = _Params(seed, n, dtypes), _Params(seed, n, dtypes)
    opt_b = torch.optim.SGD(base.parameters(), lr=1e-3)
    opt_w = torch.optim.SGD(watched.parameters(), lr=1e-3)
    by_hand = _transforms(transforms)
    w = watch(watched, opt_w, server="memory", every=2, transforms=_transforms(transforms))
    try:
        with_grad = [p for i, p in enumerate(watched.ps) if i not in watched.unused]
        k = len(with_grad)
        groups = max(_groups([p.detach() for p in with_grad]), 1)
        for step in range(4):
            extra = _step_ops(watched, opt_w, step) - _step_ops(base, opt_b, step, by_hand)
            recorded = k + LARGE_OPS * _large([p.grad for p in with_grad]) + C_STEP * groups
            bound = recorded if step % 2 == 0 else C_STEP * groups  # recorded: steps 0, 2
            assert extra <= bound, (n, step, extra, bound)
    finally:
        w.close()


def _ref(t: torch.Tensor) -> tuple[float, float, float, float, int]:
    """float64 two-pass mean, M2, l2, maxabs, non-finite count of the same values."""
    x = t.detach().to(torch.float64).reshape(-1)
    if x.numel() == 0:
        return 0.0, 0.0, 0.0, 0.0, 0
    mean = x.sum() / x.numel()
    return (mean.item(), ((x - mean) ** 2).sum().item(), x.norm().item(), x.abs().max().item(),
            int((~torch.isfinite(x)).sum()))


def _close(got: float, want: float, rel: float, floor: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return got == want or abs(got - want) <= rel * abs(want) + floor


def _check_against_reference(grads: list[torch.Tensor], eager: bool) -> None:
    """layer_moments of ``grads`` against the float64 two-pass reference: M2 within 1e-6,
    max-abs and counts exact (float64 inputs: up to the float32 result's rounding), mean and
    l2 to fp32 rounding, NaN/±inf propagating."""
    m = layer_moments(grads, eager_nonfinite=eager).tolist()
    for t, row in zip(grads, m):
        st = finalize(t.numel(), *row)
        mean, m2, l2, mx, nf = _ref(t)
        if t.dtype == torch.float64:
            mx = torch.tensor(mx, dtype=torch.float32).item()
        assert st.nonfinite == nf
        assert _close(st.maxabs, mx, 0.0, 0.0), (st.maxabs, mx)
        fin = nf == 0
        n = max(t.numel(), 1)
        assert _close(st.m2, m2 if fin else math.nan, 1e-6, 1e-12 * n * mean * mean), (t.dtype, t.shape, st.m2, m2)
        if fin:
            assert _close(st.mean, mean, 1e-6, 1e-6 * l2 / math.sqrt(n))
            assert _close(st.l2, l2, 1e-4, 0.0)


@pytest.mark.parametrize("chunk,max_chunks", [(64, 3), (1000, 2), (1 << 17, 8)])
@pytest.mark.parametrize("eager", [False, True])
def test_chunked_moments_match_float64_reference(monkeypatch: pytest.MonkeyPatch, chunk: int, max_chunks: int,
                                                 eager: bool) -> None:
    """Random layouts cut into chunks at every boundary (small chunks, chunks grown past the
    cap, one tensor per chunk) against a float64 two-pass reference: M2 within 1e-6, max-abs
    and counts exact, mean and l2 to fp32 rounding; with |mean| ≫ std, empties, ±inf and NaN."""
    monkeypatch.setattr(stats, "_CHUNK", chunk)
    monkeypatch.setattr(stats, "_MAX_CHUNKS", max_chunks)
    for seed in range(6):
        rng = random.Random(seed)
        grads = _layout(seed, rng.randint(1, 40), _DTYPES)
        for t in grads:
            if t.numel() > 1 and rng.random() < 0.15:
                t.view(-1)[rng.randrange(t.numel())] = rng.choice((float("inf"), float("-inf"), float("nan")))
        big = torch.randn(3000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.01 + 100.0
        grads.insert(rng.randrange(len(grads) + 1), big.float())  # |mean| = 1e4·std
        _check_against_reference(grads, eager)


def _hard_layout(seed: int, big_n: int) -> list[torch.Tensor]:
    """A random layout of fp16/bf16/fp32/fp64 tensors, some holding NaN/±inf, with two tensors of
    ``big_n`` elements at |mean| = 1e4·std (fp32 and fp64) inserted at random places."""
    rng = random.Random(seed)
    grads = _layout(seed, rng.randint(1, 40), _DTYPES + (torch.float64,))
    for t in grads:
        if t.numel() > 1 and rng.random() < 0.15:
            t.view(-1)[rng.randrange(t.numel())] = rng.choice((float("inf"), float("-inf"), float("nan")))
    big = torch.randn(big_n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.01 + 100.0
    grads.insert(rng.randrange(len(grads) + 1), big.float())  # |mean| = 1e4·std
    grads.insert(rng.randrange(len(grads) + 1), big.clone())
    return grads


@pytest.mark.parametrize("large,scratch", [(50, 1 << 22), (50, 77), (3000, 1000)])
@pytest.mark.parametrize("eager", [False, True])
def test_cpu_large_tensor_route_matches_float64_reference(monkeypatch: pytest.MonkeyPatch, large: int, scratch: int,
                                                          eager: bool) -> None:
    """The CPU per-tensor route for large fp32/fp64 tensors (thresholds lowered so that random
    layouts take it; a small scratch makes tensors go slice by slice) against the float64
    two-pass reference, mixed with the chunk route in one call: M2 within 1e-6 where
    |mean| = 1e4·std, max-abs and counts exact, NaN/±inf propagating."""
    monkeypatch.setattr(stats, "_LARGE", large)
    monkeypatch.setattr(stats, "_SCRATCH", scratch)
    took = 0
    for seed in range(6):
        grads = _hard_layout(seed, 5000)
        took += _large(grads)
        _check_against_reference(grads, eager)
    assert took >= 12  # the route was exercised (the two big tensors of every layout at least)


def test_chunks_are_bounded_whatever_the_tensor_count() -> None:
    class _T:
        def __init__(self, n: int) -> None:
            self.n = n

        def numel(self) -> int:
            return self.n

    rng = random.Random(0)
    for _ in range(500):
        sizes = [rng.choice((1, 100, 1 << 14, 1 << 17, 1 << 20, rng.randint(0, 1 << 18))) for _ in range(rng.randint(1, 500))]
        ch = stats._chunks([_T(s) for s in sizes])  # type: ignore[list-item]
        assert len(ch) <= stats._MAX_CHUNKS + 1
        assert ch[0][0] == 0 and ch[-1][1] == len(sizes)
        assert all(a < b for a, b in ch) and all(ch[i][1] == ch[i + 1][0] for i in range(len(ch) - 1))
    assert stats._chunks([]) == []


# -- the accelerators' concatenated route for small tensors (forced on CPU here) -------------------


@pytest.mark.parametrize("flat_max,flat_chunk", [(1 << 20, 1 << 23), (200, 50), (3000, 2500)])
def test_flat_route_matches_float64_reference(monkeypatch: pytest.MonkeyPatch, flat_max: int, flat_chunk: int) -> None:
    """Small tensors concatenated and reduced by segment (as on accelerators; thresholds lowered
    so that some layouts mix both routes and cut concatenations at every boundary) against the
    float64 two-pass reference: M2 within 1e-6 where |mean| = 1e4·std, max-abs and counts exact,
    NaN/±inf propagating, fp16/bf16/fp32/fp64, empties."""
    monkeypatch.setattr(stats, "_flat_route", lambda dev: True)
    monkeypatch.setattr(stats, "_FLAT_MAX", flat_max)
    monkeypatch.setattr(stats, "_FLAT_CHUNK", flat_chunk)
    calls = {"flat": 0}
    real = stats._moments_flat

    def spy(ts: Any, *a: Any, **k: Any) -> torch.Tensor:
        calls["flat"] += len(ts)
        return real(ts, *a, **k)
    monkeypatch.setattr(stats, "_moments_flat", spy)
    for seed in range(8):
        grads = _hard_layout(seed, 2000)
        _check_against_reference(grads, True)
    assert calls["flat"] > 0


@pytest.mark.parametrize("seed", range(6))
def test_flat_route_counts_match_the_foreach_route(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Non-zero and small (loss-scale underflow) counts, max-abs and the non-finite count of the
    concatenated route equal the foreach route's exactly; sums and norms agree to fp32 rounding."""
    rng = random.Random(seed)
    grads = _layout(seed, rng.randint(1, 40), _DTYPES + (torch.float64,))
    for t in grads:
        flat = t.view(-1)
        if flat.numel() > 2:
            flat[: rng.randrange(flat.numel())] = 0
            flat[rng.randrange(flat.numel())] = rng.choice((float("inf"), float("-inf"), float("nan"), 1e-9))
    mult = torch.tensor(2.0 ** rng.randint(0, 24) * 2.0**14)
    want = layer_moments(grads, counts=True, small_mult=mult, eager_nonfinite=True)
    monkeypatch.setattr(stats, "_flat_route", lambda dev: True)
    got = layer_moments(grads, counts=True, small_mult=mult)
    for col in (2, 3, 5, 6):
        assert torch.equal(got[:, col].nan_to_num(-1.0), want[:, col].nan_to_num(-1.0)), col
    torch.testing.assert_close(got[:, :2], want[:, :2], rtol=2e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(got[:, 1].nan_to_num(-1.0), want[:, 1].nan_to_num(-1.0))  # l2: the same foreach norm


@pytest.mark.parametrize("n", [1, 17, 150, 400])
def test_flat_route_op_count_does_not_grow_with_the_tensor_count(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Small tensors on the concatenated route: a constant number of aten ops per (device, dtype)
    group and concatenation, with the counts too, besides one view per tensor (no kernel)."""
    monkeypatch.setattr(stats, "_flat_route", lambda dev: True)
    g = torch.Generator().manual_seed(n)
    grads = [torch.randn(int(torch.randint(1, 500, (1,), generator=g)), generator=g) for _ in range(n)]
    mult = torch.tensor(2.0**20)
    layer_moments(grads, counts=True, small_mult=mult)
    with _Count() as c:
        layer_moments(grads, counts=True, small_mult=mult)
    views = c.ops.get("view", 0)  # flattening each tensor for the concatenation: no kernel, no copy
    assert views <= n + 2 and c.n - views <= 56, (n, c.n, sorted(c.ops.items(), key=lambda kv: -kv[1])[:8])  # 52 here


def test_flat_route_is_taken_on_cuda_only() -> None:
    """segment_reduce has CPU and CUDA kernels only: MPS and other accelerators keep the foreach
    route (and CPU, where segment_reduce is slower than a foreach reduction)."""
    assert stats._flat_route(torch.device("cuda", 0))
    assert not any(stats._flat_route(torch.device(d)) for d in ("cpu", "mps", "xpu", "meta"))
