"""Fixed-threshold clipping: :class:`ClipNorm` and :class:`ClipValue`.

They reproduce ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` (docs/transforms.md, ClipNorm):
same grouping by (device, dtype), same foreach/per-tensor choice, same coefficient
``clamp(max_norm / (total + 1e-6), max=1)`` applied without a branch, so no host sync. For fp32
gradients the results are bit-identical to torch. They differ on purpose in two places:

* Norms are always accumulated and returned in float32. torch computes the norm of fp16/bf16
  gradients in their own dtype, where it overflows: four fp16 elements of 40000 give an fp16 norm
  of ``inf`` and torch zeroes every gradient; ours gives 80000 and clips correctly. For
  reduced-precision gradients our results therefore agree with torch only within rounding, and
  not at all where torch's norm overflows.
* Sparse gradients are skipped (torch raises ``NotImplementedError`` on them).

Inside a pipeline, :class:`ClipNorm` with ``norm_type=2`` reuses the per-layer norms of the
statistics pass (``GradContext.norms``) and hands the clipped norms back with
``ctx.set_norms(norms * coef)``, so clipping costs one multiply pass and no extra reduction.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from .._torch import Tensor, torch
from ..consts import fp32_norm, fp32_norms
from .base import GradContext, NonFiniteNormError, Slot, Transform

__all__ = ["ClipNorm", "ClipValue"]

#: From this many elements on, ClipValue (foreach=None) clamps a tensor with one ``clamp_`` (one
#: pass) rather than in the foreach ``clamp_min_``/``clamp_max_`` pair (two passes).
_ONE_PASS_NUMEL = 1 << 16


def _real(x: Any, what: str) -> float:
    if isinstance(x, bool):
        raise ValueError(f"{what} must be a number, got {x!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {x!r}") from None


def _check_foreach(foreach: Any) -> bool | None:
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"foreach must be True, False or None, got {foreach!r}")
    return foreach


def _use_foreach(foreach: bool | None, ts: list[Tensor], device: torch.device) -> bool:
    """torch's rule: None → foreach where supported; True → foreach or RuntimeError."""
    from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

    if foreach is None:
        return _has_foreach_support(ts, device)
    if foreach:
        if not _device_has_foreach_support(device):
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        return True
    return False


class ClipNorm(Transform):
    """Clip the global ``norm_type``-norm of the gradients to ``max_norm``, like ``clip_grad_norm_``.

    Args:
        max_norm: the largest allowed total norm; ``0`` zeroes the gradients and ``inf`` never
            clips, as in torch.
        norm_type: order of the p-norm, any ``p > 0`` or ``inf``.
        error_if_nonfinite: raise :class:`~gradwatch.agent.TransformError`'s subclass
            ``NonFiniteNormError`` (a ``RuntimeError`` with torch's message) when the total norm
            is NaN or inf, before any gradient is edited; inside ``watch`` it propagates out of
            ``optimizer.step()`` before the optimizer steps. This check reads the norm on the
            host: one device sync per call.
        foreach: ``None`` picks foreach kernels where supported, ``True`` forces them (raising
            on unsupported devices), ``False`` loops per tensor; as in torch.

    Reports (0-dim float32 tensors on the gradients' device, no host sync): ``total_norm`` (torch's
    return value, computed in float32), ``total_norm_post`` (``total_norm * coef``, computed, not
    re-measured), ``coef`` (the clamped coefficient that was applied) and ``max_norm``.

    Non-finite gradients behave as in torch: a NaN anywhere makes every gradient NaN, an inf makes
    ``coef`` 0 (finite elements become 0, infinite ones NaN). Sparse gradients are left alone.

    Raises:
        ValueError: ``max_norm`` negative or NaN, ``norm_type`` not a positive number or inf,
            ``foreach`` not a bool or None.

    Example::

        report = ClipNorm(1.0)(model.parameters())   # == clip_grad_norm_(model.parameters(), 1.0)
    """

    name: ClassVar[str] = "clip_norm"
    slot: ClassVar[Slot] = Slot.GLOBAL

    settings_keys: ClassVar[tuple[str, ...]] = ('max_norm', 'norm_type', 'error_if_nonfinite')

    def __init__(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> None:
        max_norm = _real(max_norm, "max_norm")
        if not max_norm >= 0.0:  # also rejects NaN
            raise ValueError(f"max_norm must be >= 0 (inf means no clipping), got {max_norm}")
        norm_type = _real(norm_type, "norm_type")
        if not norm_type > 0.0:
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.foreach = _check_foreach(foreach)

    def __repr__(self) -> str:
        return f"ClipNorm(max_norm={self.max_norm}, norm_type={self.norm_type})"

    # -- computation ---------------------------------------------------------------------------

    def _layer_norms(self, ctx: GradContext) -> Tensor:
        """(L,) per-layer norms, in ctx order (torch's group order): float32, or float64 when a
        gradient is float64 (torch measures those in float64, so the coefficient is too)."""
        p = self.norm_type
        wide = any(dt == torch.float64 for _dev, dt, _idx in ctx.groups)
        if p == 2.0 and self.foreach is not False and not wide:
            return ctx.norms  # same _foreach_norm kernel torch uses, cached by the stats pass
        parts: list[Tensor] = []
        for dev, dt, idx in ctx.groups:
            ts = [ctx.grads[i] for i in idx]
            if dt == torch.float64:
                ns = (list(torch._foreach_norm(ts, p)) if _use_foreach(self.foreach, ts, dev)
                      else [torch.linalg.vector_norm(g, p) for g in ts])
            elif _use_foreach(self.foreach, ts, dev):
                ns = fp32_norms(ts, p)
            else:
                ns = [fp32_norm(g, p) for g in ts]
            parts.extend(n.to(ctx.device, torch.float64 if wide else torch.float32) for n in ns)
        return torch.stack(parts)

    def may_refuse(self) -> bool:
        return self.error_if_nonfinite

    def apply_(self, ctx: GradContext) -> None:
        norms = self._layer_norms(ctx)
        total = torch.linalg.vector_norm(norms, self.norm_type)
        if self.error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):  # host sync
            raise NonFiniteNormError(
                f"The total norm of order {self.norm_type} for gradients from "
                "`parameters` is non-finite, so it cannot be clipped. To disable "
                "this error and scale the gradients by the non-finite norm anyway, "
                "set `error_if_nonfinite=False`"
            )
        coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        for dev, _dt, idx in ctx.groups:
            ts = [ctx.grads[i] for i in idx]
            c = coef.to(dev)
            if _use_foreach(self.foreach, ts, dev):
                torch._foreach_mul_(ts, c)
            else:
                for g in ts:
                    g.mul_(c)
        # Every layer was scaled by the same coef, so cached L2 norms stay valid without a pass.
        if ctx._norms is not None:
            ctx.set_norms(ctx._norms * coef)
        ctx.report(self.name, total_norm=total, total_norm_post=total * coef, coef=coef, max_norm=self.max_norm)

    @torch.no_grad()
    def __call__(self, parameters: Tensor | Any) -> dict[str, Tensor]:
        """Clip ``parameters``' gradients in place; returns the report (see the class docstring).

        With no gradients at all this reports ``total_norm`` 0 like torch's ``tensor(0.)``."""
        report = super().__call__(parameters)
        if not report:
            zero = torch.zeros((), dtype=torch.float32)
            report = {
                "total_norm": zero,
                "total_norm_post": zero.clone(),
                "coef": torch.clamp(self.max_norm / (zero + 1e-6), max=1.0),
                "max_norm": torch.tensor(self.max_norm, dtype=torch.float32),
            }
        return report

    def events(self, values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        coef = values.get("coef")
        if coef is None or not coef < 1.0:  # NaN coef is a non-finite step, not a clip
            return []
        return [("clip", {"transform": self.name, "total_norm": values.get("total_norm"), "coef": coef,
                          "max_norm": self.max_norm})]


class ClipValue(Transform):
    """Clamp every gradient element to ``[-clip_value, clip_value]``, like ``clip_grad_value_``.

    Args:
        clip_value: the bound; ``0`` zeroes the gradients and ``inf`` is a no-op, as in torch.
        foreach: as in torch (see :class:`ClipNorm`).
        count_clipped: also report ``clipped``, the per-layer (L,) count of elements that were
            clamped. Off by default: it is an extra full read of every gradient, which would
            roughly double the cost of this transform; the clamp itself produces no by-product
            that could be counted for free.

    Reports: ``clip_value`` (and ``clipped`` if asked). NaN elements stay NaN, as in torch; sparse
    gradients are left alone. With no gradient at all it does nothing (torch 2.13's
    ``clip_grad_value_`` fails there on an internal check).

    Raises:
        ValueError: ``clip_value`` negative or NaN (torch would silently set every element to
            the negative bound), ``foreach`` not a bool or None.
    """

    name: ClassVar[str] = "clip_value"
    slot: ClassVar[Slot] = Slot.ELEMENTWISE

    settings_keys: ClassVar[tuple[str, ...]] = ('clip_value', 'count_clipped')

    def __init__(self, clip_value: float, foreach: bool | None = None, *, count_clipped: bool = False) -> None:
        clip_value = _real(clip_value, "clip_value")
        if not clip_value >= 0.0:
            raise ValueError(f"clip_value must be >= 0 (inf means no clipping), got {clip_value}")
        self.clip_value = clip_value
        self.foreach = _check_foreach(foreach)
        self.count_clipped = bool(count_clipped)

    def __repr__(self) -> str:
        return f"ClipValue(clip_value={self.clip_value})"

    def apply_(self, ctx: GradContext) -> None:
        c = self.clip_value
        if self.count_clipped:
            counts = torch.stack(
                [(g.abs() > c).sum(dtype=torch.float32).to(ctx.device) for g in ctx.grads]
            )
        for dev, _dt, idx in ctx.groups:
            ts = [ctx.grads[i] for i in idx]
            if _use_foreach(self.foreach, ts, dev):
                if self.foreach is None:
                    # auto: a large tensor gets one clamp_ (one pass over its memory) instead of
                    # torch's clamp_min_ then clamp_max_ (two); small ones stay in the foreach
                    # calls, where launches, not bytes, are the cost. Same elements either way.
                    for g in ts:
                        if g.numel() >= _ONE_PASS_NUMEL:
                            g.clamp_(min=-c, max=c)
                    ts = [g for g in ts if g.numel() < _ONE_PASS_NUMEL]
                if ts:
                    torch._foreach_clamp_min_(ts, -c)
                    torch._foreach_clamp_max_(ts, c)
            else:
                for g in ts:
                    g.clamp_(min=-c, max=c)
        if c != math.inf:
            ctx.set_norms(None)  # clamping changes norms unpredictably
        ctx.report(self.name, clip_value=c)
        if self.count_clipped:
            ctx.report(self.name, clipped=counts)

    def events(self, values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        clipped = values.get("clipped")
        if not clipped:
            return []
        n = sum(clipped) if isinstance(clipped, list) else clipped
        if not n > 0:
            return []
        return [("clip", {"transform": self.name, "clip_value": self.clip_value, "clipped": n})]
