"""Gradient normalizers (slot S5a, docs/transforms.md): AutoscaledNorm, Centralize, ZScoreNorm.

All three edit ``p.grad`` in place, on the device, without a device sync. On a step whose
gradients are not all finite (unknown on the host: guarded on the device through
``ctx.finite()``) the edit becomes an exact identity (subtract 0, scale by 1) and no running
statistic moves; the step record then carries ``skipped_update = 1``.

Kernel passes per step (over gradient memory, eligible layers only):

* reads, CPU: one signed-sum pass per layer (fp32 accumulation), or none when the statistics pass
  handed its sum column to the context (``ctx.set_sums``: the same ``g.sum(dtype=float32)``,
  valid while no grad was edited since, checked with version counters); the sum of squares
  comes from the context's cached norms (variance = s2/n - mean² finished in float64, as the
  statistics pass does), and the few ill-conditioned layers (|mean| > 10 std, where that formula
  cancels) are re-read exactly in float64. Accelerators: ``var_mean`` per layer (one read,
  exact; picking out ill-conditioned layers there would be a sync). Centralize reads row sums,
  which the statistics pass takes for it when it is the first transform (``wanted_rows``);
* writes: one pass on CPU (``torch.add(shift, g, alpha=scale)``), ``sub_`` + ``mul_`` on
  accelerators, ``sub_`` for Centralize.

After the edit the context's norm cache is updated analytically from the moments (no extra pass),
so a following clipper does not need to re-read the gradients.
"""

from __future__ import annotations

from typing import Any, ClassVar

from gradwatch.agent._torch import Tensor, torch
from gradwatch.agent._warn import warn
from gradwatch.agent.consts import device_tensor
from gradwatch.agent.stats import row_sums
from gradwatch.agent.transforms.base import GradContext, Slot, Transform

__all__ = ["AutoscaledNorm", "Centralize", "ZScoreNorm", "ALPHA_MODES"]

ALPHA_MODES = ("ratio_to_initial", "sqrt_ratio_to_initial", "ratio_to_previous", "none")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _state_dtype(device: torch.device) -> torch.dtype:
    """float64 for running scalars (exact comparisons with host references), except on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def _const(values: tuple[Any, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant vector on ``device`` (indices, element counts), built without a blocking
    copy and cached: the same layer layouts recur step after step."""
    return device_tensor(values, dtype, device)


def _eligible(ctx: GradContext, min_ndim: int = 2) -> list[int]:
    """Indices of dense grads with ndim >= min_ndim and at least two elements."""
    return [i for i, g in enumerate(ctx.grads) if g.ndim >= min_ndim and g.numel() >= 2]


#: A layer whose mean is large against its spread (mean² > _ILL·var) is ill-conditioned for the
#: fast variance ``s2/n - mean²``: fp32 sums lose about 1e-7·mean²/var of it, and the affine form
#: ``g·s + shift`` of the edit loses as much. Such layers take the exact route (on CPU, where
#: knowing which layers they are costs no device sync).
_ILL = 100.0


def _host_is_device(dev: torch.device) -> bool:
    """Whether reading a value of ``dev`` on the host costs no device sync (CPU). Decides the
    CPU routes below (fast moments with a host-side conditioning check, one-pass edits with host
    scalars) against the accelerator routes (``var_mean``, foreach edits); tests patch it to run
    the accelerator routes on CPU."""
    return dev.type == "cpu"


def _layer_moments(ctx: GradContext, idx: list[int], dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """(n, mean, population var, ill) of each layer in ``idx``: three (len(idx),) ``dt`` tensors
    on ctx.device, and the positions (into ``idx``) of ill-conditioned layers.

    CPU: one cheap read per layer, the signed sum in fp32 (none when the statistics pass handed
    its sums in); the sum of squares comes from the context's cached fp32 norms and
    ``var = s2/n - mean²`` is finished in ``dt`` (float64), as the statistics pass does. Welford
    (``var_mean``) costs ~10 plain passes on this CPU, so it runs only for the ill-conditioned
    layers (|mean| > 10·std), in float64, where the fast formula has lost too many digits.

    Accelerators: ``var_mean`` per layer, one read, exact and without a sync (branching on the
    conditioning would be a sync); ``ill`` is then empty."""
    dev = ctx.device
    n = _const(tuple(float(ctx.grads[i].numel()) for i in idx), dt, dev)
    if not _host_is_device(dev):
        vm = [torch.var_mean(ctx.grads[i] if ctx.grads[i].dtype in (torch.float32, torch.float64)
              else ctx.grads[i].float(), correction=0) for i in idx]
        var = torch.stack([v.to(dev, dt, non_blocking=True) for v, _ in vm])
        mean = torch.stack([m.to(dev, dt, non_blocking=True) for _, m in vm])
        return n, mean, var, []
    sel = _const(tuple(idx), torch.int64, dev)
    cached = ctx.cached_sums()
    if cached is not None:  # the statistics pass's sum column: the same fp32 sums, no read
        sums = cached.index_select(0, sel)
    else:
        sums = torch.stack([ctx.grads[i].sum(dtype=torch.float32) for i in idx])
    mean = sums.to(dt) / n
    s2 = ctx.norms.index_select(0, sel).to(dt).square()
    var = (s2 / n - mean.square()).clamp_min(0)
    ill = (mean.square() > _ILL * var).nonzero().flatten().tolist()  # CPU: a host read, no device
    if ill:
        var, mean = var.clone(), mean.clone()
        for k in ill:
            v, m = torch.var_mean(ctx.grads[idx[k]].to(torch.float64), correction=0)
            var[k], mean[k] = v, m
    return n, mean, var, ill


def _finite_flag(ctx: GradContext, *extra: Tensor) -> Tensor:
    """0-dim bool on device: this step's gradients (and ``extra`` scalars) are all finite."""
    fin = ctx.finite()
    for e in extra:
        fin = fin & torch.isfinite(e)
    return fin


def _normalize_(ctx: GradContext, idx: list[int], mean: Tensor, scale: Tensor, ill: list[int]) -> None:
    """g <- (g - mean_l) · scale_l for each layer l in idx, in place (mean 0 and scale 1 on a
    non-finite step: an exact identity, signed zeros included).

    * CPU, fp32/fp64: ONE pass per layer, ``torch.add(shift, g, alpha=scale, out=g)`` with
      ``shift = -mean·scale`` (a fused multiply-add; the scales are read on the host, which on
      CPU costs no device sync). ``mul_`` + ``add_`` would be two passes, and ``addcmul`` with
      0-dim operands is 4-5x slower than either on CPU.
    * ill-conditioned layers (see ``_ILL``) and fp16/bf16 grads: subtract first, then scale,
      in a wider dtype (float64 / float32) rounded once into the grad, so a constant gradient
      becomes exact zeros and a large fp16 amplification cannot overflow before the subtraction.
    * accelerators, fp32/fp64: ``_foreach_sub_`` then ``_foreach_mul_`` per (device, dtype)
      group (two passes; one would need a fused kernel)."""
    dev0 = scale.device
    ill_set = set(ill)
    on_cpu = _host_is_device(dev0)
    scales = scale.tolist() if on_cpu else None
    shifts = (-mean * scale).unbind(0) if on_cpu else ()
    fast: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for k, i in enumerate(idx):
        g = ctx.grads[i]
        if g.dtype in _LOW_PRECISION or k in ill_set:
            wide = torch.float64 if k in ill_set else torch.float32
            g.copy_(g.to(wide).sub_(mean[k].to(g.device, wide)).mul_(scale[k].to(g.device, wide)))
        elif on_cpu and _host_is_device(g.device):
            assert scales is not None
            torch.add(shifts[k], g, alpha=scales[k], out=g)
        else:
            fast.setdefault((g.device, g.dtype), []).append(k)
    for (dev, dtype), ks in fast.items():
        sel = _const(tuple(ks), torch.int64, dev0)
        gs = [ctx.grads[idx[k]] for k in ks]
        torch._foreach_sub_(gs, list(mean.index_select(0, sel).to(dev, dtype).unbind(0)))
        torch._foreach_mul_(gs, list(scale.index_select(0, sel).to(dev, dtype).unbind(0)))


def _layer_mask(ctx: GradContext, idx: list[int], on: Tensor) -> Tensor:
    """(L,) float32: 1 for layers in ``idx`` when ``on`` (0-dim bool), else 0."""
    m = torch.zeros(len(ctx), dtype=torch.float32, device=ctx.device)
    if idx:
        m[_const(tuple(idx), torch.int64, ctx.device)] = 1.0
    return m * on.to(torch.float32)


def _norms_cached(ctx: GradContext) -> bool:
    return ctx._norms is not None


def _update_norms(ctx: GradContext, idx: list[int], new_norms: Tensor | None, fin: Tensor) -> None:
    """Replace the cached norms of layers ``idx`` by ``new_norms`` (computed from the moments)
    when ``fin``. ``None`` (moments from the fp16/bf16 route, whose s2/n - mean² would cancel)
    invalidates the cache instead. A cache that was never filled stays empty (filling it would
    cost a pass)."""
    if not idx or not _norms_cached(ctx):
        return
    if new_norms is None:
        ctx.set_norms(None)
        return
    norms = ctx.norms.clone()
    sel = _const(tuple(idx), torch.int64, ctx.device)
    norms[sel] = torch.where(fin, new_norms.to(torch.float32), norms[sel])
    ctx.set_norms(norms)


def _exact(ctx: GradContext, idx: list[int]) -> bool:
    return all(ctx.grads[i].dtype not in _LOW_PRECISION for i in idx)


class _Stateless(Transform):
    slot: ClassVar[Slot] = Slot.NORMALIZE


class AutoscaledNorm(Transform):
    """Gradient Autoscaled Normalization (Yun, arXiv 2509.03677), **as we read it**.

    Every eligible layer (dense grad, ``ndim > 1``, at least 2 elements: conv and linear weights)
    has its own mean removed, then all eligible layers are multiplied by one global factor α_t;
    other grads are left bit-identical::

        σ_t = std(concat of the raw eligible grads)   (unbiased, before centering)
        σ_ref = σ_t of the first finite step
        α_t = min(clamp_max, σ_t / σ_ref)            (alpha_mode="ratio_to_initial", default)
        g_p ← α_t · (g_p − mean(g_p))

    **The paper's exact α_t is not in any text we could reach** (docs/transforms.md, AutoscaledNorm): the default is
    our reading of its description (one hyperparameter-free global factor that follows the
    natural decline of the global gradient std and never amplifies). The variants are options:
    ``"sqrt_ratio_to_initial"`` (α = sqrt(σ_t/σ_ref)), ``"ratio_to_previous"`` (σ_ref is the last
    finite step's σ), ``"none"`` (centering only, α = 1). ``clamp_max=None`` removes the cap.
    A step whose σ is 0 (all-zero or constant grads) gets α = 1 and does not become the
    reference. α_t, σ_t and σ_ref are reported every step so the reading can be
    revisited.

    Non-finite steps: the gradients are left untouched (exact identity) and σ_ref does not
    move; ``skipped_update`` is 1 in the record.

    Cost: one signed-sum read per eligible layer (none with sums from the statistics pass) plus
    one write pass (CPU; two on accelerators, see the module docstring); no device sync.

    Example::

        AutoscaledNorm()(model.parameters())   # {'alpha': tensor(1.), 'sigma': ..., ...}
    """

    name: ClassVar[str] = "autoscaled_norm"
    slot: ClassVar[Slot] = Slot.NORMALIZE
    config_keys: ClassVar[tuple[str, ...]] = ("alpha_mode", "clamp_max")

    def __init__(self, alpha_mode: str = "ratio_to_initial", clamp_max: float | None = 1.0) -> None:
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {alpha_mode!r}")
        if clamp_max is not None and not clamp_max > 0:
            raise ValueError(f"clamp_max must be positive or None, got {clamp_max}")
        self.alpha_mode = alpha_mode
        self.clamp_max = clamp_max
        self.reset()

    def reset(self) -> None:
        self._sigma_ref = torch.zeros((), dtype=torch.float64)
        self._initialized = torch.zeros((), dtype=torch.bool)

    def _to(self, device: torch.device) -> None:
        dt = _state_dtype(device)
        if self._sigma_ref.device != device or self._sigma_ref.dtype != dt:
            self._sigma_ref = self._sigma_ref.to(device, dt)
            self._initialized = self._initialized.to(device)

    def apply_(self, ctx: GradContext) -> None:
        dev = ctx.device
        self._to(dev)
        dt = self._sigma_ref.dtype
        idx = _eligible(ctx)
        one = torch.ones((), dtype=dt, device=dev)
        if not idx:
            ctx.report(self.name, alpha=one.float(), sigma=torch.full((), float("nan"), device=dev),
                       sigma_ref=self._sigma_ref.float(), skipped_update=torch.zeros((), device=dev),
                       layers=_layer_mask(ctx, idx, one.bool()))
            return
        n, mean, var, ill = _layer_moments(ctx, idx, dt)
        big_n = n.sum()
        grand = (n * mean).sum() / big_n
        ss = (n * var).sum() + (n * (mean - grand).square()).sum()  # total squared deviation
        sigma = (ss / (big_n - 1)).clamp_min(0).sqrt()
        fin = _finite_flag(ctx, sigma)

        ref = torch.where(self._initialized, self._sigma_ref, sigma)
        if self.alpha_mode == "none":
            alpha = one
        else:
            ratio = torch.where(ref > 0, sigma / ref, one)
            alpha = ratio.sqrt() if self.alpha_mode == "sqrt_ratio_to_initial" else ratio
            if self.clamp_max is not None:
                alpha = alpha.clamp_max(self.clamp_max)
        alpha = torch.where(fin, alpha, one)

        # commit state only on finite steps
        new_ref = sigma if self.alpha_mode == "ratio_to_previous" else ref
        self._sigma_ref.copy_(torch.where(fin & (sigma > 0), new_ref, self._sigma_ref))
        # a σ of 0 (all-zero or constant grads) is no reference: every later α would be 1
        self._initialized.copy_(self._initialized | (fin & (sigma > 0)))

        _normalize_(ctx, idx, torch.where(fin, mean, torch.zeros_like(mean)), alpha.expand_as(mean), ill)
        _update_norms(ctx, idx, alpha * (n * var).sqrt() if _exact(ctx, idx) else None, fin)
        ctx.report(self.name, alpha=alpha.float(), sigma=sigma.float(), sigma_ref=ref.float(),
                   skipped_update=(~fin).float(), layers=_layer_mask(ctx, idx, fin))

    def state_dict(self) -> dict[str, Any]:
        # the settings sit beside the state (as they always have), not under "config"
        return {"sigma_ref": self._sigma_ref.detach().clone(), "initialized": self._initialized.detach().clone(),
                **self.config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_config(state)
        self._sigma_ref = torch.as_tensor(state["sigma_ref"]).detach().clone().to(torch.float64)
        self._initialized = torch.as_tensor(state["initialized"]).detach().clone().to(torch.bool)

    def __repr__(self) -> str:
        return f"AutoscaledNorm(alpha_mode={self.alpha_mode!r}, clamp_max={self.clamp_max})"


class Centralize(_Stateless):
    """Gradient Centralization (Yong et al., ECCV 2020), docs/transforms.md, Centralize.

    For each eligible weight gradient the mean over every dim except the output dim (dim 0) is
    subtracted, so each output unit's gradient sums to zero. ``conv_only=False`` (default,
    ``SGD_GC``) touches every grad with ``ndim > 1``; ``conv_only=True`` (``SGD_GCC``) only
    ``ndim > 3``. 1-D grads are untouched. Stateless; on a non-finite step the edit is skipped
    (``inf - inf`` would turn an overflow into NaN).

    Cost: one write pass (``sub_``) plus one read for the row sums (fp32), which inside
    ``watch()`` the statistics pass takes in its own read (:meth:`wanted_rows`); the norm cache
    is invalidated (a following clipper re-measures).

    Example::

        Centralize()(model.parameters())
    """

    name: ClassVar[str] = "centralize"

    settings_keys: ClassVar[tuple[str, ...]] = ('conv_only',)

    def __init__(self, conv_only: bool = False) -> None:
        self.conv_only = conv_only
        self._warned: set[int] = set()

    def _warn_single_column(self, ctx: GradContext, idx: list[int]) -> None:
        """docs/transforms.md, Centralize: a weight with one element per output unit (Linear with
        ``in_features == 1``) centres to all zeros; legitimate, but the user should know."""
        for i in idx:
            p, g = ctx.params[i], ctx.grads[i]
            if g.numel() == g.shape[0] and id(p) not in self._warned:
                self._warned.add(id(p))
                name = ctx.names[i] or f"a {tuple(g.shape)} parameter"
                warn(f"gradwatch: Centralize: {name} has one element per output unit, so its centred gradient is "
                     "all zeros (it will not learn); exclude it or use conv_only=True", UserWarning)

    def wanted_rows(self, ctx: GradContext) -> tuple[list[int], list[int]]:
        return _eligible(ctx, 4 if self.conv_only else 2), []

    def apply_(self, ctx: GradContext) -> None:
        idx = _eligible(ctx, 4 if self.conv_only else 2)
        self._warn_single_column(ctx, idx)
        fin = ctx.finite()
        rows = ctx.cached_rows()
        handed = rows.sums if rows is not None else {}
        for i in idx:
            g = ctx.grads[i]
            s = handed.get(i)
            m = (s if s is not None else row_sums(g)) / (g.numel() // g.shape[0])
            m = torch.where(fin.to(m.device), m, torch.zeros((), dtype=m.dtype, device=m.device))
            g.sub_(m.to(g.dtype).view((g.shape[0],) + (1,) * (g.ndim - 1)))
        if idx:
            # |g|² - row_n·Σm² would cancel for rows that centre to ~0: re-measure when needed.
            _update_norms(ctx, idx, None, fin)
        ctx.report(self.name, layers=_layer_mask(ctx, idx, fin), skipped_update=(~fin).float())

    def __repr__(self) -> str:
        return f"Centralize(conv_only={self.conv_only})"


class ZScoreNorm(_Stateless):
    """Z-score gradient normalization (ZNorm, Yun et al., arXiv 2408.01215), docs/transforms.md, ZScoreNorm.

    Each eligible grad (``ndim > 1``, at least 2 elements) becomes
    ``(g − mean(g)) / (std(g) + eps)`` with the unbiased std and ``eps = 1e-12`` (the author's
    code). A constant gradient becomes zeros. Reports the per-layer amplification ``1/(std+eps)``
    (this is the transform the GAN paper criticizes: low-std layers get amplified). Stateless;
    on a non-finite step the edit is an exact identity.

    Cost: one signed-sum read per layer (none with sums from the statistics pass) plus one write
    pass (CPU; two on accelerators).

    Example::

        ZScoreNorm()(model.parameters())
    """

    name: ClassVar[str] = "zscore_norm"

    settings_keys: ClassVar[tuple[str, ...]] = ('eps',)

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = eps

    def apply_(self, ctx: GradContext) -> None:
        dev = ctx.device
        idx = _eligible(ctx)
        dt = _state_dtype(dev)
        fin = ctx.finite()
        amp = torch.ones(len(ctx), dtype=torch.float32, device=dev)
        if idx:
            n, mean, var, ill = _layer_moments(ctx, idx, dt)
            std = (var * n / (n - 1)).sqrt()
            scale = torch.where(fin, 1.0 / (std + self.eps), torch.ones_like(std))
            _normalize_(ctx, idx, torch.where(fin, mean, torch.zeros_like(mean)), scale, ill)
            _update_norms(ctx, idx, (n * var).sqrt() * scale if _exact(ctx, idx) else None, fin)
            amp[_const(tuple(idx), torch.int64, dev)] = scale.float()
        ctx.report(self.name, amplification=amp, layers=_layer_mask(ctx, idx, fin),
                   skipped_update=(~fin).float())

    def __repr__(self) -> str:
        return f"ZScoreNorm(eps={self.eps})"

