"""Parameter layouts that change every step (alternating frozen branches, a tiny mixture of
experts): records stay exact, the gradients the optimizer uses are torch's, and the training
thread issues no host sync, also on the steps where a layout is seen for the first time.

On CPU nothing really synchronizes, so the test counts the calls that would on an accelerator:
scalar reads (``aten._local_scalar_dense``: ``item``/``bool``/``float``), ``nonzero``,
``tolist``, and host-built tensors copied with ``torch.tensor(..., device=...)`` (a blocking copy
from pageable memory). The statistics pass is put on its accelerator route (eager non-finite
count) so its CPU-only host reads are not counted. The CUDA variants run the same under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch.agent.consts as consts
import gradwatch.agent.record as record
import gradwatch.agent.stats as stats
from gradwatch.agent import AGC, ClipNorm, ClipValue, GradScaler, watch

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item"}


class _SyncOps(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def count_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Calls on this thread that would make the host wait for an accelerator."""
    seen: list[str] = []
    me = threading.get_ident()
    real_tensor, real_tolist = torch.tensor, torch.Tensor.tolist

    def tensor(data: Any, *a: Any, **k: Any) -> torch.Tensor:
        if threading.get_ident() == me and k.get("device") is not None:
            seen.append(f"torch.tensor(device={k['device']})")
        return real_tensor(data, *a, **k)

    def tolist(self: torch.Tensor) -> Any:
        if threading.get_ident() == me:
            seen.append("tolist")
        return real_tolist(self)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "tensor", tensor)
        mp.setattr(torch.Tensor, "tolist", tolist)
        with _SyncOps(seen):
            yield seen


@pytest.fixture
def accelerator_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistics pass as on accelerators: eager non-finite counts, small tensors concatenated."""
    monkeypatch.setattr(record, "layer_moments", functools.partial(record.layer_moments, eager_nonfinite=True))
    monkeypatch.setattr(stats, "_flat_route", lambda dev: True)


class Branches(nn.Module):
    """A trunk and two heads; the heads take turns being frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 12)
        self.a = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
        self.b = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.trunk(x))
        return self.a(h) + self.b(h)

    def layout(self, step: int) -> None:
        self.a.requires_grad_(step % 2 == 0)
        self.b.requires_grad_(step % 2 == 1)


class TinyMoE(nn.Module):
    """Four experts; a host-side router sends each step's batch to two of them, so which expert
    parameters have gradients changes every step (and layouts recur)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10)) for _ in range(4))
        self.out = nn.Linear(10, 3)
        self.route: tuple[int, ...] = (0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = sum(self.experts[i](h) for i in self.route) / len(self.route)
        return self.out(torch.tanh(h))

    def layout(self, step: int) -> None:
        self.route = ((0, 1), (2, 3), (1, 3), (0, 2), (3,))[step % 5]


def _batch(step: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g).to(device), torch.randint(0, 3, (16,), generator=g).to(device)


def _pair(make: Any, device: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    m = make().to(device)
    torch.manual_seed(0)
    return m, make().to(device)


STEPS = 14
_LAYOUTS = {Branches: 2, TinyMoE: 5}  # distinct parameter layouts, in a cycle
_EXCLUDED = ("trunk.*", "inp.*")  # not measured: the measured rows are a subset of the grads


def _train(make: Any, device: str, monkeypatch: pytest.MonkeyPatch, *, scaler: bool = False,
           sync_check: Any = None) -> tuple[nn.Module, nn.Module, Any, list[str], int, list[dict[str, torch.Tensor]]]:
    """The model under watch (ClipValue, ClipNorm; the router/heads excluded from measuring so
    measured rows are a subset) against a twin clipped with torch's utilities."""
    m, ref = _pair(make, device)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    w = watch(m, opt, server="memory", exclude=list(_EXCLUDED), transforms=[ClipValue(0.05), ClipNorm(0.2)])
    sc = GradScaler(device, init_scale=2.0**8) if scaler else None
    grads: list[dict[str, torch.Tensor]] = []
    seen: list[str] = []
    builds: list[int] = []  # per step: device tensors built (index tensors, segment offsets)
    real_build = consts._build

    def build(*a: Any) -> torch.Tensor:
        builds[-1] += 1
        return real_build(*a)

    monkeypatch.setattr(consts, "_build", build)
    for s in range(STEPS):
        builds.append(0)
        for model in (m, ref):
            model.layout(s)  # type: ignore[operator]
        x, y = _batch(s, device)
        opt.zero_grad(set_to_none=True)
        opt_ref.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(x), y)
        (sc.scale(loss) if sc is not None else loss).backward()
        nn.functional.cross_entropy(ref(x), y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None})
        live = [p for p in ref.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_value_(live, 0.05)
        torch.nn.utils.clip_grad_norm_(live, 0.2)
        opt_ref.step()
        if sync_check is not None:
            with sync_check():
                _step(opt, sc)
        else:
            with count_syncs(monkeypatch) as got:
                _step(opt, sc)
            seen += got
    w.flush()
    return m, ref, w, seen, builds, grads


def _step(opt: torch.optim.Optimizer, sc: Any) -> None:
    if sc is None:
        opt.step()
    else:
        sc.step(opt)
        sc.update()


def _check(m: nn.Module, ref: nn.Module, w: Any, scaled: bool) -> None:
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        if scaled:  # unscaling by a power of two is exact, but ClipValue's bound applies after it
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
        else:
            assert torch.equal(p, q), n  # exactly torch's clipping, whatever the layout
    names = {i.index: i.name for i in w.sink.layers}
    assert len(w.sink.steps) == STEPS
    for rec in w.sink.steps:
        assert all(not names[i].startswith(("trunk.", "inp.")) for i in rec.layer_ids)


@pytest.mark.parametrize("make", [Branches, TinyMoE])
def test_changing_layouts_are_exact_and_never_sync(make: Any, monkeypatch: pytest.MonkeyPatch,
                                                    accelerator_route: None) -> None:
    m, ref, w, seen, builds, grads = _train(make, "cpu", monkeypatch)
    _check(m, ref, w, scaled=False)
    # the measured rows of each step are the measured layers with gradients, in table order,
    # each with its own statistics
    order = [i.name for i in w.sink.layers]
    for rec, g in zip(w.sink.steps, grads):
        names = [w.sink.layers[i].name for i in rec.layer_ids]
        assert names == sorted((n for n in g if not n.startswith(("trunk.", "inp."))), key=order.index)
        for n, l2, mx in zip(names, rec.layers["l2"], rec.layers["maxabs"]):
            assert l2 == pytest.approx(g[n].double().norm().item(), rel=1e-6)
            assert mx == g[n].abs().max().item()
    assert seen == []
    # built for each distinct layout (2 or 5) once, not on every step: the caches keep them all
    assert sum(builds) >= 1 and not any(builds[_LAYOUTS[make]:]), builds
    w.close()


def test_recorded_rows_follow_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ref, w, _seen, _b, _g = _train(TinyMoE, "cpu", monkeypatch)
    routes = [((0, 1), (2, 3), (1, 3), (0, 2), (3,))[s % 5] for s in range(STEPS)]
    for rec, route in zip(w.sink.steps, routes):
        experts = sorted({int(w.sink.layers[i].name.split(".")[1]) for i in rec.layer_ids
                          if w.sink.layers[i].name.startswith("experts.")})
        assert experts == sorted(route)
    w.close()


def test_agc_and_plan_caches_do_not_thrash(monkeypatch: pytest.MonkeyPatch, accelerator_route: None) -> None:
    """AGC builds device index tensors per layout; with five recurring layouts they are built
    five times in all, and no step issues a sync."""
    torch.manual_seed(0)
    m = TinyMoE()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", exclude="inp.*", transforms=[AGC(0.01, exclude=[])])
    real_build, builds = consts._build, []
    monkeypatch.setattr(consts, "_build", lambda *a: builds.append(a[0]) or real_build(*a))
    seen: list[str] = []
    for s in range(25):
        m.layout(s)
        x, y = _batch(s, "cpu")
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        with count_syncs(monkeypatch) as got:
            opt.step()
        seen += got
    assert seen == []
    assert len(builds) == len(set(builds)) and len(builds) <= 5 * 3  # per layout: AGC seg + mask, record sel
    w.close()


def test_scaled_steps_with_changing_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    m, ref, w, _seen, _b, _g = _train(Branches, "cpu", monkeypatch, scaler=True)
    _check(m, ref, w, scaled=True)
    w.close()


def _cuda_sync_error() -> Any:
    @contextmanager
    def ctx() -> Iterator[None]:
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return ctx


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [Branches, TinyMoE])
def test_changing_layouts_never_sync_cuda(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.cuda.synchronize()
    m, ref, w, _seen, builds, _g = _train(make, "cuda", monkeypatch, sync_check=_cuda_sync_error())
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(w.sink.steps) == STEPS and sum(builds) >= 1 and not any(builds[_LAYOUTS[make]:]), builds
    w.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_agc_changing_layouts_never_sync_cuda() -> None:
    torch.manual_seed(0)
    m = TinyMoE().cuda()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", exclude="inp.*", transforms=[AGC(0.01, exclude=[]), ClipNorm(1.0)])
    for s in range(12):
        m.layout(s)
        x, y = _batch(s, "cuda")
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    w.flush()
    assert len(w.sink.steps) == 12
    w.close()
