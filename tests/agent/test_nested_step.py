"""An optimizer subclass whose ``step()`` calls ``super().step()`` runs torch's step hooks twice
(once per patched class): gradwatch measures, transforms and counts that step once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.agent import AutoscaledNorm, GradScaler, watch


class _Sub(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        return super().step(closure)


class _Flaky(torch.optim.SGD):
    """Raises from its inner step once: the post-hooks of that call never run."""

    fail = True

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        return self._inner(closure)

    def _inner(self, closure):  # type: ignore[no-untyped-def]
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        return super().step(closure)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _loss(m: nn.Module, i: int) -> torch.Tensor:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(i))
    return m(x).square().sum()


@pytest.fixture(autouse=True)
def _patch_parent() -> None:
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # SGD.step is patched: super().step() re-enters the hooks


def test_subclass_calling_super_step_is_one_step() -> None:
    a, b = _model(), _model()
    oa = _Sub(a.parameters(), lr=0.05)
    ob = torch.optim.SGD(b.parameters(), lr=0.05)
    wa = watch(a, oa, server="memory", every=1, transforms=[AutoscaledNorm()])
    wb = watch(b, ob, server="memory", every=1, transforms=[AutoscaledNorm()])
    try:
        for i in range(5):
            for m, o in ((a, oa), (b, ob)):
                o.zero_grad()
                _loss(m, i).backward()
                o.step()
        assert [r.step for r in wa.sink.steps] == [0, 1, 2, 3, 4] == [r.step for r in wb.sink.steps]
        assert wa.step == 5
        for p, q in zip(a.parameters(), b.parameters()):  # the stateful normalization ran once per step
            assert torch.equal(p, q)
        for ra, rb in zip(wa.sink.steps, wb.sink.steps):
            assert ra.layers["l2"] == rb.layers["l2"]
            assert ra.layers["upd_ratio"] == rb.layers["upd_ratio"]
    finally:
        wa.close()
        wb.close()


def test_subclass_under_gradwatch_scaler_is_one_step() -> None:
    m = _model()
    o = _Sub(m.parameters(), lr=0.05)
    sc = GradScaler(device="cpu", init_scale=2.0 ** 8)
    w = watch(m, o, server="memory", every=1, scaler=sc)
    try:
        for i in range(4):
            o.zero_grad()
            sc.scale(_loss(m, i)).backward()
            sc.step(o)
            sc.update()
        assert [r.step for r in w.sink.steps] == [0, 1, 2, 3]
    finally:
        w.close()


def test_a_step_that_raised_does_not_wedge_the_next_ones() -> None:
    m = _model()
    o = _Flaky(m.parameters(), lr=0.05)
    w = watch(m, o, server="memory", every=1)
    try:
        o.zero_grad()
        _loss(m, 0).backward()
        with pytest.raises(RuntimeError, match="boom"):
            o.step()
        for i in range(1, 4):
            o.zero_grad()
            _loss(m, i).backward()
            o.step()
        assert [r.step for r in w.sink.steps] == [0, 1, 2, 3]
    finally:
        w.close()
