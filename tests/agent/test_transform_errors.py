"""Transforms fail loudly: a TransformError out of step() before the optimizer steps, with the
gradients untouched (or discarded after an unexpected mid-edit failure), never half-transformed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradwatch.agent import (
    AutoClip,
    Centralize,
    ClipNorm,
    ClipValue,
    GradScaler,
    NonFiniteNormError,
    TransformError,
    TransformLayoutError,
    watch,
)
from gradwatch.agent.transforms.base import Slot, Transform


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _backward(m: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    nn.functional.cross_entropy(m(x), y).backward()


def _snap(m: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    return ([p.detach().clone() for p in m.parameters()],
            [None if p.grad is None else p.grad.clone() for p in m.parameters()])


def _same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x.nan_to_num(), y.nan_to_num())
                                             and torch.equal(x.isnan(), y.isnan())) for x, y in zip(a, b))


class _Refuses(Transform):
    """Raises before editing anything (an unexpected error, not a TransformError)."""

    name = "refuses"
    slot = Slot.ELEMENTWISE

    def apply_(self, ctx) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("state corrupted")


class _HalfEdits(Transform):
    """Edits the first gradient in place, then fails: the half-edited state must not survive."""

    name = "half"
    slot = Slot.ELEMENTWISE

    def apply_(self, ctx) -> None:  # type: ignore[no-untyped-def]
        ctx.grads[0].mul_(0.5)
        raise MemoryError("out of memory")


def test_failing_transform_raises_before_the_optimizer_steps() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", transforms=[ClipNorm(1.0), _Refuses()])
    _backward(m)
    params, grads = _snap(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warn-and-continue
        with pytest.raises(TransformError, match="state corrupted") as ei:
            opt.step()
    assert isinstance(ei.value.__cause__, RuntimeError)
    assert ei.value.transform == "refuses" and ei.value.grads == "untouched"
    after_p, after_g = _snap(m)
    assert _same(params, after_p)  # the optimizer did not step
    assert _same(grads, after_g)  # ClipNorm ran first but its edit was never made: check before edit
    assert w.step == 0 and w.stats()["failures"] == 0 and w.sink.steps == []
    w.close()


def test_half_edited_gradients_are_discarded_never_left_half() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", transforms=[_HalfEdits()])
    _backward(m)
    params, _ = _snap(m)
    with pytest.raises(TransformError, match="out of memory") as ei:
        opt.step()
    assert ei.value.grads == "discarded"
    assert all(p.grad is None for p in m.parameters())
    assert _same(params, _snap(m)[0])
    # the user may catch it and go on: the next step is the same step number
    w.close()


@pytest.mark.parametrize("first", [ClipValue(0.05), Centralize()])
def test_nonfinite_refusal_after_an_earlier_transform_restores_the_gradients(first: Transform) -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", transforms=[first, ClipNorm(1.0, error_if_nonfinite=True)])
    _backward(m)
    m[0].weight.grad[0, 0] = float("nan")
    params, grads = _snap(m)
    with pytest.raises(NonFiniteNormError) as ei:
        opt.step()
    e = ei.value
    assert isinstance(e, TransformError) and isinstance(e, RuntimeError)  # torch's type still catches it
    assert "non-finite" in str(e) and e.grads == "untouched" and e.transform == "clip_norm"
    after_p, after_g = _snap(m)
    assert _same(params, after_p) and _same(grads, after_g)  # the first transform's edit was rolled back
    # the same watcher goes on when the gradients are fine again
    opt.zero_grad()
    _backward(m, 1)
    opt.step()
    assert w.step == 1 and [s.step for s in w.sink.steps] == [0]
    w.close()


def test_layout_refusal_is_typed_and_comes_before_any_edit() -> None:
    """AutoClip(per_parameter=True) follows one history per tensor; an alternating frozen branch
    is refused by its check, before the normalizer that runs first edits anything."""
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", transforms=[Centralize(), AutoClip(per_parameter=True)])
    _backward(m)
    opt.step()
    opt.zero_grad(set_to_none=True)
    m[0].requires_grad_(False)
    _backward(m, 1)
    params, grads = _snap(m)
    with pytest.raises(TransformLayoutError, match="keeps 4 histories, this step has 2") as ei:
        opt.step()
    assert isinstance(ei.value, ValueError) and ei.value.grads == "untouched"
    assert _same(params, _snap(m)[0]) and _same(grads, _snap(m)[1])
    w.close()


def test_gradscaler_step_raises_and_does_not_step() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory")
    scaler = GradScaler("cpu", init_scale=4.0, transforms=[ClipValue(0.01), ClipNorm(1.0, error_if_nonfinite=True)])
    loss = scaler.scale(nn.functional.cross_entropy(m(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])))
    loss.backward()
    params, _ = _snap(m)
    scaler.unscale_(opt)
    m[2].weight.grad[0, 0] = float("nan")  # after the scaler's inf check: only the transform sees it
    grads = _snap(m)[1]
    with pytest.raises(NonFiniteNormError):
        scaler.step(opt)
    assert _same(params, _snap(m)[0]) and _same(grads, _snap(m)[1])
    assert w.step == 0 and not w._scaler_pending
    # the watcher's own hook is live again: a plain optimizer step is measured
    opt.zero_grad()
    _backward(m)
    opt.step()
    assert w.step == 1
    w.close()


def test_scaler_without_watcher_raises_too() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0, transforms=[_Refuses()])
    scaler.scale((p * 2).sum()).backward()
    with pytest.raises(TransformError, match="state corrupted"):
        scaler.step(opt)
    assert torch.equal(p.detach(), torch.ones(3)) and torch.equal(p.grad, torch.ones(3) * 2)


def test_standalone_transform_keeps_torch_errors_but_never_half_edits() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(MemoryError):  # on its own, not wrapped (like torch's utilities)
        _HalfEdits()([a, b])
    assert a.grad is None and b.grad is None
