"""A drop-in :class:`torch.amp.GradScaler` that reports its decisions and applies transforms.

:class:`GradScaler` subclasses torch's scaler, so ``isinstance`` checks (Lightning, user code)
keep working and ``state_dict()`` has torch's exact format in both directions. It changes three
things around torch's algorithm, none of which changes a number torch computes:

1. ``step()`` always unscales explicitly first (docs/transforms.md, Loss scaling, S2), also for fused optimizers (any optimizer with
   ``_step_supports_amp_scaling``), so that statistics and transforms see the true gradients.
   Where torch would hand the kernel ``grad_scale = scale * preset`` it then hands
   ``ones * preset`` (a tensor, as an optimizer computing ``grad / self.grad_scale`` expects) and
   torch's ``found_inf``. When transforms (the scaler's or its watcher's) edited the gradients,
   torch's equivalent program is ``unscale_()``, transform, ``step()``, and the kernel gets what
   torch hands after ``unscale_()``: the preset or None (CUDA's fused SGD rounds its update
   differently with a ``grad_scale`` of ones than with None).
2. Between the skip decision and ``optimizer.step()`` it hands the unscaled gradients to an
   attached watcher, or applies its own ``transforms``.
3. ``update()`` emits ``overflow``, ``skipped``, ``scale_growth`` and ``manual_scale`` events,
   naming the layers that held non-finite values. To know the scale without reading the device,
   it mirrors torch's scale/growth-tracker update on two CPU scalars, fed by the ``found_inf``
   values that ``step()`` already read (torch's own single host sync).

Watcher protocol (kept minimal; ``agent/watcher.py`` implements the other side). A watcher
attaches itself as ``optimizer._gradwatch_watcher`` (or is passed as ``watcher=``); then:

* ``watcher._on_scaler_step(optimizer, scaler=self, skipped=bool, transforms=[...])`` is called
  after unscaling and the skip decision, right before ``optimizer.step()`` (or instead of it when
  skipped). The watcher measures, applies ``transforms`` together with its own, and records the
  step. For fused optimizers torch calls ``optimizer.step()`` even on skipped steps (the kernel
  leaves the parameters alone given ``found_inf``); we keep that, so the watcher's step pre-hook
  fires on those too and must recognize a step it already handled.
* ``watcher._on_scaler_event(kind, data)`` receives the events of its own optimizer
  (``skipped``; ``overflow`` naming its layers) and those of the shared scale (``overflow``,
  ``scale_growth``, ``manual_scale``: every watcher of the iteration gets them, since each run
  records the scale). ``watcher=`` on the scaler takes every event instead. Events of optimizers
  without a watcher are appended to :attr:`GradScaler.events`, a bounded deque of
  :class:`~gradwatch.agent.wire.Event`.
* ``watcher._param_name(param) -> str | None`` (optional) names layers in events. Otherwise a
  layer is ``"group{g}.param{j}"`` (its position in ``optimizer.param_groups``), prefixed with
  ``"opt{k}."`` for the k-th optimizer (k > 0) this scaler has stepped.
"""

from __future__ import annotations

import inspect
import math
import operator
import time
import warnings
import weakref
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from typing import Any, cast

from ._torch import Tensor, torch
from ._warn import warn
from .transforms.base import GradContext, Transform, apply_transforms, order_transforms
from .wire import Event

OptState = torch.amp.grad_scaler.OptState
_refresh_per_optimizer_state = torch.amp.grad_scaler._refresh_per_optimizer_state

__all__ = ["GradScaler", "ScalerUsageError"]

_EVENTS_MAXLEN = 10_000


class ScalerUsageError(ValueError, AssertionError):
    """Misuse that torch's GradScaler reports with an ``AssertionError``.

    It is a :class:`ValueError` (our rule: user input never fails through an assertion) and still an
    :class:`AssertionError`, so code written against torch's behaviour keeps catching it. The
    message is torch's.
    """


def _number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) and not hasattr(x, "__float__"):
        raise ValueError(f"{what} must be a number, got {x!r}")
    return float(x)


def _check_growth_factor(x: Any) -> float:
    if not _number(x, "growth_factor") > 1.0:  # NaN fails too
        raise ScalerUsageError("The growth factor must be > 1.0.")
    return cast(float, x)


def _check_backoff_factor(x: Any) -> float:
    v = _number(x, "backoff_factor")
    if not v < 1.0:
        raise ScalerUsageError("The backoff factor must be < 1.0.")
    if not v > 0.0:
        raise ValueError(f"The backoff factor must be > 0, got {x!r} (the scale would become 0 or negative).")
    return cast(float, x)


def _check_growth_interval(x: Any) -> int:
    try:
        if isinstance(x, bool):
            raise TypeError
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"growth_interval must be a positive int, got {x!r}") from None
    if v < 1:
        raise ValueError(f"growth_interval must be a positive int, got {x!r} (the scale would never grow).")
    return cast(int, x)


class GradScaler(torch.amp.GradScaler):
    """:class:`torch.amp.GradScaler` with events, transforms and watcher integration.

    Same arguments, defaults, methods, scale sequence, skip decisions and return values as torch's
    scaler; ``state_dict()``/``load_state_dict()`` are torch's (interchangeable both ways) and
    pickling behaves the same (the watcher and the event log are not pickled).

    Args:
        device: device type of the scaled outputs, as in torch (``"cuda"``: warns and disables
            itself when CUDA is unavailable, like torch). A :class:`torch.device` is reduced to
            its type.
        init_scale, growth_factor, backoff_factor, growth_interval, enabled: as in torch.
        watcher: a gradwatch watcher to hand each step to (default: the optimizer's own
            ``_gradwatch_watcher`` if it has one).
        transforms: gradwatch transforms applied to the unscaled gradients right before
            ``optimizer.step()`` on steps that are not skipped (sorted into the canonical order).

    Host syncs: ``step()`` reads ``found_inf`` once, as torch does, and for fused optimizers too
    (torch lets the fused kernel decide there without a sync; we need the verdict to run
    transforms and to tell the watcher). ``update()`` adds none on steps whose optimizers all went
    through ``step()``; it reads ``found_inf`` for an optimizer that was only ``unscale_``-d, and
    an overflow step costs one more read to find the non-finite layers. ``update(new_scale=tensor)``
    reads the new scale. ``get_scale()`` syncs as in torch; :attr:`loss_scale` does not.

    Errors (torch's message wherever torch has one; "torch: Assert." means torch raises
    ``AssertionError`` there, which :class:`ScalerUsageError` still is):

    ============================================================  =================================
    condition                                                     raises
    ============================================================  =================================
    ``growth_factor <= 1`` or NaN                                 ScalerUsageError (torch: Assert.)
    ``backoff_factor >= 1`` or NaN                                ScalerUsageError (torch: Assert.)
    ``backoff_factor <= 0``; ``growth_interval`` not an int >= 1;
    ``init_scale`` not finite > 0; unknown ``device``             ValueError (torch: accepts)
    ``unscale_``/``step``/``update`` before any ``scale()``       ScalerUsageError (torch: Assert.)
    ``step`` where every grad is None (non-fused optimizer)       ScalerUsageError (torch: Assert.)
    ``update()`` with no ``step``/``unscale_`` since the last     ScalerUsageError (torch: Assert.)
    ``update(new_scale=tensor)``: wrong device type, numel != 1,
    or requires_grad                                              ScalerUsageError (torch: Assert.)
    ``update(new_scale=float)`` not finite or <= 0                ValueError (torch: accepts)
    ``update(new_scale=int)`` or another non-float non-tensor     AttributeError (as torch)
    pickling between ``unscale_``/``step`` and ``update``         ScalerUsageError (torch: Assert.)
    ``unscale_`` twice, or after ``step``; ``step`` twice;
    ``step(closure=...)``; ``load_state_dict({})``                RuntimeError (as torch)
    fp16 grads in ``unscale_`` (non-fused)                        ValueError (as torch)
    ============================================================  =================================

    The constructor checks run even when the scaler is (or ends up) disabled, unlike torch's, so a
    bad configuration fails on a CPU-only machine too instead of first on the GPU machine.

    Example::

        scaler = GradScaler("cuda", transforms=[ClipNorm(1.0)])
        scaler.scale(loss).backward()
        scaler.step(optimizer)      # unscale, decide, clip, step
        scaler.update()             # scale update; overflow/growth events
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        watcher: Any = None,
        transforms: Iterable[Transform] = (),
    ) -> None:
        if isinstance(device, torch.device):
            device = device.type
        if not isinstance(device, str):
            raise ValueError(f"device must be a device type such as 'cuda' or 'cpu', got {device!r}")
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"device must be a device type such as 'cuda' or 'cpu', got {device!r}") from None
        s = _number(init_scale, "init_scale")
        if not (math.isfinite(s) and s > 0.0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        _check_growth_factor(growth_factor)
        _check_backoff_factor(backoff_factor)
        _check_growth_interval(growth_interval)
        ordered = order_transforms(transforms)
        if watcher is not None and hasattr(watcher, "_check_transforms"):
            watcher._check_transforms(ordered)  # ValueError on a conflict with the watcher's own
        if watcher is not None and enabled and getattr(watcher, "_optimizer", None) is not None:
            from .watcher import warn_fp16_fused  # (watch() already warned about the watcher's own)

            warn_fp16_fused(watcher._optimizer, ordered, "GradScaler(transforms=...)")
        # torch warns with stacklevel=2, which would point here; re-issue so it points at the caller.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        for w in caught:
            warnings.warn(w.message, w.category, stacklevel=2)
        self._gw_watcher = watcher
        self._gw_transforms: list[Transform] = ordered
        #: Events emitted while no watcher was attached (oldest dropped beyond 10 000); an
        #: event's ``step`` is the number of ``update()`` calls before the one that emitted it.
        self.events: deque[Event] = deque(maxlen=_EVENTS_MAXLEN)
        #: Reports of the transforms this scaler applied itself at its last step (device tensors).
        self.last_reports: dict[str, dict[str, Tensor]] = {}
        self._gw_mirror: tuple[Tensor, Tensor] | None = None
        self._gw_updates = 0
        self._gw_iter: dict[int, dict[str, Any]] = {}
        self._gw_opt_index: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    # -- configuration ---------------------------------------------------------------------------

    @property
    def transforms(self) -> list[Transform]:
        """The transforms, in the order they are applied."""
        return list(self._gw_transforms)

    @property
    def watcher(self) -> Any:
        return self._gw_watcher

    @watcher.setter
    def watcher(self, value: Any) -> None:
        self._gw_watcher = value

    @property
    def loss_scale(self) -> float:
        """The current scale from the host mirror: no device sync (1.0 when disabled)."""
        if not self._enabled:
            return 1.0
        return float(self._gw_host()[0])

    def set_growth_factor(self, new_factor: float) -> None:
        """As torch, but validated: must be > 1."""
        super().set_growth_factor(_check_growth_factor(new_factor))

    def set_backoff_factor(self, new_factor: float) -> None:
        """As torch, but validated: must lie in (0, 1)."""
        super().set_backoff_factor(_check_backoff_factor(new_factor))

    def set_growth_interval(self, new_interval: int) -> None:
        """As torch, but validated: a positive int."""
        super().set_growth_interval(_check_growth_interval(new_interval))

    # -- torch's checks, with our error type -----------------------------------------------------

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[Tensor, Tensor]:
        try:
            return super()._check_scale_growth_tracker(funcname)
        except AssertionError as e:
            raise ScalerUsageError(str(e)) from None

    # -- the step --------------------------------------------------------------------------------

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """As torch's :meth:`torch.amp.GradScaler.unscale_` (no host sync)."""
        super().unscale_(optimizer)
        if self._enabled:
            self._gw_iter.setdefault(id(optimizer), {"opt": optimizer, "found": None, "layers": None})

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale, decide, transform, step: returns what torch's ``step`` returns.

        Like torch: unscales unless ``unscale_`` was called, reads ``found_inf`` (one host sync),
        and calls ``optimizer.step(*args, **kwargs)`` unless a gradient was non-finite (then
        returns None). In between, the watcher or this scaler's transforms act on the unscaled
        gradients (only on steps that are not skipped). Fused optimizers are unscaled here too,
        except when they hold fp16 gradients: those can only be unscaled inside the kernel
        without losing small values to fp16 underflow, so such a step runs torch's path on
        scaled gradients, skips this scaler's transforms (with a warning) and leaves the watcher
        to its step pre-hook, which sees ``optimizer.grad_scale``/``found_inf``.
        """
        if not self._enabled:
            self._gw_before_step(optimizer, False, None)
            return optimizer.step(*args, **kwargs)

        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._gw_fused_step(optimizer, optimizer_state, args, kwargs)

        if optimizer_state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if len(optimizer_state["found_inf_per_device"]) == 0:
            raise ScalerUsageError("No inf checks were recorded for this optimizer.")
        retval = self._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        return retval

    def _maybe_opt_step(self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        found_infs = optimizer_state["found_inf_per_device"]
        skipped = bool(sum(v.item() for v in found_infs.values()))  # torch's one host sync
        self._gw_before_step(optimizer, skipped, found_infs)
        retval = None
        if not skipped:
            retval = optimizer.step(*args, **kwargs)
        return retval

    def _gw_fused_step(self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "grad_scaler" in inspect.signature(optimizer.step).parameters:
            # Deprecated protocol: the optimizer unscales itself; torch's path, untouched.
            if self._gw_transforms:
                self._gw_warn_scaled(optimizer)
            return super().step(optimizer, *args, **kwargs)
        unscaled = True
        by_user = optimizer_state["stage"] is OptState.UNSCALED  # the user called unscale_ themselves
        if optimizer_state["stage"] is OptState.READY:
            if any(p.grad is not None and p.grad.dtype == torch.float16 for g in optimizer.param_groups for p in g["params"]):
                self._check_inf_per_device(optimizer)  # torch's path: check only, grads stay scaled
                self._gw_iter.setdefault(id(optimizer), {"opt": optimizer, "found": None, "layers": None})
                unscaled = False
            else:
                self.unscale_(optimizer)
        found_infs = optimizer_state["found_inf_per_device"]
        skipped = bool(sum(v.item() for v in found_infs.values()))  # host sync torch does not do here
        if unscaled:
            self._gw_before_step(optimizer, skipped, found_infs)
        else:
            if self._gw_transforms:
                self._gw_warn_scaled(optimizer)
            self._gw_record(optimizer, skipped)  # a watcher's step pre-hook sees grad_scale/found_inf
        # From here on torch's fused protocol, verbatim.
        scale = self._get_scale_async()
        assert scale is not None  # checked by _check_scale_growth_tracker above
        found_inf = cast(Tensor, sum([t.to(scale.device, non_blocking=True) for t in found_infs.values()]))
        watcher = self._gw_watcher_for(optimizer)
        edited = unscaled and bool(self._gw_transforms or getattr(watcher, "transforms", None))
        if by_user or edited or optimizer_state["stage"] != OptState.UNSCALED:
            # transforms edited the unscaled gradients: torch's equivalent is the documented
            # unscale_(), transform, step(), after which torch hands the preset or None (the
            # kernel then takes the same code path, bit for bit)
            optimizer.grad_scale = (  # type: ignore[attr-defined]
                getattr(optimizer, "grad_scale", None)
                if optimizer_state["stage"] == OptState.UNSCALED
                else scale * getattr(optimizer, "grad_scale", 1)
            )
        else:  # unscaled here, where torch would hand the kernel scale * preset: ones * preset
            optimizer.grad_scale = torch.ones_like(scale) * getattr(optimizer, "grad_scale", 1)  # type: ignore[attr-defined]
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        retval = optimizer.step(*args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        del optimizer.grad_scale  # type: ignore[attr-defined]
        del optimizer.found_inf  # type: ignore[attr-defined]
        return retval

    def _gw_warn_scaled(self, optimizer: Any) -> None:
        if not getattr(self, "_gw_warned_scaled", False):
            self._gw_warned_scaled = True
            warn(
                f"gradwatch.GradScaler: {type(optimizer).__name__} unscales its gradients inside its fused "
                "kernel (fp16 gradients or the grad_scaler= protocol), so the scaler's transforms are "
                "skipped for its steps; use fp32 master parameters to get them.",
                UserWarning,
            )

    def _gw_watcher_for(self, optimizer: Any) -> Any:
        return self._gw_watcher if self._gw_watcher is not None else getattr(optimizer, "_gradwatch_watcher", None)

    def _gw_record(self, optimizer: Any, skipped: bool) -> None:
        """Remember the host-known verdict (for the mirror and events); find bad layers if any."""
        if not self._enabled:
            return
        rec = self._gw_iter.setdefault(id(optimizer), {"opt": optimizer, "found": None, "layers": None})
        rec["found"] = skipped
        rec["stepped"] = True
        rec["index"] = self._gw_index(optimizer)
        if skipped and rec["layers"] is None:
            rec["layers"] = self._gw_bad_layers(optimizer)  # one more sync, overflow steps only

    def _gw_before_step(self, optimizer: Any, skipped: bool, found_infs: dict[Any, Tensor] | None) -> None:
        self._gw_record(optimizer, skipped)
        watcher = self._gw_watcher_for(optimizer)
        if watcher is not None:
            watcher._on_scaler_step(optimizer, scaler=self, skipped=skipped, transforms=list(self._gw_transforms))
            return
        if not self._gw_transforms or skipped:
            self.last_reports = {}
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        found = None
        if found_infs:
            vals = list(found_infs.values())
            found = vals[0] if len(vals) == 1 else cast(Tensor, sum(v.to(vals[0].device) for v in vals))
        ctx = GradContext(params, None, found_inf=found, skip=False)
        apply_transforms(ctx, self._gw_transforms)
        self.last_reports = ctx.reports

    # -- layer names ---------------------------------------------------------------------------

    def _gw_index(self, optimizer: Any) -> int:
        try:
            return self._gw_opt_index.setdefault(optimizer, len(self._gw_opt_index))
        except TypeError:  # not weak-referenceable
            return 0

    def _gw_bad_layers(self, optimizer: Any) -> list[str]:
        """Names of the optimizer's parameters whose grad holds inf/NaN (one host sync)."""
        where: list[tuple[int, int, Tensor]] = []
        flags: list[Tensor] = []
        dev: torch.device | None = None
        for gi, group in enumerate(optimizer.param_groups):
            for pj, p in enumerate(group["params"]):
                g = getattr(p, "grad", None)
                if g is None:
                    continue
                v = g._values() if g.is_sparse else g
                dev = dev or v.device
                where.append((gi, pj, p))
                flags.append(torch.isfinite(v).all().logical_not().to(dev, non_blocking=True))
        if not flags:
            return []
        bad = torch.stack(flags).tolist()  # the one sync
        k = self._gw_index(optimizer)
        namer = getattr(self._gw_watcher_for(optimizer), "_param_name", None)
        names = []
        for (gi, pj, p), b in zip(where, bad):
            if not b:
                continue
            name = namer(p) if namer is not None else None
            names.append(name if isinstance(name, str) else (f"opt{k}." if k else "") + f"group{gi}.param{pj}")
        return names

    # -- update and events ---------------------------------------------------------------------

    def _gw_host(self) -> tuple[Tensor, Tensor]:
        """CPU float32 scale and int32 growth tracker mirroring the device ones."""
        if self._gw_mirror is None:
            self._gw_mirror = (
                torch.full((), self._init_scale, dtype=torch.float32),
                torch.full((), self._init_growth_tracker, dtype=torch.int32),
            )
        return self._gw_mirror

    def update(self, new_scale: float | Tensor | None = None) -> None:
        """Update the scale exactly as torch does, then emit this iteration's events.

        No host sync when every optimizer of the iteration went through :meth:`step` (see the
        class docstring for the exceptions).
        """
        if not self._enabled:
            return
        _scale, _growth_tracker = self._check_scale_growth_tracker("update")
        host_scale, host_tracker = self._gw_host()
        before = float(host_scale)
        if new_scale is not None:
            if isinstance(new_scale, float):
                if not (math.isfinite(new_scale) and new_scale > 0.0):
                    raise ValueError(f"new_scale must be a positive finite float, got {new_scale!r}")
                _scale.fill_(new_scale)
                host_scale.fill_(new_scale)
            elif isinstance(new_scale, torch.Tensor):
                reason = (
                    "new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                    "torch.FloatTensor with requires_grad=False."
                )
                if new_scale.device.type != self._device or new_scale.numel() != 1 or new_scale.requires_grad is True:
                    raise ScalerUsageError(reason)
                _scale.copy_(new_scale)
                host_scale.copy_(_scale)  # host sync; manual scale changes are rare
            else:
                raise AttributeError(
                    f"new_scale must be a float or a 1-element tensor, got {type(new_scale).__name__}"
                )
            for watcher in self._gw_event_watchers():
                self._gw_emit("manual_scale", {"scale_before": before, "scale_after": float(host_scale)}, watcher)
            for rec in self._gw_iter.values():  # verdicts known on the host; found_inf is not consumed
                if rec.get("stepped") and rec["found"]:
                    self._gw_emit("skipped", {"optimizer": rec["index"], "layers": rec["layers"]}, self._gw_rec_watcher(rec))
        else:
            states = list(self._per_optimizer_states.items())
            found_infs = [
                found_inf.to(device=_scale.device, non_blocking=True)
                for _, state in states
                for found_inf in state["found_inf_per_device"].values()
            ]
            if len(found_infs) == 0:
                raise ScalerUsageError("No inf checks were recorded prior to update.")
            # Host verdicts first: torch's in-place sum below writes into the first found_inf.
            dirty = []
            for oid, state in states:
                cur = self._gw_iter.get(oid)
                found = cur["found"] if cur is not None else None
                if found is None and state["found_inf_per_device"]:
                    found = bool(sum(v.item() for v in state["found_inf_per_device"].values()))  # host sync
                    if cur is not None:
                        cur["found"] = found
                if found:
                    dirty.append(oid)
            found_inf_combined = found_infs[0]
            if len(found_infs) > 1:
                for i in range(1, len(found_infs)):
                    found_inf_combined += found_infs[i]
            torch._amp_update_scale_(
                _scale, _growth_tracker, found_inf_combined,
                self._growth_factor, self._backoff_factor, self._growth_interval,
            )
            torch._amp_update_scale_(
                host_scale, host_tracker, torch.full((), float(bool(dirty)), dtype=torch.float32),
                self._growth_factor, self._backoff_factor, self._growth_interval,
            )
            self._gw_events_after_update(before, float(host_scale), int(host_tracker), dirty)
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        self._gw_iter = {}
        self._gw_updates += 1

    def _gw_rec_watcher(self, rec: dict[str, Any]) -> Any:
        """Where one optimizer's events go: ``watcher=``, else that optimizer's own watcher
        (None: :attr:`events`)."""
        return self._gw_watcher_for(rec["opt"])

    def _gw_event_watchers(self) -> list[Any]:
        """Where the scale's own events go: every distinct destination of this iteration's
        optimizers (each watched run records the shared scale), :attr:`events` counted once."""
        out: list[Any] = []
        for rec in self._gw_iter.values():
            w = self._gw_rec_watcher(rec)
            if all(w is not o for o in out):
                out.append(w)
        return out or [self._gw_watcher]

    def _gw_events_after_update(self, before: float, after: float, tracker: int, dirty: Sequence[int]) -> None:
        watchers = self._gw_event_watchers()
        if dirty:
            layers: dict[int, list[str]] = {id(w): [] for w in watchers}  # each run names its own layers
            for oid in dirty:
                rec = self._gw_iter.get(oid)
                if rec is None:
                    continue
                if rec["layers"] is None:
                    rec["layers"] = self._gw_bad_layers(rec["opt"])
                layers.setdefault(id(self._gw_rec_watcher(rec)), []).extend(rec["layers"])
            for w in watchers:
                self._gw_emit(
                    "overflow",
                    {"scale_before": before, "scale_after": after, "growth_tracker": tracker, "layers": layers[id(w)]},
                    w,
                )
            for oid in dirty:
                rec = self._gw_iter.get(oid)
                if rec is None or "stepped" not in rec:
                    continue
                self._gw_emit("skipped", {"optimizer": rec["index"], "layers": rec["layers"]}, self._gw_rec_watcher(rec))
        elif after > before:
            for w in watchers:
                self._gw_emit("scale_growth", {"scale_before": before, "scale_after": after}, w)

    def _gw_emit(self, kind: str, data: dict[str, Any], watcher: Any) -> None:
        if watcher is not None:
            watcher._on_scaler_event(kind, data)
        else:
            self.events.append(Event(kind=kind, step=self._gw_updates, time=time.time(), data=data))

    # -- checkpoints -------------------------------------------------------------------------------

    #: Key of the scaler's own transforms' state in :meth:`state_dict` (torch's scaler ignores it).
    TRANSFORMS_KEY = "gradwatch_transforms"

    def state_dict(self) -> dict[str, Any]:
        """torch's scaler state, plus (only when some of this scaler's transforms keep state)
        their running state under :attr:`TRANSFORMS_KEY`, so ZClip/AutoClip/AutoscaledNorm resume with the scaler.
        torch's own ``load_state_dict`` reads its keys by name and ignores this one."""
        sd = super().state_dict()
        states = [[type(t).__name__, t.state_dict()] for t in self._gw_transforms]
        if sd and any(st for _, st in states):  # stateless transforms (ClipNorm...): torch's dict as is
            sd[self.TRANSFORMS_KEY] = states
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch (accepts torch's scaler's ``state_dict()`` and vice versa); restores the
        transforms' state when the dict carries it.

        Raises:
            ValueError: the saved transforms are not this scaler's (names, in order).
        """
        saved = state_dict.get(self.TRANSFORMS_KEY) if isinstance(state_dict, dict) else None
        if saved is not None:
            names, mine = [n for n, _ in saved], [type(t).__name__ for t in self._gw_transforms]
            if names != mine:
                raise ValueError(f"state_dict: saved transforms {names} do not match this scaler's {mine}")
        super().load_state_dict(state_dict)
        self._gw_mirror = None  # rebuilt from _init_scale/_init_growth_tracker, which torch just set
        if saved is not None and self._enabled:
            for t, (_, st) in zip(self._gw_transforms, saved):
                t.load_state_dict(st)

    def __getstate__(self) -> dict[str, Any]:
        if self._enabled and len(self._per_optimizer_states) != 0:
            raise ScalerUsageError(
                "A GradScaler instance may only be pickled at the beginning "
                "of an iteration, or at the end after scaler.update()."
            )
        state = super().__getstate__()
        state["_gw_watcher"] = None
        state["_gw_mirror"] = None
        state["_gw_iter"] = {}
        state["_gw_opt_index"] = None
        state["events"] = deque(maxlen=_EVENTS_MAXLEN)
        state["last_reports"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._gw_opt_index = weakref.WeakKeyDictionary()
