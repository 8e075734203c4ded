"""Drop-in in the last details: third-party optimizers with ``_step_supports_amp_scaling`` read a
``grad_scale`` tensor as under torch's scaler, and each optimizer's events reach its own watcher."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch.agent import ClipNorm, GradScaler, watch

INF = math.inf


class ScalingSGD(torch.optim.Optimizer):
    """A third-party optimizer that unscales inside its own step, as fused kernels do: it reads
    ``self.grad_scale`` and ``self.found_inf`` (set by the scaler) and computes ``grad / grad_scale``."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 0.5) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, {"lr": lr})
        self.seen: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        gs, fi = self.grad_scale, self.found_inf  # AttributeError/None would crash here
        self.seen.append(gs.clone())
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(torch.where(fi > 0, torch.zeros_like(p), group["lr"] * (p.grad / gs)))


def _steps(scaler, params, opt, preset: float | None, bad_step: int) -> list[float]:  # type: ignore[no-untyped-def]
    scales = []
    for s in range(5):
        opt.zero_grad()
        x = torch.linspace(-1.0, 1.0, 6).reshape(2, 3) * (s + 1)
        scaler.scale((params[0] @ x).square().sum() + params[1].sum()).backward()
        if s == bad_step:
            params[1].grad[0] = INF
        if preset is not None:
            opt.grad_scale = torch.full((1,), preset)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("preset", [None, 4.0])
def test_amp_scaling_optimizer_sees_a_grad_scale_tensor_like_torch(preset: float | None) -> None:
    torch.manual_seed(0)
    init = [torch.randn(4, 2), torch.randn(4, 3)]
    mine = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    om, orf = ScalingSGD(mine), ScalingSGD(ref)
    ours = GradScaler("cpu", init_scale=2.0**10)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert _steps(ours, mine, om, preset, 2) == _steps(theirs, ref, orf, preset, 2)
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)  # powers of two: unscaling first is exact
    for g_ours, g_torch, s in zip(om.seen, orf.seen, [2.0**10, 2.0**10, 2.0**10, 2.0**9, 2.0**9]):
        # torch hands scale * preset; gradwatch unscaled already and hands ones * preset
        p = 1.0 if preset is None else preset
        assert g_ours.shape == g_torch.shape and g_ours.dtype == g_torch.dtype
        assert g_ours.reshape(-1).tolist() == [p] and g_torch.reshape(-1).tolist() == [s * p]


def test_amp_scaling_optimizer_after_explicit_unscale_gets_what_torch_gives() -> None:
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = ScalingSGD([p])
    s = GradScaler("cpu", init_scale=8.0)
    s.scale(p.sum()).backward()
    s.unscale_(opt)
    opt.grad_scale = torch.ones(1) * 3.0  # the user's own preset survives, as in torch
    s.step(opt)
    assert opt.seen[0].tolist() == [3.0]


def test_watcher_under_torch_scaler_hands_the_kernel_a_tensor() -> None:
    """torch's own scaler + watch(transforms=...): the watcher unscales first and must leave
    ``grad_scale`` a tensor of ones (was None: ``grad / self.grad_scale`` crashed)."""
    torch.manual_seed(0)
    init = torch.randn(4, 3)
    mine, ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    om, orf = ScalingSGD([mine]), ScalingSGD([ref])
    w = watch(None, om, server="memory", transforms=[ClipNorm(1e9)])
    for opt, p in ((om, mine), (orf, ref)):
        sc = torch.amp.GradScaler("cpu", init_scale=2.0**6)
        sc.scale(p.square().sum()).backward()
        sc.step(opt)
        sc.update()
    assert om.seen[0].shape == orf.seen[0].shape
    assert om.seen[0].reshape(-1).tolist() == [1.0] and orf.seen[0].reshape(-1).tolist() == [64.0]
    assert torch.equal(mine, ref)
    w.close()


def test_each_optimizers_events_go_to_its_own_watcher() -> None:
    p, q = (torch.nn.Parameter(torch.ones(2)) for _ in range(2))
    op, oq = (torch.optim.SGD([t], lr=1.0) for t in (p, q))
    wp, wq = (watch(None, o, server="memory", run=n) for o, n in ((op, "p"), (oq, "q")))
    s = GradScaler("cpu", init_scale=4.0)
    s.scale(p.sum() + q.sum()).backward()
    q.grad[0] = INF
    for o in (op, oq):
        s.step(o)
    s.update()
    ep = [(e.kind, e.data) for e in wp.sink.events]
    eq = [(e.kind, e.data) for e in wq.sink.events]
    # the skip is q's; both runs see the scale drop, each naming only its own bad layers
    assert [k for k, _ in eq] == ["overflow", "skipped"] and eq[1][1]["optimizer"] == 1
    assert eq[0][1]["layers"] == ["param0"] and eq[0][1]["scale_after"] == 2.0
    assert [k for k, _ in ep] == ["overflow"] and ep[0][1]["layers"] == []
    assert s.events == type(s.events)()  # nothing left without a watcher
    # growth: both runs record it
    s.set_growth_interval(1)
    for _ in range(1):
        op.zero_grad()
        oq.zero_grad()
        s.scale(p.sum() + q.sum()).backward()
        s.step(op)
        s.step(oq)
        s.update()
    assert wp.sink.events[-1].kind == wq.sink.events[-1].kind == "scale_growth"
    wp.close()
    wq.close()
