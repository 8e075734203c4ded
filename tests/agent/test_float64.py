"""float64 models: the statistics pass, every transform and the signals run on float64 gradients
(norms refuse to narrow float64 to float32; gradwatch measures them in float64 and rounds)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gradwatch.agent as gw


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(400, 400), nn.Tanh(), nn.Linear(400, 3)).double()


def _batch(i: int) -> torch.Tensor:
    return torch.randn(8, 400, generator=torch.Generator().manual_seed(i), dtype=torch.float64)


@pytest.mark.parametrize("transform", ["none", "ClipNorm", "ClipValue", "AGC", "ZClip", "AutoClip", "AutoscaledNorm",
                                       "Centralize", "ZScoreNorm"])
def test_float64_model_is_recorded_every_step_with_any_transform(transform: str) -> None:
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    args = {"ClipNorm": (0.5,), "ClipValue": (1e-3,)}.get(transform, ())
    tr = [] if transform == "none" else [getattr(gw, transform)(*args)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failing measurement warns: make it fail here
        w = gw.watch(m, opt, server="memory", every=1, transforms=tr, signals_every=1)
        try:
            for i in range(4):
                opt.zero_grad()
                m(_batch(i)).square().sum().backward()
                opt.step()
                rec = w.sink.steps[-1]
                assert rec.step == i
                if transform == "none":  # the gradients are the ones measured
                    for j, p in enumerate(m.parameters()):
                        x = p.grad.reshape(-1)
                        assert rec.layers["numel"][j] == x.numel()
                        assert rec.layers["l2"][j] == pytest.approx(x.norm().item(), rel=1e-6)
                        assert rec.layers["m2"][j] == pytest.approx(((x - x.mean()) ** 2).sum().item(), rel=1e-6)
                        assert rec.layers["maxabs"][j] == pytest.approx(x.abs().max().item(), rel=1e-7)
                if i > 0:  # Adam keeps a first moment from its first step on
                    assert all(v is not None for v in rec.layers["mom_cos"])
            assert len(w.sink.steps) == 4
        finally:
            w.close()


def test_float64_clip_norm_is_torchs() -> None:
    a = _model()
    b = copy.deepcopy(a)
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    w = gw.watch(a, oa, server="memory", every=1, transforms=[gw.ClipNorm(0.5)])
    try:
        for i in range(3):
            for m, o in ((a, oa), (b, ob)):
                o.zero_grad()
                m(_batch(i)).square().sum().backward()
            torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
            oa.step()
            ob.step()
            for p, q in zip(a.parameters(), b.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    finally:
        w.close()
