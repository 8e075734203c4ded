"""What every gradient transform shares: the per-step context and the canonical ordering.

A transform edits ``p.grad`` in place through a :class:`GradContext`, which groups the
gradients once per step for foreach kernels (in torch's own (device, dtype) grouping order, so
total norms match ``clip_grad_norm_`` bit for bit), caches the per-layer L2 norms so clipping can
reuse the statistics pass, and collects what each transform reports as device tensors. Nothing
here synchronizes with the device: reports are packed and copied to the host once per step by
whoever drives the pipeline (the watcher or the scaler).

Order (docs/transforms.md, Order): normalization, then unit-wise clipping, then element-wise clipping,
then global clipping; at most one normalizer and one global clipper per pipeline.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from .._torch import Tensor, torch
from ..consts import fp32_norms
from ..stats import RowStats

__all__ = [
    "Slot", "GradContext", "Transform", "order_transforms", "apply_transforms", "as_param_list",
    "TransformError", "NonFiniteNormError", "TransformLayoutError",
]


class TransformError(RuntimeError):
    """A gradient transform could not do what it was asked to do.

    Raised into the training loop (out of ``optimizer.step()`` or ``scaler.step()``) *before*
    the optimizer steps: a user who asked for clipping must never get an unclipped step. The
    step's gradients are then never half-transformed; :attr:`grads` says which state they are in:

    * ``"untouched"``: as they were before the first transform (nothing was edited, or the
      pipeline restored its snapshot);
    * ``"discarded"``: a transform failed after editing in place with no snapshot to restore
      from (an unexpected error, e.g. out of memory); every ``p.grad`` of the step was set to
      None, so an optimizer stepped anyway leaves the parameters alone.

    Attributes:
        transform: the failing transform's ``name`` (``""`` when unknown).
        grads: ``"untouched"`` or ``"discarded"`` (see above).
    """

    def __init__(self, message: str, *, transform: str = "", grads: str = "untouched") -> None:
        super().__init__(message)
        self.transform = transform
        self.grads = grads


class NonFiniteNormError(TransformError):
    """The total norm is NaN or inf and the transform was built with ``error_if_nonfinite=True``
    (torch's ``clip_grad_norm_`` raises a ``RuntimeError`` there; this is one)."""


class TransformLayoutError(TransformError, ValueError):
    """The step's set of parameters with gradients does not fit the transform's running state
    (e.g. ``AutoClip(per_parameter=True)`` keeps one history per parameter). Raised by
    :meth:`Transform.check`, before any gradient is edited."""


class Slot(enum.IntEnum):
    """Where a transform sits in the canonical order."""

    NORMALIZE = 0  # AutoscaledNorm, Centralize, ZScoreNorm (at most one)
    UNITWISE = 1  # AGC
    ELEMENTWISE = 2  # ClipValue
    GLOBAL = 3  # ClipNorm, ZClip, AutoClip (at most one)


_EXCLUSIVE = {Slot.NORMALIZE: "normalizer", Slot.GLOBAL: "global clipper"}


def as_param_list(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """torch's convention: a single tensor or an iterable of tensors; warns on an empty generator."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    is_gen = not isinstance(parameters, (list, tuple, set, dict))
    params = list(parameters)
    if is_gen and not params:
        warnings.warn("`parameters` is an empty generator, no gradient transform will occur.", stacklevel=3)
    return params


class GradContext:
    """The gradients of one optimizer step, as transforms see them.

    Attributes:
        params: parameters with a dense, non-None grad, in torch's (device, dtype) group order.
        names: their names (``""`` when unknown), same order.
        grads: ``[p.grad for p in params]``.
        groups: ``[(device, dtype, [indices into params])]`` for foreach kernels.
        device: where per-layer vectors and scalars live (the first grad's device).
        found_inf: optional 0-dim float32 tensor on ``device``; > 0 means some gradient of this
            step is non-finite (from the loss scaler). Device-side: no sync needed to use it.
        skip: host-known verdict; True means the optimizer step will be skipped, so transforms
            must leave grads and their running state alone. None means unknown (guard on device).
        reports: ``{transform name: {key: tensor}}``; each tensor is 0-dim or shaped ``(L,)``
            aligned with ``params``, on ``device``.
        step: the optimizer step counter (0-based) of the driver, for transforms that care.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        names: Sequence[str] | None = None,
        *,
        found_inf: Tensor | None = None,
        skip: bool | None = None,
        step: int = 0,
    ) -> None:
        # one pass, each .grad read once: on models with hundreds of tensors this runs every step
        ps: list[Tensor] = []
        ns: list[str] = []
        gs: list[Tensor] = []
        self.sparse: list[Tensor] = []
        for p, n in zip(params, names or [""] * len(params)):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                self.sparse.append(p)
            else:
                ps.append(p)
                ns.append(n)
                gs.append(g)
        ordered, groups = _torch_group_order(gs)
        if len(groups) > 1:  # several (device, dtype) groups: torch's order differs from ours
            ps, ns, gs = [ps[i] for i in ordered], [ns[i] for i in ordered], [gs[i] for i in ordered]
        self.params: list[Tensor] = ps
        self.names: list[str] = ns
        self.grads: list[Tensor] = gs
        self.groups: list[tuple[torch.device, torch.dtype, list[int]]] = groups
        self.device: torch.device = self.grads[0].device if self.grads else torch.device("cpu")
        self.found_inf = found_inf
        self.skip = skip
        self.step = step
        self.reports: dict[str, dict[str, Tensor]] = {}
        self._norms: Tensor | None = None
        self._sums: Tensor | None = None
        self._sums_versions: tuple[int, ...] | None = None
        self._rows: RowStats | None = None
        self._rows_versions: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.params)

    # -- norms ---------------------------------------------------------------------------------

    @property
    def norms(self) -> Tensor:
        """(L,) float32 L2 norms of the current grads on ``device`` (computed once, cached)."""
        if self._norms is None:
            if not self.grads:
                self._norms = torch.zeros(0, dtype=torch.float32, device=self.device)
            else:
                parts: list[Tensor] = []
                for _dev, _dt, idx in self.groups:
                    ns = fp32_norms([self.grads[i] for i in idx], 2)
                    parts.extend(n.to(self.device, non_blocking=True) for n in ns)
                self._norms = torch.stack(parts)
        return self._norms

    def set_norms(self, norms: Tensor | None) -> None:
        """Hand in norms already computed (the statistics pass), or None after editing grads
        in a way that changes them unpredictably. A transform that scales layer i by c_i may
        instead call ``set_norms(norms * c)`` to keep the cache valid without a pass."""
        self._norms = norms

    # -- signed sums ---------------------------------------------------------------------------

    def set_sums(self, sums: Tensor | None) -> None:
        """Hand in the (L,) float32 signed sums of the current grads, each ``g.sum(dtype=float32)``
        (the statistics pass's sum column), so a normalizer need not read the grads again.

        Unlike norms, no transform keeps sums up to date: they are valid only while no gradient
        was edited in place since they were handed in, which :meth:`cached_sums` checks with the
        tensors' version counters (host-side integers, no device access)."""
        self._sums = sums
        self._sums_versions = _versions(self.grads) if sums is not None else None
        if self._sums_versions is None:
            self._sums = None

    def cached_sums(self) -> Tensor | None:
        """The sums handed to :meth:`set_sums` if no grad changed since, else None."""
        if self._sums is None or _versions(self.grads) != self._sums_versions:
            self._sums = None
            return None
        return self._sums

    def set_rows(self, rows: RowStats | None) -> None:
        """Hand in per-output-unit sums/norms of the current grads (keys: indices into
        :attr:`grads`), taken by the statistics pass because the first transform asked for
        them (:meth:`Transform.wanted_rows`). Valid, like sums, only while no grad was edited."""
        self._rows = rows
        self._rows_versions = _versions(self.grads) if rows is not None else None
        if self._rows_versions is None:
            self._rows = None

    def cached_rows(self) -> RowStats | None:
        """The rows handed to :meth:`set_rows` if no grad changed since, else None. Read them
        once, before editing any grad."""
        if self._rows is None or _versions(self.grads) != self._rows_versions:
            self._rows = None
            return None
        return self._rows

    def total_norm(self) -> Tensor:
        """0-dim float32 global L2 norm of the current grads, as ``get_total_norm`` computes it."""
        return torch.linalg.vector_norm(self.norms, 2)

    def finite(self) -> Tensor:
        """0-dim bool on ``device``: no gradient of this step is non-finite (device-side, no sync).

        Uses ``found_inf`` when the scaler provided it, else the norms (an fp32 norm overflowing
        for |g| > ~1e19 also counts as non-finite, which is the safe side)."""
        if self.found_inf is not None:
            return self.found_inf.to(self.device) == 0
        return torch.isfinite(self.norms.sum())

    def report(self, transform: str, **values: Tensor | float) -> None:
        """Record values for the step record; floats are turned into device tensors (with
        ``torch.full``, a fill kernel: ``torch.tensor(x, device="cuda")`` would be a blocking copy)."""
        d = self.reports.setdefault(transform, {})
        for k, v in values.items():
            d[k] = v if isinstance(v, torch.Tensor) else torch.full((), float(v), dtype=torch.float32, device=self.device)


def _versions(ts: Sequence[Tensor]) -> tuple[int, ...] | None:
    """In-place version counters of ``ts`` (None for inference tensors, which have none)."""
    try:
        return tuple(t._version for t in ts)
    except RuntimeError:
        return None


def _torch_group_order(grads: Sequence[Tensor]) -> tuple[list[int], list[tuple[torch.device, torch.dtype, list[int]]]]:
    """A permutation that lists grads group by group, in the order torch's clip_grad uses."""
    if not grads:
        return [], []
    try:
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

        grouped = _group_tensors_by_device_and_dtype([list(grads)], with_indices=True)
        raw = [(dev, dt, list(idx)) for (dev, dt), (_ts, idx) in grouped.items()]
    except Exception:  # private API moved: fall back to first-appearance order
        d: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(grads):
            d.setdefault((g.device, g.dtype), []).append(i)
        raw = [(dev, dt, idx) for (dev, dt), idx in d.items()]
    order: list[int] = []
    groups = []
    for dev, dt, idx in raw:
        groups.append((dev, dt, list(range(len(order), len(order) + len(idx)))))
        order.extend(idx)
    return order, groups


class Transform:
    """Base class of gradient transforms.

    Subclasses set :attr:`name` (the key of their values in the step record) and :attr:`slot`,
    implement :meth:`apply_`, and keep any running state in tensors on the gradients' device so
    that no step needs a host sync. Running statistics must not move on a step whose gradients
    are non-finite (``ctx.skip`` True, or guarded on device with ``ctx.finite()``).

    Usable alone, like torch's utilities::

        report = ClipNorm(1.0)(model.parameters())   # dict of 0-dim tensors, no host sync
    """

    name: ClassVar[str] = "transform"
    slot: ClassVar[Slot] = Slot.GLOBAL

    def apply_(self, ctx: GradContext) -> None:
        """Edit ``ctx.grads`` in place and ``ctx.report(self.name, ...)`` what was done.

        Any refusal that does not depend on gradient values belongs in :meth:`check`; a
        value-dependent refusal (a :class:`TransformError`) must come before the first edit and
        be announced by :meth:`may_refuse`."""
        raise NotImplementedError

    def check(self, ctx: GradContext) -> None:
        """Refuse (raise a :class:`TransformError`) what this transform cannot do with ``ctx``,
        judged on the host without reading the device; called for every transform of a pipeline
        before any of them edits a gradient."""

    def may_refuse(self) -> bool:
        """True when :meth:`apply_` may raise a :class:`TransformError` depending on gradient
        values (``ClipNorm(error_if_nonfinite=True)``). A pipeline where such a transform runs
        after another one snapshots the gradients first, so that it can restore them."""
        return False

    @torch.no_grad()
    def __call__(self, parameters: Tensor | Iterable[Tensor]) -> dict[str, Tensor]:
        ctx = GradContext(as_param_list(parameters))
        apply_transforms(ctx, [self], wrap=False)  # torch's own errors stay torch's
        return ctx.reports.get(self.name, {})

    def wanted_rows(self, ctx: GradContext) -> tuple[list[int], list[int]]:
        """Indices (into ``ctx.grads``) whose per-unit sums and per-unit L2 norms this transform
        would read; when it runs first in a pipeline, the statistics pass takes them in its own
        read (:class:`~gradwatch.agent.stats.RowStats`) and hands them in with ``set_rows``."""
        return [], []

    def events(self, values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Host side, after the step's values came back: the events this step deserves, as
        ``(kind, data)`` pairs (e.g. a ``clip`` event when the coefficient was below 1)."""
        return []

    #: constructor settings a saved state is only valid for (checked by :meth:`check_config`)
    config_keys: ClassVar[tuple[str, ...]] = ()
    #: further constructor settings that never change during a run: with ``config_keys`` they go
    #: once into the run's metadata (:meth:`settings`), never into a step record
    settings_keys: ClassVar[tuple[str, ...]] = ()

    def settings(self) -> dict[str, Any]:
        """The transform's fixed settings as JSON values (non-finite floats as strings)."""
        out: dict[str, Any] = {}
        for k in dict.fromkeys(self.config_keys + self.settings_keys):
            v = getattr(self, k)
            if isinstance(v, float) and not math.isfinite(v):
                v = repr(v)
            out[k] = v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
        return out

    def config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.config_keys}

    def check_config(self, saved: Any) -> None:
        """Refuse a state saved by a transform configured differently (its running statistics
        mean something else): ``saved`` maps setting names to the saved values; settings it
        lacks (a state saved before they were recorded) are accepted."""
        if not isinstance(saved, dict):
            return
        diff = {k: (saved[k], v) for k, v in self.config().items() if k in saved and saved[k] != v}
        if diff:
            raise ValueError(f"{type(self).__name__}: state was saved with other settings: "
                             + ", ".join(f"{k}={a!r} (this one has {b!r})" for k, (a, b) in diff.items()))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def reset(self) -> None:
        """Forget running state (as if freshly constructed)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def order_transforms(transforms: Iterable[Transform]) -> list[Transform]:
    """Validate and sort transforms into the canonical order (stable within a slot).

    Raises:
        TypeError: an element is not a :class:`Transform`.
        ValueError: two normalizers or two global clippers, or one instance listed twice.
    """
    ts = list(transforms)
    for t in ts:
        if not isinstance(t, Transform):
            raise TypeError(f"transforms must be gradwatch Transform instances, got {type(t).__name__}")
    if len({id(t) for t in ts}) != len(ts):
        raise ValueError("the same transform instance is listed twice")
    for slot, what in _EXCLUSIVE.items():
        same = [t for t in ts if t.slot == slot]
        if len(same) > 1:
            raise ValueError(
                f"contradictory transforms: at most one {what} per pipeline, got "
                + ", ".join(repr(t) for t in same)
            )
    return sorted(ts, key=lambda t: int(t.slot))


@torch.no_grad()
def apply_transforms(ctx: GradContext, transforms: Sequence[Transform], *, wrap: bool = True) -> None:
    """Run already-ordered transforms on ``ctx`` unless the step is known to be skipped.

    All or nothing: every transform's :meth:`~Transform.check` runs before the first edit; when
    a transform that :meth:`~Transform.may_refuse` follows another, the gradients are copied
    first (one read and write of each, only in that configuration) and restored if it refuses.

    Raises:
        TransformError: a transform refused or failed (with ``wrap``, any other exception is
            wrapped in one, chained as its ``__cause__``); its ``grads`` says what the gradients
            hold now. Without ``wrap`` (a transform called on its own, like torch's utilities)
            other exceptions propagate as they are, after the same restore-or-discard.
    """
    if ctx.skip or not len(ctx):
        return
    for t in transforms:
        try:
            t.check(ctx)
        except TransformError as e:
            e.transform = e.transform or t.name
            raise
        except Exception as e:
            if not wrap:
                raise
            raise TransformError(f"{type(t).__name__} refused the step ({type(e).__name__}: {e}); the optimizer "
                                 "did not step and the gradients are untouched", transform=t.name) from e
    snapshot = None
    if any(t.may_refuse() for t in transforms[1:]):
        snapshot = [g.clone() for g in ctx.grads]
    before = _versions(ctx.grads)
    for t in transforms:
        try:
            t.apply_(ctx)
        except Exception as e:
            _fail(ctx, t, e, snapshot, before, wrap)


def _fail(ctx: GradContext, t: Transform, e: Exception, snapshot: list[Tensor] | None,
          before: tuple[int, ...] | None, wrap: bool) -> None:
    """Leave the gradients untouched (restored) or discarded, never half-edited; raise."""
    if snapshot is not None:
        for g, s in zip(ctx.grads, snapshot):
            g.copy_(s)
        state, what = "untouched", "restored to their values before the transforms"
    elif before is not None and _versions(ctx.grads) == before:
        state, what = "untouched", "untouched"
    else:
        for p in ctx.params:
            p.grad = None
        state, what = "discarded", "discarded (set to None: they were partly edited)"
    if isinstance(e, TransformError):
        e.transform, e.grads = e.transform or t.name, state
        raise e
    if not wrap:
        raise e
    raise TransformError(f"{type(t).__name__} failed ({type(e).__name__}: {e}); the optimizer did not step and "
                         f"the gradients are {what}", transform=t.name, grads=state) from e
