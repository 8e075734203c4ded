"""The per-step record path: statistics, transforms, one packed copy, records built later.

One call of :meth:`Recorder.step` per optimizer step, on the training thread:

1. a :class:`GradContext` over the optimizer's parameters (torch's group order);
2. raw moments of every gradient (:func:`layer_moments`; sparse grads on their coalesced values),
   whose L2 column is handed to the context so a clipper reuses it instead of a second pass;
3. the transforms (every step, recorded or not);
4. post-transform norms (free when the clipper kept the norm cache valid);
5. everything the record needs packed into ONE 1-D tensor of :func:`pack_dtype` and handed to
   :class:`HostCopy` (non-blocking into pinned memory on CUDA).

Nothing on the training thread reads a device value, so on an accelerator the step never waits
(exceptions, each documented where it happens: coalescing a sparse CUDA gradient syncs, and the
lazy non-finite count on CPU reads norms that are already on the host). The returned
:class:`StepPending` builds the :class:`StepRecord` and events in :meth:`StepPending.resolve`,
which the sink calls off the training thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._torch import Tensor, torch
from ._warn import warn
from .consts import device_tensor, fp32_norms
from .noise import NoiseLayout
from .signals import (
    headroom,
    momentum_buffers,
    momentum_cosine,
    relative_update,
    small_multiplier,
    update_norms,
)
from .stats import MOMENT_COLUMNS, HostCopy, PendingCopy, finalize, layer_moments, pack_dtype, row_stats
from .transforms.base import GradContext, Slot, Transform, apply_transforms
from .wire import EVENT_KINDS, LAYER_FIELDS, Event, LayerInfo, StepRecord

_K = len(MOMENT_COLUMNS)

__all__ = ["LayerRegistry", "Recorder", "StepPending", "clean_name"]

_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
#: Layouts (sets of parameters with gradients) whose plans are kept, least recently used dropped.
_PLANS = 64
#: Report keys a global clipper may use for its coefficient (copied to StepRecord.clip_coef).
_COEF_KEYS = ("clip_coef", "coef")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes wrappers add (torch.compile, DDP, FSDP, checkpointing)."""
    changed = True
    while changed:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre):], True
        name = name.replace("._orig_mod.", ".").replace("._checkpoint_wrapped_module.", ".")
    return name


def _sparse_module_params(model: Any) -> set[int]:
    """ids of parameters whose gradient will be sparse (Embedding/EmbeddingBag with sparse=True)."""
    out: set[int] = set()
    if model is None:
        return out
    for m in model.modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and getattr(m, "sparse", False):
            out.add(id(m.weight))
    return out


class LayerRegistry:
    """Parameter → layer index of the run's layer table, fixed at attach (grows on first sight of
    a parameter added later with ``add_param_group``). Filters are evaluated here, once per
    parameter, never per step. Index -1 means "not measured"."""

    def __init__(self, model: Any, params: Sequence[Tensor], measure: Callable[[str, Any], bool]) -> None:
        self._names: dict[int, str] = {}
        if model is not None:
            for n, p in model.named_parameters(remove_duplicate=True):
                self._names.setdefault(id(p), clean_name(n))
        self._sparse = _sparse_module_params(model)
        self._measure = measure
        self._index: dict[int, int] = {}
        self._name_of: dict[int, str] = {}
        self._keep: list[Tensor] = []  # keeps ids valid for the registry's lifetime
        self._infos: list[LayerInfo] = []
        self._lock = threading.Lock()
        self._seen = 0
        for p in params:
            self.lookup(p)

    def lookup(self, p: Tensor) -> int:
        i = self._index.get(id(p))
        if i is not None:
            return i
        with self._lock:
            name = self._names.get(id(p)) or f"param{self._seen}"
            self._seen += 1
            self._keep.append(p)
            self._name_of[id(p)] = name
            if self._measure(name, p):
                i = len(self._infos)
                self._infos.append(LayerInfo(index=i, name=name, shape=list(p.shape),
                                             dtype=str(p.dtype).removeprefix("torch."), sparse=id(p) in self._sparse))
            else:
                i = -1
            self._index[id(p)] = i
        return i

    def name(self, p: Tensor) -> str:
        self.lookup(p)
        return self._name_of[id(p)]

    def mark_sparse(self, index: int) -> None:
        """A gradient turned out sparse: say so in the layer table (sent with the next batch)."""
        with self._lock:
            la = self._infos[index]
            if not la.sparse:
                self._infos[index] = LayerInfo(la.index, la.name, la.shape, la.dtype, True)

    def table(self) -> list[LayerInfo]:
        """The run's layer table (the sink's :data:`LayerTable` callable)."""
        with self._lock:
            return list(self._infos)

    def layer_name(self, index: int) -> str:
        return self._infos[index].name


@dataclass
class _Plan:
    """Host-side layout of one step, cached while the set of parameters with grads is unchanged."""

    key: tuple[int, ...]
    dense_rows: list[int]  # rows of ctx.params that are measured, in layer-index order
    dense_ids: list[int]
    dense_numels: list[int]
    sel: Tensor | None  # dense_rows on ctx.device (None: all rows, already in order)
    sparse_params: list[Tensor]
    sparse_ids: list[int]


@dataclass
class _Measured:
    """Pre-transform measurements of one step, still on the device."""

    plan: _Plan
    m: Tensor  # (L_dense_all + L_sparse, len(MOMENT_COLUMNS)) moments
    wnorm: Tensor  # (L_dense_all + L_sparse,) float32 weight norms
    total: Tensor
    sparse_vals: list[Tensor]
    sparse_numels: list[int]
    dev: torch.device
    pd: torch.dtype
    # (L_dense_all + L_sparse, 2) float32 counts: non-zero elements, small (below 2^-14 scaled)
    counts: Tensor | None = None
    # (L_dense_all,) float32 momentum cosines and which rows have a momentum buffer (host)
    mom_cos: Tensor | None = None
    mom_has: list[bool] | None = None
    signals: bool = True  # the sampled signals are measured on this step (the post-step part too)


@dataclass
class _Layout:
    """Where each value sits in the packed tensor (offsets are host ints)."""

    n_dense: int
    n_sparse: int
    has_post: bool
    scalars: dict[str, int]  # total_norm, total_norm_post, clip_coef, loss_scale, found_inf -> offset
    reports: list[tuple[str, str, int, int, bool]]  # (transform, key, offset, length, per_layer)
    noise: tuple[int, NoiseLayout] | None = None  # offset of the noise-scale snapshot (gradwatch.agent.noise)
    counts_at: int = -1  # offset of the (n, 2) counts; -1: not measured
    small: bool = False  # the counts' second column is the underflow count (a loss scale was known)
    mom_at: int = -1  # offset of the n_dense momentum cosines; -1: none
    mom_has: list[bool] | None = None  # per dense layer (layer order): it had a momentum buffer


class StepPending:
    """One recorded step whose values are still on their way from the device (see
    :class:`gradwatch.agent.transport.Pending`). :meth:`resolve` may block on the device: the sink
    calls it on its sender thread, never the training thread."""

    __slots__ = ("_copy", "_layout", "_plan", "_sparse_numels", "step", "time", "rank", "_skipped",
                 "_has_scaler", "_transforms", "_registry", "_on_error", "params", "_post", "_post_kinds")

    def __init__(self, copy: PendingCopy, layout: _Layout, plan: _Plan, sparse_numels: list[int], *, step: int,
                 time: float, rank: int, skipped: bool | None, has_scaler: bool, transforms: Sequence[Transform],
                 registry: LayerRegistry, on_error: Callable[[str, BaseException], None]) -> None:
        self._copy = copy
        self._layout = layout
        self._plan = plan
        self._sparse_numels = sparse_numels
        self.step = step
        self.time = time
        self.rank = rank
        self._skipped = skipped
        self._has_scaler = has_scaler
        self._transforms = transforms
        self._registry = registry
        self._on_error = on_error
        #: the measured dense parameters in layer order, for the post-step part (then dropped)
        self.params: list[Tensor] = []
        self._post: PendingCopy | None = None
        self._post_kinds: list[str | None] = []

    def attach_post(self, copy: PendingCopy, kinds: list[str | None]) -> None:
        """The post-step part (:func:`gradwatch.agent.signals.update_norms` of ``params``), on its
        way to the host like the rest; attached before the record is handed to the sink."""
        self._post, self._post_kinds = copy, kinds
        self.params = []

    def resolve(self) -> list[StepRecord | Event]:
        """Build the step record and its events. Never raises: a failure is reported once
        through the watcher's warning and the step is dropped."""
        try:
            return self._build()
        except Exception as e:  # noqa: BLE001 - monitoring must not kill the sender
            self._on_error("building a step record", e)
            return []

    def _build(self) -> list[StepRecord | Event]:
        v = self._copy.values()
        lay, plan = self._layout, self._plan
        n = lay.n_dense + lay.n_sparse
        layer_ids = plan.dense_ids + plan.sparse_ids
        numels = plan.dense_numels + self._sparse_numels
        stats = [finalize(numels[r], *v[_K * r: _K * r + _K]) for r in range(n)]
        st0 = stats[0] if stats else finalize(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        cols: dict[str, list[Any]] = {k: [getattr(st, k) for st in stats] for k in LAYER_FIELDS
                                      if hasattr(st0, k) and k not in ("l2_post", "wnorm", "noise_scale")}
        o = _K * n
        cols["wnorm"] = list(v[o: o + n])
        o += n
        if lay.has_post:
            # sparse grads are not touched by transforms: their post norm is the pre norm
            cols["l2_post"] = list(v[o: o + lay.n_dense]) + cols["l2"][lay.n_dense:]
        else:
            cols["l2_post"] = [None] * n
        noise_step: dict[str, Any] = {}
        cols["noise_scale"] = [None] * n
        if lay.noise is not None:
            no, nl = lay.noise
            noise_step, cols["noise_scale"] = nl.read(v[no: no + nl.size], layer_ids)
        sc = {k: v[o] for k, o in lay.scalars.items()}
        self._signals(cols, v, sc, numels, n)
        cols = {k: cols[k] for k in LAYER_FIELDS}
        found_inf = sc.get("found_inf")
        skipped = bool(self._skipped) if self._skipped is not None else bool(found_inf is not None and found_inf > 0)
        tvals: dict[str, dict[str, Any]] = {}
        for tname, key, o, ln, per_layer in lay.reports:
            if per_layer:
                val: Any = list(v[o: o + ln]) + [None] * lay.n_sparse
            elif ln == 1:
                val = v[o]
            else:
                val = list(v[o: o + ln])
            tvals.setdefault(tname, {})[key] = val
        if skipped:  # nothing was updated (a fused kernel given found_inf left the weights alone)
            cols["upd_ratio"] = [None] * n
        rec = StepRecord(
            step=self.step, time=self.time, rank=self.rank, layer_ids=layer_ids, layers=cols,
            total_norm=sc.get("total_norm"), total_norm_post=sc.get("total_norm_post"),
            clip_coef=sc.get("clip_coef"), loss_scale=sc.get("loss_scale"), skipped=skipped, transforms=tvals,
            **noise_step,
        )
        out: list[StepRecord | Event] = [rec]
        bad = [i for i, c in enumerate(cols["nonfinite"]) if c]
        if bad and not self._has_scaler and not skipped:
            out.append(self._event("nonfinite", {
                "layers": [self._registry.layer_name(layer_ids[i]) for i in bad],
                "layer_ids": [layer_ids[i] for i in bad],
                "counts": [cols["nonfinite"][i] for i in bad],
            }))
        for t in self._transforms:
            if t.name not in tvals:
                continue
            try:
                evs = t.events(tvals[t.name])
            except Exception as e:  # noqa: BLE001
                self._on_error(f"{type(t).__name__}.events", e)
                continue
            for kind, data in evs:
                if kind in EVENT_KINDS:
                    out.append(self._event(kind, {"transform": t.name, **data}))
        return out

    def _signals(self, cols: dict[str, list[Any]], v: list[float], sc: dict[str, float], numels: list[int],
                 n: int) -> None:
        """zeros, headroom, underflow and mom_cos columns (None where not measured)."""
        lay = self._layout
        scale = sc.get("loss_scale")
        if lay.counts_at >= 0:
            o = lay.counts_at
            nz = [int(v[o + 2 * r]) for r in range(n)]
            cols["zeros"] = [numels[r] - nz[r] for r in range(n)]
            cols["underflow"] = ([int(v[o + 2 * r + 1]) for r in range(n)] if lay.small and scale is not None
                                 else [None] * n)
        else:
            cols["zeros"] = [None] * n
            cols["underflow"] = [None] * n
        if scale is not None:
            cols["headroom"] = [headroom(cols["maxabs"][r], scale, numels[r]) for r in range(n)]
        else:
            cols["headroom"] = [None] * n
        mom: list[Any] = [None] * n
        if lay.mom_at >= 0 and lay.mom_has is not None:
            for r, has in enumerate(lay.mom_has):
                if has:
                    mom[r] = v[lay.mom_at + r]
        cols["mom_cos"] = mom
        upd: list[Any] = [None] * n
        if self._post is not None:
            post = self._post.values()
            for r, kind in enumerate(self._post_kinds):
                upd[r] = relative_update(post[r], kind, cols["wnorm"][r])
        cols["upd_ratio"] = upd

    def _event(self, kind: str, data: dict[str, Any]) -> Event:
        return Event(kind=kind, step=self.step, time=self.time, rank=self.rank, data=data)


class Recorder:
    """Runs the record path of one optimizer step (see the module docstring)."""

    def __init__(self, registry: LayerRegistry, on_error: Callable[[str, BaseException], None]) -> None:
        self.registry = registry
        self.host = HostCopy()
        self._plans: OrderedDict[tuple[int, ...], _Plan] = OrderedDict()  # LRU: layouts may alternate
        self._on_error = on_error

    @torch.no_grad()
    def step(
        self,
        params: Sequence[Tensor],
        *,
        transforms: Sequence[Transform],
        record: bool,
        step: int,
        time: float,
        rank: int,
        skip: bool | None = None,
        found_inf: Tensor | None = None,
        loss_scale: Tensor | float | None = None,
        grad_scale: Tensor | None = None,
        has_scaler: bool = False,
        noise: tuple[Tensor, NoiseLayout] | None = None,
        optimizer: Any = None,
        signals: bool = True,
    ) -> StepPending | None:
        """Measure (when ``record``), transform, pack. Returns the pending record or None.

        Args:
            params: the optimizer's parameters (any order; those without grad are absent).
            transforms: already ordered (:func:`order_transforms`); run unless ``skip``.
            skip: host-known "this step will be skipped" (gradwatch's scaler); None: unknown.
            found_inf: device flag (> 0: non-finite grads) from a scaler, handed to transforms.
            loss_scale: recorded as ``loss_scale`` (device tensor: packed, never read here).
            grad_scale: grads are still multiplied by this (fused optimizers under torch's
                scaler): statistics are divided by it on the device. Transforms must not run on
                scaled grads; the watcher unscales in place before calling when it has any.
            noise: the noise-scale EMA snapshot (:meth:`NoiseScale.update`), packed along.
            optimizer: the stepping optimizer, whose momentum buffers ``mom_cos`` reads (None: no
                ``mom_cos``).
            signals: measure the sampled signals (zero/underflow counts, ``mom_cos``,
                ``upd_ratio``) on this recorded step; False leaves them null.
        """
        names = [self.registry.name(p) for p in params]
        ctx = GradContext(params, names, found_inf=found_inf, skip=skip, step=step)
        meas = None
        if record:
            try:
                meas = self._measure(ctx, grad_scale, transforms[0] if transforms and not skip else None,
                                     loss_scale=loss_scale, optimizer=optimizer, signals=signals)
            except Exception as e:  # noqa: BLE001 - a measuring failure must not cost the transforms
                self._on_error("measuring gradients", e)
                ctx.set_norms(None)
        ran = bool(transforms) and not skip and len(ctx) > 0
        if transforms:
            apply_transforms(ctx, transforms)  # a TransformError propagates: the optimizer must not step
        if meas is None:
            return None
        try:
            return self._pack(ctx, meas, transforms=transforms, ran=ran, step=step, time=time, rank=rank, skip=skip,
                              found_inf=found_inf, loss_scale=loss_scale, has_scaler=has_scaler, noise=noise)
        except Exception as e:  # noqa: BLE001
            self._on_error("packing step statistics", e)
            return None

    def _measure(self, ctx: GradContext, grad_scale: Tensor | None, first: Transform | None = None, *,
                 loss_scale: Tensor | float | None = None, optimizer: Any = None,
                 signals: bool = True) -> _Measured:
        """Moments of every dense grad (their norms feed the context and the total norm) and of
        the measured sparse grads, before any transform. No host sync on accelerators except for
        coalescing a sparse CUDA gradient.

        When the first transform reads per-unit sums or norms (Centralize, AGC), they are taken
        here instead and handed to it: the layer's sum or norm then comes from its rows, so the
        gradient is read once for both. (Only the first: any later one sees edited grads.)"""
        plan = self._get_plan(ctx)
        sparse_vals: list[Tensor] = []
        sparse_numels: list[int] = []
        for p, lid in zip(plan.sparse_params, plan.sparse_ids):
            vals = p.grad.coalesce()._values()  # type: ignore[union-attr]  # syncs on CUDA (nnz)
            sparse_vals.append(vals)
            sparse_numels.append(vals.numel())
            self.registry.mark_sparse(lid)
        dev = ctx.device if len(ctx) else (sparse_vals[0].device if sparse_vals else torch.device("cpu"))
        pd = pack_dtype(dev)
        rows = None
        if first is not None and grad_scale is None and len(ctx):
            want_sums, want_norms = first.wanted_rows(ctx)
            if want_sums or want_norms:
                rows = row_stats(ctx.grads, want_sums, want_norms)
        # zeros and loss-scale underflow ride in the same pass (docs/statistics.md, "Loss-scale headroom")
        counts = None
        if signals:
            mult = small_multiplier(loss_scale if grad_scale is None else grad_scale, grad_scale is not None, dev)
            m = layer_moments(list(ctx.grads) + sparse_vals, out_device=dev, rows=rows, counts=True, small_mult=mult)
            counts = m[:, _K:]
            m = m[:, :_K]
        else:
            m = layer_moments(list(ctx.grads) + sparse_vals, out_device=dev, rows=rows)
        if grad_scale is not None:
            inv = grad_scale.reshape(()).to(device=dev, dtype=torch.float32).reciprocal()
            one = torch.ones((), dtype=torch.float32, device=dev)
            m = m * torch.stack([inv, inv, inv, one, inv * inv])
        n_dense_all = len(ctx)
        l2col = m[:, 1].contiguous()  # contiguous: reductions over it match torch's clip_grad bit for bit
        if n_dense_all and grad_scale is None:
            ctx.set_norms(l2col[:n_dense_all])
            ctx.set_sums(m[:n_dense_all, 0])  # same g.sum(dtype=float32): normalizers skip their own read
            ctx.set_rows(rows)
        total = torch.linalg.vector_norm(l2col, 2) if m.shape[0] else torch.zeros((), device=dev)
        # ‖w‖ per layer (the gradient-to-weight ratio's denominator): one foreach pass, recorded steps only
        weights = list(ctx.params) + list(plan.sparse_params)  # no_grad: no detach (one op per tensor)
        wn = (torch.stack([x.to(dev) for x in fp32_norms(weights, 2)])
              if weights else torch.zeros(0, dtype=torch.float32, device=dev))
        meas = _Measured(plan, m, wn, total, sparse_vals, sparse_numels, dev, pd, counts, signals=signals)
        if signals and optimizer is not None and len(ctx):
            try:  # before the optimizer steps: the buffer from the previous step (scale-invariant)
                bufs = momentum_buffers(optimizer, ctx.params)
                if any(b is not None for b in bufs):
                    meas.mom_cos = momentum_cosine(ctx.grads, bufs, dev)
                    meas.mom_has = [b is not None for b in bufs]
            except Exception as e:  # noqa: BLE001 - the other statistics still count
                self._on_error("measuring the momentum cosine", e)
        return meas

    def _pack(self, ctx: GradContext, meas: _Measured, *, transforms: Sequence[Transform], ran: bool, step: int,
              time: float, rank: int, skip: bool | None, found_inf: Tensor | None,
              loss_scale: Tensor | float | None, has_scaler: bool,
              noise: tuple[Tensor, NoiseLayout] | None = None) -> StepPending:
        """Everything the record needs in ONE 1-D tensor, handed to :class:`HostCopy`."""
        plan, m, total, sparse_vals, sparse_numels, dev, pd = (
            meas.plan, meas.m, meas.total, meas.sparse_vals, meas.sparse_numels, meas.dev, meas.pd)
        n_dense_all = len(ctx)
        dense_m = m[:n_dense_all]
        dense_w = meas.wnorm[:n_dense_all]
        if plan.sel is not None:
            dense_m = dense_m.index_select(0, plan.sel)
            dense_w = dense_w.index_select(0, plan.sel)
        parts: list[Tensor] = [dense_m.reshape(-1), m[n_dense_all:].reshape(-1), dense_w, meas.wnorm[n_dense_all:]]
        scalars: dict[str, int] = {}
        off = (_K + 1) * (len(plan.dense_rows) + len(sparse_vals))
        post_total = None
        if ran:
            post = ctx.norms
            post_sel = post.index_select(0, plan.sel) if plan.sel is not None else post
            parts.append(post_sel)
            off += len(plan.dense_rows)
            sq = post.square().sum()
            if sparse_vals:
                sq = sq + m[n_dense_all:, 1].square().sum()
            post_total = sq.sqrt()
        # after the post norms, which _build reads right after wnorm
        counts_at = mom_at = -1
        mom_has = None
        if meas.counts is not None:
            dense_c = meas.counts[:n_dense_all]
            if plan.sel is not None:
                dense_c = dense_c.index_select(0, plan.sel)
            parts += [dense_c.reshape(-1), meas.counts[n_dense_all:].reshape(-1)]
            counts_at = off
            off += 2 * (len(plan.dense_rows) + len(sparse_vals))
        if meas.mom_cos is not None and meas.mom_has is not None:
            mc = meas.mom_cos if plan.sel is None else meas.mom_cos.index_select(0, plan.sel)
            parts.append(mc)
            mom_at = off
            mom_has = [meas.mom_has[r] for r in plan.dense_rows]
            off += len(plan.dense_rows)

        def add_scalar(key: str, t: Tensor | float) -> None:
            nonlocal off
            if not isinstance(t, torch.Tensor):  # a fill on the device: no host-to-device copy
                t = torch.full((), float(t), dtype=pd, device=dev)
            parts.append(t.reshape(-1)[:1])
            scalars[key] = off
            off += 1

        add_scalar("total_norm", total)
        if post_total is not None:
            add_scalar("total_norm_post", post_total)
        if ran:
            for t in transforms:
                if t.slot == Slot.GLOBAL:
                    rep = ctx.reports.get(t.name, {})
                    for k in _COEF_KEYS:
                        if k in rep:
                            add_scalar("clip_coef", rep[k])
                            break
        if loss_scale is not None:
            add_scalar("loss_scale", loss_scale)
        if found_inf is not None:
            add_scalar("found_inf", found_inf)
        reports: list[tuple[str, str, int, int, bool]] = []
        # settings (max_norm, clip_value...) are in the run's metadata (Transform.settings), not per step
        fixed = {t.name: set(t.config_keys + t.settings_keys) for t in transforms}
        for tname, rep in ctx.reports.items():
            for key, val in rep.items():
                if not isinstance(val, torch.Tensor) or key in fixed.get(tname, ()):
                    continue
                per_layer = val.dim() == 1 and val.shape[0] == n_dense_all and n_dense_all > 0
                if per_layer:
                    flat = val.index_select(0, plan.sel.to(val.device)) if plan.sel is not None else val
                else:
                    flat = val.reshape(-1)
                ln = flat.numel()
                parts.append(flat)
                reports.append((tname, key, off, ln, per_layer))
                off += ln
        noise_at = None
        if noise is not None:
            parts.append(noise[0].reshape(-1))
            noise_at = (off, noise[1])
            off += noise[1].size
        packed = torch.cat([p.to(device=dev, dtype=pd, non_blocking=True) for p in parts])
        copy = self.host.submit(packed)
        layout = _Layout(len(plan.dense_rows), len(sparse_vals), ran, scalars, reports, noise=noise_at,
                         counts_at=counts_at, small="loss_scale" in scalars, mom_at=mom_at, mom_has=mom_has)
        skipped = skip if skip is not None else (None if found_inf is not None else False)
        pending = StepPending(copy, layout, plan, sparse_numels, step=step, time=time, rank=rank, skipped=skipped,
                              has_scaler=has_scaler, transforms=list(transforms), registry=self.registry,
                              on_error=self._on_error)
        if not skip and meas.signals:  # a skipped step updates nothing: no post-step part
            pending.params = [ctx.params[r] for r in plan.dense_rows]
        return pending

    @torch.no_grad()
    def post_step(self, pending: StepPending, optimizer: Any) -> None:
        """After ``optimizer.step()``: the update norms of the step's measured dense parameters
        (:func:`gradwatch.agent.signals.update_norms`), one more non-blocking copy, attached to
        ``pending``. A failure leaves ``upd_ratio`` null and is reported once."""
        params = pending.params
        if not params:
            return
        try:
            dev = params[0].device
            vals, kinds = update_norms(optimizer, params, dev)
            pending.attach_post(self.host.submit(vals.to(pack_dtype(dev))), kinds)
        except Exception as e:  # noqa: BLE001 - the rest of the record still counts
            pending.params = []
            self._on_error("measuring the relative update", e)

    def _get_plan(self, ctx: GradContext) -> _Plan:
        key = tuple(id(p) for p in ctx.params) + (-1,) + tuple(id(p) for p in ctx.sparse)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        reg = self.registry
        rows = [(reg.lookup(p), r) for r, p in enumerate(ctx.params)]
        rows = sorted((lid, r) for lid, r in rows if lid >= 0)
        dense_rows = [r for _, r in rows]
        sel = None
        if dense_rows != list(range(len(ctx.params))):
            sel = device_tensor(dense_rows, torch.long, ctx.device)  # no blocking host-to-device copy
        sparse = sorted((reg.lookup(p), i, p) for i, p in enumerate(ctx.sparse) if reg.lookup(p) >= 0)
        plan = _Plan(
            key=key, dense_rows=dense_rows, dense_ids=[lid for lid, _ in rows],
            dense_numels=[ctx.params[r].numel() for r in dense_rows], sel=sel,
            sparse_params=[p for _, _, p in sparse], sparse_ids=[lid for lid, _, _ in sparse],
        )
        self._plans[key] = plan
        if len(self._plans) > _PLANS:
            self._plans.popitem(last=False)
        return plan


def warn_once_factory(prefix: str = "gradwatch") -> tuple[Callable[[str, BaseException], None], dict[str, int]]:
    """A ``(kind, exc)`` reporter that warns once per kind and counts every failure."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def report(kind: str, exc: BaseException) -> None:
        with lock:
            first = kind not in seen
            seen[kind] = seen.get(kind, 0) + 1
        if first:
            warn(f"{prefix}: {kind} failed ({type(exc).__name__}: {exc}); training continues without it. "
                 "This warning is shown once per kind of failure.")

    return report, seen

