"""The gradient noise scale B_simple (McCandlish et al. 2018) under DistributedDataParallel, live
(and, on one process, from the micro-batches of gradient accumulation: :meth:`NoiseScale._install_accum`).

Data parallelism already produces two batch sizes at once: each rank's local gradient (per-rank
batch ``B_small = b``) exists just before the all-reduce, the all-reduced one (``B_big = W·b``)
just after. A DDP comm hook (:meth:`NoiseScale._hook`) takes, per bucket, the squared norm of
each parameter's local gradient (one ``_foreach_norm`` over the bucket's views: no copy, no host
sync), sums them over ranks with one tiny extra all-reduce issued before DDP's own, runs DDP's
default all-reduce unchanged, and then takes the squared norms of the averaged gradient. At the
optimizer step :meth:`NoiseScale.update` turns them into the unbiased estimates

    |G|²_est = (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    S_est    = (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)          (estimates tr Σ)

per layer and for all measured layers together, and feeds bias-corrected EMAs (β = 0.99) of
both; ``B_simple = EMA(S)/EMA(|G|²)``. Everything stays on the device; the record's resolve
(off the training thread) applies the null rules (:func:`finish`). ``docs/noise_scale.md``
states the assumptions and units.

Never raises into training: a user comm hook already on the model (or DDP refusing ours) warns
once and nothing is recorded; a failure inside the hook still issues the matching collective
(with NaN) so the ranks stay in step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._torch import Tensor, torch
from ._warn import warn
from .consts import device_tensor, fp32_norm, fp32_norms
from .stats import pack_dtype

__all__ = ["NoiseScale", "NoiseLayout", "estimates", "finish", "BETA", "MIN_UPDATES"]

#: EMA smoothing of both estimates (EleutherAI's gpt-neox uses the same).
BETA = 0.99
#: B_simple is null until the EMAs have this many updates (single-step estimates are very noisy).
MIN_UPDATES = 10


def estimates(g2_small: Any, g2_big: Any, b_small: float, b_big: float) -> tuple[Any, Any]:
    """Unbiased ``(|G|²_est, S_est)`` from squared gradient norms measured at two batch sizes
    (floats or tensors; ``b_small < b_big``). ``|G|²_est`` may be negative on a single step."""
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    s = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


def finish(n: float, m_g2: float, m_s: float, beta: float = BETA,
           min_updates: int = MIN_UPDATES) -> tuple[float | None, float | None, float | None]:
    """``(B_simple, EMA(|G|²), EMA(S))`` bias-corrected from the raw EMA state after ``n`` updates.

    The EMAs are null before the first update; B_simple is null until ``min_updates`` updates
    and while ``EMA(|G|²) <= 0`` (no signal measured yet: the ratio means nothing)."""
    n = int(round(n))
    if n < 1:
        return None, None, None
    c = 1.0 - beta ** n
    g2, s = m_g2 / c, m_s / c
    b = s / g2 if n >= min_updates and g2 > 0 and math.isfinite(g2) else None
    return b, g2, s


@dataclass(frozen=True)
class NoiseLayout:
    """How to read a packed snapshot (:meth:`NoiseScale.snapshot`): ``[n, m_g2, m_s]`` for the
    step, then per layer ``n (L) | m_g2 (L) | m_s (L)`` in layer-table order."""

    n_layers: int
    beta: float = BETA
    min_updates: int = MIN_UPDATES

    @property
    def size(self) -> int:
        return 3 + 3 * self.n_layers

    def read(self, v: Sequence[float], layer_ids: Sequence[int]) -> tuple[dict[str, float | None], list[float | None]]:
        """Step fields (``noise_scale``, ``noise_g2``, ``noise_trace``) and the per-layer
        ``noise_scale`` column aligned with ``layer_ids``."""
        b, g2, s = finish(v[0], v[1], v[2], self.beta, self.min_updates)
        L = self.n_layers
        col: list[float | None] = []
        for lid in layer_ids:
            if 0 <= lid < L:
                col.append(finish(v[3 + lid], v[3 + L + lid], v[3 + 2 * L + lid], self.beta, self.min_updates)[0])
            else:
                col.append(None)
        return {"noise_scale": b, "noise_g2": g2, "noise_trace": s}, col


@dataclass
class _Bucket:
    """One bucket's measurements of the current step, on the device."""

    layers: Tensor  # layer index per parameter (long; -1 = not measured)
    local: Tensor  # Σ over ranks of the local squared norms
    big: Tensor  # squared norms of the all-reduced gradient


class NoiseScale:
    """Comm hook (or accumulation hooks) plus device-side EMA state of one watched model.

    Args:
        model: the DistributedDataParallel module; a plain module on one process: micro-batches
            of gradient accumulation are the small batches; anything else: warn once, record nothing.
        lookup: parameter -> layer index (-1: not measured), the watcher's registry.
        n_layers: current size of the layer table (callable: the table grows).
        batch_size: per-rank (accumulation: per-micro-batch) examples; None: units of those batches.
        active: host predicate "the step about to run is recorded" (same on every rank).
        report: the watcher's warn-once failure reporter.
    """

    def __init__(self, model: Any, *, lookup: Callable[[Tensor], int], n_layers: Callable[[], int],
                 batch_size: int | None, active: Callable[[], bool],
                 report: Callable[[str, BaseException], None], beta: float = BETA,
                 min_updates: int = MIN_UPDATES) -> None:
        self._model = model
        self._lookup = lookup
        self._n_layers = n_layers
        self.batch = float(batch_size) if batch_size else 1.0
        self._active = active
        self._report = report
        self.beta = beta
        self.min_updates = min_updates
        self.installed = False
        self._tried = False
        self._lock = threading.Lock()
        self._buckets: dict[int, _Bucket] = {}
        self._ids: dict[tuple[int, ...], list[int]] = {}
        self._state: Tensor | None = None  # (3 + 3L,) raw EMA state, see NoiseLayout
        self._world = 1
        self._group: Any = None
        #: "ddp" (local vs all-reduced gradient) or "accum" (first micro-batch vs accumulated).
        self.mode = "ddp"
        self._count: dict[int, int] = {}
        self._first: dict[int, tuple[Tensor, Tensor]] = {}
        self._warned_k = False
        self._handles: list[Any] = []

    # -- installation --------------------------------------------------------------------------

    def install(self) -> bool:
        """Register the comm hook or the accumulation hooks (once). False, with one warning,
        when neither can be used."""
        if self._tried:
            return self.installed
        self._tried = True
        ddp = torch.nn.parallel.DistributedDataParallel
        m = self._model
        if not isinstance(m, ddp):
            return self._install_accum()
        self._group = getattr(m, "process_group", None)
        self._world = self._group.size() if self._group is not None else torch.distributed.get_world_size()
        if self._world < 2:
            warn("gradwatch: noise_scale needs at least 2 data-parallel ranks (one batch size only); "
                 "the gradient noise scale is not recorded.", UserWarning)
            return False
        if getattr(m, "_comm_hooks", None):
            warn("gradwatch: the DDP model already has a communication hook; gradwatch does not replace it and "
                 "the gradient noise scale is not recorded.", UserWarning)
            return False
        try:
            m.register_comm_hook(self._group, _unannotated(self._hook))
        except Exception as e:  # noqa: BLE001 - e.g. a builtin hook or DDP mixed precision holds the slot
            warn(f"gradwatch: DDP refused gradwatch's communication hook ({type(e).__name__}: {e}); the gradient "
                 "noise scale is not recorded.", UserWarning)
            return False
        self.installed = True
        return True

    def remove(self) -> None:
        """Detach the accumulation hooks (a DDP comm hook cannot be removed: it stays, measuring
        nothing once the watcher is closed)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _install_accum(self) -> bool:
        """No DDP: micro-batches of gradient accumulation serve as the small batches (a hook
        after each parameter's gradient accumulation keeps the first micro-batch's squared norm)."""
        m = self._model
        d = torch.distributed
        if not isinstance(m, torch.nn.Module) or (d.is_available() and d.is_initialized() and d.get_world_size() > 1):
            warn("gradwatch: noise_scale needs the DistributedDataParallel-wrapped model passed to watch() (or, on "
                 "one process, the model trained with gradient accumulation); the gradient noise scale is not "
                 "recorded.", UserWarning)
            return False
        params = [p for p in m.parameters() if p.requires_grad and self._lookup(p) >= 0]
        if not params:
            return False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_accumulated) for p in params]
        self.mode = "accum"
        self._world = 1
        self.installed = True
        return True

    @torch.no_grad()
    def _on_accumulated(self, p: Tensor) -> None:
        """After ``p.grad`` took a micro-batch: the first one of the step is kept (its squared
        norm, on the device). Never raises into backward."""
        try:
            if not self._active():
                return
            key = id(p)
            c = self._count.get(key, 0)
            self._count[key] = c + 1
            g = p.grad
            if c == 0 and g is not None and not g.is_sparse:
                sq = fp32_norm(g).to(pack_dtype(g.device)).square()
                self._first[key] = (p, sq)
        except Exception as e:  # noqa: BLE001
            self._report("measuring the first micro-batch for the noise scale", e)

    def _accum_take(self, grads_scaled: bool) -> tuple[Tensor, Tensor, Tensor, float, bool] | None:
        """This step's accumulation measurements: with k micro-batches each of loss/k, the first
        micro-batch's own gradient is k·g⁽¹⁾, so |G_small|² = k²·|g⁽¹⁾|²; |G_big|² is the
        accumulated gradient's. B_big/B_small = k. Parameters that did not take all k are left out."""
        counts, firsts = self._count, self._first
        self._count, self._first = {}, {}
        if not firsts:
            return None
        k = max(counts.values())
        if k < 2:
            if not self._warned_k:
                self._warned_k = True
                warn("gradwatch: noise_scale without DistributedDataParallel needs gradient accumulation (at least 2 "
                     "backward passes per optimizer step); steps with one are not measured.", UserWarning)
            return None
        got = [(p, sq) for key, (p, sq) in firsts.items() if counts[key] == k and p.grad is not None
               and not p.grad.is_sparse]
        if not got:
            return None
        dev = got[0][1].device
        ids = device_tensor([self._lookup(p) for p, _ in got], torch.long, dev)
        small = torch.stack([sq.to(dev) for _, sq in got]) * float(k * k)
        pd = small.dtype
        grads = [p.grad for p, _ in got if p.grad is not None]
        big = torch.stack([x.to(dev) for x in fp32_norms(grads, 2)]).to(pd).square()
        return ids, small, big, float(k), grads_scaled

    # -- the comm hook (runs inside backward, every rank, same order) --------------------------

    def _layer_ids(self, params: Sequence[Tensor]) -> list[int]:
        key = tuple(id(p) for p in params)
        ids = self._ids.get(key)
        if ids is None:
            ids = [self._lookup(p) for p in params]
            self._ids[key] = ids
        return ids

    @torch.no_grad()
    def _hook(self, group: Any, bucket: Any) -> torch.futures.Future[Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buf = bucket.buffer()
        pd = pack_dtype(buf.device)
        grads = bucket.gradients()
        active = False
        try:
            active = bool(self._active())
            one = torch.ones(1, dtype=pd, device=buf.device)  # last element: this rank measured
            local = (torch.cat([torch.stack(fp32_norms(grads, 2)).to(pd).square(), one])
                     if active else torch.zeros(len(grads) + 1, dtype=pd, device=buf.device))
        except Exception as e:  # noqa: BLE001 - the collective below must still be issued on every rank
            self._report("measuring local gradient norms for the noise scale", e)
            local = torch.full((len(grads) + 1,), math.nan, dtype=pd, device=buf.device)
        # Issued on every step, measured or not: the ranks' sequences of collectives must match
        # even if their watchers disagree about this step (one closed early, a different `every`),
        # else DDP's own all-reduce would pair with this one and training would fail.
        f_local = torch.distributed.all_reduce(local, group=group, async_op=True).get_future()
        f_main = default_hooks.allreduce_hook(group, bucket)
        if not active:
            return torch.futures.collect_all([f_local, f_main]).then(lambda f: f_main.value())
        index = bucket.index()
        params = bucket.parameters()

        def done(f: torch.futures.Future[Any]) -> Tensor:
            out = f_main.value()
            try:
                big = torch.stack(fp32_norms(bucket.gradients(), 2)).to(pd).square()
                ids = device_tensor(self._layer_ids(params), torch.long, buf.device)
                summed = f_local.value()[0]
                # a rank that did not measure (closed watcher) sent zeros: not a valid sum, not fed
                ok = summed[-1:] == self._world
                local_sum = torch.where(ok, summed[:-1], torch.full_like(summed[:-1], math.nan))
                with self._lock:
                    self._buckets[index] = _Bucket(ids, local_sum, big)
            except Exception as e:  # noqa: BLE001
                self._report("measuring all-reduced gradient norms for the noise scale", e)
            return out

        return torch.futures.collect_all([f_local, f_main]).then(done)

    # -- at the optimizer step -----------------------------------------------------------------

    @torch.no_grad()
    def update(self, *, loss_scale: Tensor | float | None = None, skipped: bool | None = None,
               found_inf: Tensor | None = None, grads_scaled: bool = False) -> tuple[Tensor, NoiseLayout] | None:
        """Feed this step's measurements into the EMAs and return the packed snapshot (None
        before anything was measured). Skipped steps and non-finite estimates leave the EMAs as
        they were. No host sync. ``grads_scaled``: the ``.grad`` tensors are still multiplied by
        the loss scale now (fused optimizers); only the accumulation mode reads them here."""
        L = self._n_layers()
        got = self._accum_take(grads_scaled) if self.mode == "accum" else self._ddp_take()
        if got is None:
            return (self._state, self.layout(L)) if self._state is not None and self._state.numel() == 3 + 3 * L else None
        ids, local, big, ratio, big_scaled = got
        dev, pd = local.device, local.dtype
        keep = ids >= 0
        ids = torch.where(keep, ids, torch.zeros_like(ids))
        if loss_scale is not None:  # the small-batch norms were taken of loss-scaled gradients
            s = loss_scale.reshape(()).to(device=dev, dtype=pd) if isinstance(loss_scale, Tensor) else \
                torch.full((), float(loss_scale), dtype=pd, device=dev)
            inv2 = (s * s).reciprocal()
            local = local * inv2
            if big_scaled:
                big = big * inv2
        zero = torch.zeros((), dtype=pd, device=dev)
        local = torch.where(keep, local, zero)
        big = torch.where(keep, big, zero)
        per_small = torch.zeros(L, dtype=pd, device=dev).index_add_(0, ids, local)
        per_big = torch.zeros(L, dtype=pd, device=dev).index_add_(0, ids, big)
        present = torch.zeros(L, dtype=pd, device=dev).index_add_(0, ids, keep.to(pd)) > 0  # no boolean indexing: no sync
        b_small, b_big = self.batch, self.batch * ratio
        g2_l, s_l = estimates(per_small, per_big, b_small, b_big)
        g2_t, s_t = estimates(per_small.sum().reshape(1), per_big.sum().reshape(1), b_small, b_big)
        ok_t = torch.isfinite(g2_t) & torch.isfinite(s_t) & present.any().reshape(1)
        if skipped:
            ok_t = torch.zeros_like(ok_t)
        if found_inf is not None:
            ok_t = ok_t & (found_inf.reshape(1).to(dev) == 0)
        ok_l = present & torch.isfinite(g2_l) & torch.isfinite(s_l) & ok_t
        state = self._grown(L, dev, pd)
        (n_t, n_l), (mg_t, mg_l), (ms_t, ms_l) = _views(state, L)
        a = self.beta
        for cnt, mg, ms, ok, g2, s in ((n_t, mg_t, ms_t, ok_t, g2_t, s_t), (n_l, mg_l, ms_l, ok_l, g2_l, s_l)):
            zero_x = torch.zeros_like(g2)
            # where() twice: a NaN estimate on a step that is not fed must not reach the EMA (NaN·0 = NaN)
            mg.copy_(torch.where(ok, a * mg + (1 - a) * torch.where(ok, g2, zero_x), mg))
            ms.copy_(torch.where(ok, a * ms + (1 - a) * torch.where(ok, s, zero_x), ms))
            cnt.add_(ok.to(pd))
        return state.clone(), self.layout(L)

    def _ddp_take(self) -> tuple[Tensor, Tensor, Tensor, float, bool] | None:
        """This step's bucket measurements: layer ids, mean over ranks of the local squared norms,
        squared norms of the all-reduced gradient, B_big/B_small = world, both loss-scaled."""
        with self._lock:
            buckets, self._buckets = list(self._buckets.values()), {}
        if not buckets:
            return None
        return (torch.cat([b.layers for b in buckets]), torch.cat([b.local for b in buckets]) / self._world,
                torch.cat([b.big for b in buckets]), float(self._world), True)

    def layout(self, n_layers: int) -> NoiseLayout:
        return NoiseLayout(n_layers, self.beta, self.min_updates)

    def _grown(self, L: int, dev: torch.device, pd: torch.dtype) -> Tensor:
        """The EMA state, grown (zeros) when the layer table grew."""
        st = self._state
        if st is None:
            st = torch.zeros(3 + 3 * L, dtype=pd, device=dev)
        elif st.numel() != 3 + 3 * L:
            old = (st.numel() - 3) // 3
            new = torch.zeros(3 + 3 * L, dtype=pd, device=dev)
            new[:3] = st[:3]
            for k in range(3):
                new[3 + k * L: 3 + k * L + old] = st[3 + k * old: 3 + (k + 1) * old]
            st = new
        self._state = st
        return st


def _unannotated(f: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``f`` as a plain two-argument function: DDP compares a hook's annotations with the real
    classes, and this module's are strings (postponed evaluation)."""

    def gradwatch_noise_hook(state, bucket):
        return f(state, bucket)

    return gradwatch_noise_hook


def _views(state: Tensor, L: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(count, EMA |G|², EMA S) views of the state, each as (step-level (1,), per-layer (L,))."""
    return ((state[0:1], state[3:3 + L]), (state[1:2], state[3 + L:3 + 2 * L]), (state[2:3], state[3 + 2 * L:]))
