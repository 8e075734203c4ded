"""Loss-scale headroom and optimizer-aware per-layer signals (``docs/statistics.md``).

* ``headroom``: how many powers of two the scaled gradient sits below fp16's largest finite
  value, ``log2(65504 / (maxabs · S))``, from the measured max-abs and the loss scale ``S`` the
  backward used; computed on the host when the record is built (no device work at all).
* ``underflow`` and ``zeros``: counts taken inside the fused statistics pass
  (:func:`gradwatch.agent.stats.layer_moments` with ``counts=True``); :func:`small_multiplier`
  gives the multiplier that pass compares against.
* ``mom_cos``: the cosine between the gradient and the optimizer's own momentum buffer (the
  buffer from the previous step, read before the optimizer steps), :func:`momentum_cosine`:
  a bounded number of foreach ops per (device, dtype) group (large fp32 tensors on CPU: a few
  per-tensor ops, :func:`_large_cosines`), no host sync, nothing kept between steps.

Pure functions; nothing here raises into training (the recorder guards every call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from . import stats as _stats
from ._torch import Tensor, torch
from .consts import device_tensor, fp32_norm, fp32_norms
from .stats import _chunks, pack_dtype

__all__ = ["FP16_MAX", "FP16_TINY", "headroom", "small_multiplier", "momentum_buffers", "momentum_cosine"]

#: fp16's largest finite value and smallest normal value.
FP16_MAX = 65504.0
FP16_TINY = 2.0**-14
_LOG2_MAX = math.log2(FP16_MAX)

#: Optimizers whose state holds a momentum of the gradient itself (same units and shape), and
#: its key: SGD's ``momentum_buffer``; the first moment ``exp_avg`` (an EMA of the gradients) of
#: Adam, AdamW and the Adam variants that keep it under that name. Others (Adagrad, RMSprop,
#: whose ``momentum_buffer`` is a momentum of g/√v, LBFGS...): no momentum cosine.
def _momentum_key(optimizer: Any) -> str | None:
    o = torch.optim
    if isinstance(optimizer, o.SGD):
        return "momentum_buffer"
    adam_family = tuple(getattr(o, n) for n in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax") if hasattr(o, n))
    if isinstance(optimizer, adam_family):
        return "exp_avg"
    return None


def headroom(maxabs: float, scale: float, numel: int) -> float | None:
    """``log2(65504 / (maxabs · scale))`` in float64: +inf for an all-zero gradient, −inf when
    ``maxabs`` is infinite, NaN when it is NaN; None for an empty tensor or an unusable scale."""
    if numel == 0 or not scale > 0.0 or math.isinf(scale):
        return None
    if maxabs != maxabs:
        return math.nan
    if maxabs == 0.0:
        return math.inf
    if math.isinf(maxabs):
        return -math.inf
    return _LOG2_MAX - (math.log2(maxabs) + math.log2(scale))  # no overflow of the product


def small_multiplier(loss_scale: Tensor | float | None, grads_scaled: bool, device: torch.device) -> Tensor | None:
    """``k`` such that ``0 < |x|·k < 1`` means a scaled magnitude below fp16's smallest normal:
    ``k = S·2^14`` for unscaled gradients, ``2^14`` for gradients still multiplied by ``S``
    (fused optimizers under torch's scaler). A 0-dim float32 tensor on ``device`` (no host read
    of a device scale); None without a loss scale. Exact (a power of two) when S is one."""
    if loss_scale is None:
        return None
    if grads_scaled:
        return torch.full((), 1.0 / FP16_TINY, dtype=torch.float32, device=device)
    if isinstance(loss_scale, torch.Tensor):
        s = loss_scale.detach().reshape(-1)[0].to(device=device, dtype=torch.float32, non_blocking=True)
    else:
        s = torch.full((), float(loss_scale), dtype=torch.float32, device=device)
    return s * (1.0 / FP16_TINY)


def momentum_buffers(optimizer: Any, params: Sequence[Tensor]) -> list[Tensor | None]:
    """The optimizer's momentum of each parameter's gradient (:func:`_momentum_key`), or None
    where it keeps none yet (first step, ``momentum=0``, an optimizer without one), the tensor is
    empty, or the buffer does not match the parameter (shape, a sparse or complex tensor). Host-side lookups only."""
    key = _momentum_key(optimizer)
    state = getattr(optimizer, "state", None)
    if key is None or state is None:
        return [None] * len(params)
    out: list[Tensor | None] = []
    for p in params:
        st = state.get(p)
        b = st.get(key) if isinstance(st, dict) else None
        buf = b if isinstance(b, torch.Tensor) else None
        if buf is not None and (buf.shape != p.shape or p.numel() == 0 or buf.is_sparse or buf.is_complex()
                                or not buf.is_floating_point()):
            buf = None
        out.append(buf)
    return out


@torch.no_grad()
def momentum_cosine(grads: Sequence[Tensor], bufs: Sequence[Tensor | None], out_device: torch.device) -> Tensor:
    """(len(grads),) float32 cosines ``g·m / (‖g‖·‖m‖)`` per pair (0 where a buffer is None, a
    tensor is empty or either norm is 0; NaN where either holds NaN/inf).

    Both sides are upcast to float64 (exact for fp16/bf16/fp32 values), scaled to unit length,
    and the cosine is ``1 − ‖ĝ − m̂‖²/2`` with every square accumulated in float64 (no
    cancellation, whatever the ratio of the norms): per chunk of tensors
    (:func:`gradwatch.agent.stats._chunks`) two upcasts, two divisions, one subtraction and three
    foreach norms, so the op count is a constant per (device, dtypes) group. No host sync;
    the scratch is freed with the chunk (nothing is kept between steps)."""
    k = len(grads)
    slots: list[Tensor | None] = [None] * k
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = {}
    large: list[int] = []
    for i, (g, m) in enumerate(zip(grads, bufs)):
        if m is not None and g.numel() > 0 and m.device == g.device:
            if _large_pair(g, m):
                large.append(i)
            else:
                groups.setdefault((g.device, g.dtype, m.dtype), []).append(i)
    if large:
        cos = _large_cosines([grads[i] for i in large], [bufs[i] for i in large])  # type: ignore[misc]
        for i, c in zip(large, cos.to(device=out_device, dtype=torch.float32).unbind(0)):
            slots[i] = c
    for (dev, _, _), idx in groups.items():
        hp = pack_dtype(dev)
        one = torch.ones((1,), dtype=hp, device=dev)
        gs = [grads[i] for i in idx]
        ms = [b for b in (bufs[i] for i in idx) if b is not None]  # all of them (idx has buffers only)
        ng: list[Tensor] = []
        nm: list[Tensor] = []
        nd: list[Tensor] = []
        for a, b in _chunks(gs):
            g64 = torch._foreach_mul(gs[a:b], [one] * (b - a))
            m64 = torch._foreach_mul(ms[a:b], [one] * (b - a))
            na = torch._foreach_norm(g64, 2, dtype=hp)
            nb = torch._foreach_norm(m64, 2, dtype=hp)
            ng.extend(na)
            nm.extend(nb)
            torch._foreach_div_(g64, na)  # unit vectors: no cancellation whatever ‖g‖/‖m‖ is
            torch._foreach_div_(m64, nb)
            torch._foreach_sub_(g64, m64)
            nd.extend(torch._foreach_norm(g64, 2, dtype=hp))
        den = torch.stack(ng) * torch.stack(nm)
        cos = 1.0 - 0.5 * torch.stack(nd).square()
        cos = torch.where(den == 0, torch.zeros_like(cos), cos).clamp(-1.0, 1.0)  # NaN stays NaN
        for i, c in zip(idx, cos.to(device=out_device, dtype=torch.float32).unbind(0)):
            slots[i] = c
    return _assemble(slots, out_device)


def _large_pair(g: Tensor, m: Tensor) -> bool:
    """A pair :func:`_large_cosines` measures: large contiguous fp32 tensors on CPU (see
    :func:`gradwatch.agent.stats._large_moments` for why CPU takes per-tensor ops there)."""
    return (g.device.type == "cpu" and g.dtype == m.dtype == torch.float32 and g.numel() >= _stats._LARGE
            and g.shape == m.shape and g.is_contiguous() and m.is_contiguous())


def _large_cosines(gs: list[Tensor], ms: list[Tensor]) -> Tensor:
    """(k,) float64 cosines of large CPU fp32 pairs: ``Σg·m``, ``Σg²`` and ``Σm²`` as products
    into a reused scratch and fp32 cascade sums (no float64 upcast of 2×4 bytes per element
    into fresh memory, which cost ~5× the whole statistics pass on an 8.4M-element MLP), the
    division in float64. Absolute error about 2.5e-7 at worst (each product rounded once, the
    cascade sums ~1e-7 relative); 0 where a norm is 0, NaN where either holds NaN/inf (or its
    squares overflow fp32, as its fp32 L2 norm does)."""
    dots: list[Tensor] = []
    gg: list[Tensor] = []
    mm: list[Tensor] = []
    for g, m in zip(gs, ms):
        for acc, a, b in ((dots, g, m), (gg, g, g), (mm, m, m)):
            acc.append(_stats._total([torch.mul(pa, pb, out=dst).sum() for pa, pb, dst in _stats._pieces(a.view(-1), b.view(-1))]))
    hp = pack_dtype(gs[0].device)
    dot = torch.stack(dots).to(hp)
    den = (torch.stack(gg).to(hp) * torch.stack(mm).to(hp)).sqrt()
    cos = dot / den
    return torch.where(den == 0, torch.zeros_like(cos), cos).clamp(-1.0, 1.0)  # NaN stays NaN


def _second_moment(st: dict[str, Any], amsgrad: bool) -> Tensor:
    """The second moment Adam's step divided by: ``max_exp_avg_sq`` under amsgrad, else ``exp_avg_sq``."""
    return st["max_exp_avg_sq"] if amsgrad and "max_exp_avg_sq" in st else st["exp_avg_sq"]


def _adam_chunk_norms(ps: Sequence[Tensor], sts: Sequence[dict[str, Any]], amsgrad: Sequence[bool],
                      rb2: Sequence[Any], eps: Sequence[float], step: Sequence[Any], wd: Sequence[float]) -> list[Tensor]:
    """``‖Δw‖`` of one chunk of Adam parameters from their updated moments, per parameter
    ``u = step · m / (√v / rb2 + eps)`` and, for a decoupled decay ``wd = lr·wd``,
    ``Δw = −(wd·w_new + u) / (1 − wd)``. ``rb2`` (√bc2) and ``step`` (lr/bc1) are host floats, or
    0-dim device tensors where the step count lives on the device."""
    den = torch._foreach_sqrt([_second_moment(s, a) for s, a in zip(sts, amsgrad)])
    torch._foreach_div_(den, list(rb2))
    torch._foreach_add_(den, list(eps))
    u = torch._foreach_div([s["exp_avg"] for s in sts], den)
    torch._foreach_mul_(u, list(step))
    if any(wd):
        torch._foreach_add_(u, torch._foreach_mul(list(ps), list(wd)))
        torch._foreach_div_(u, [1.0 - w for w in wd])
    return fp32_norms(u, 2)


def _large_adam(p: Tensor, st: dict[str, Any], f: tuple[float, float, float, float, bool]) -> bool:
    """An Adam parameter :func:`_adam_update_norm` measures: a large contiguous fp32 CPU tensor
    whose moments are too."""
    v = _second_moment(st, f[4])
    m = st["exp_avg"]
    return (p.device.type == "cpu" and p.dtype == m.dtype == v.dtype == torch.float32 and p.numel() >= _stats._LARGE
            and p.is_contiguous() and m.is_contiguous() and v.is_contiguous() and m.shape == v.shape == p.shape)


def _adam_update_norm(p: Tensor, st: dict[str, Any], f: tuple[float, float, float, float, bool]) -> Tensor:
    """``‖Δw‖`` of one large fp32 CPU Adam parameter: the chunk route's arithmetic, in the same
    order, in the reused scratch instead of two freshly allocated tensors of the parameter's
    size (page faults on CPU; see :func:`gradwatch.agent.stats._large_moments`)."""
    v = _second_moment(st, f[4])
    norms: list[Tensor] = []
    for pv, pm, pp, u in _stats._pieces(v.view(-1), st["exp_avg"].view(-1), p.view(-1)):
        torch.sqrt(pv, out=u)
        u.div_(f[1]).add_(f[2])
        torch.div(pm, u, out=u)
        u.mul_(f[0])
        if f[3]:
            u.add_(pp, alpha=f[3]).div_(1.0 - f[3])
        norms.append(fp32_norm(u))
    return norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()


def _assemble(slots: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """(len(slots),) float32: the 0-dim values where given, 0 elsewhere. One stack, no index
    tensor (a layout that changes between steps would otherwise copy a new one to the device)."""
    if not slots:
        return torch.zeros(0, dtype=torch.float32, device=device)
    zero = None
    out: list[Tensor] = []
    for t in slots:
        if t is None:
            zero = zero if zero is not None else torch.zeros((), dtype=torch.float32, device=device)
            t = zero
        out.append(t)
    return torch.stack(out)


def _float(x: Any) -> float | None:
    """A hyper-parameter or step count as a host float; None for a tensor on an accelerator
    (reading it would synchronize the device)."""
    if isinstance(x, torch.Tensor):
        return float(x.item()) if x.device.type == "cpu" and x.numel() == 1 else None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _device_step(t: Any) -> bool:
    """Whether an optimizer's step count lives on an accelerator (reading it would synchronize)."""
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def _adam_hparams(optimizer: Any, group: dict[str, Any], st: Any) -> tuple[float, float, float, float, float, bool] | None:
    """(lr, β1, β2, eps, lr·wd of a decoupled decay or 0, amsgrad) of one Adam/AdamW parameter
    with moments, as host values; None where one is missing or a tensor on a device (a read
    would synchronize)."""
    if not isinstance(st, dict) or not all(k in st for k in ("exp_avg", "exp_avg_sq", "step")):
        return None
    lr, eps, wd = _float(group.get("lr")), _float(group.get("eps")), _float(group.get("weight_decay", 0.0))
    betas = group.get("betas")
    if lr is None or eps is None or wd is None or not isinstance(betas, (tuple, list)):
        return None
    b1, b2 = _float(betas[0]), _float(betas[1])
    if b1 is None or b2 is None:
        return None
    decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
    return lr, b1, b2, eps, (lr * wd if decoupled else 0.0), bool(group.get("amsgrad"))


def _adam_factors(optimizer: Any, group: dict[str, Any], st: Any) -> tuple[float, float, float, float, bool] | None:
    """(step size lr/bc1, √bc2, eps, lr·wd of a decoupled decay or 0, amsgrad) of one Adam/AdamW
    parameter after its step, or None when its state cannot give them without a device read."""
    h = _adam_hparams(optimizer, group, st)
    if h is None or _device_step(st["step"]):
        return None
    t = _float(st["step"])
    if t is None or t < 1:
        return None
    lr, b1, b2, eps, wd, amsgrad = h
    return lr / (1.0 - b1**t), math.sqrt(1.0 - b2**t), eps, wd, amsgrad


def _adam_device_args(optimizer: Any, group: dict[str, Any], st: Any) -> tuple[float, float, float, float, float, bool] | None:
    """:func:`_adam_hparams` of one Adam/AdamW parameter whose step count lives on its
    accelerator (fused or capturable Adam): the bias corrections are then taken there, from that
    tensor (no read). A tensor learning rate on the device: None (the lower bound)."""
    h = _adam_hparams(optimizer, group, st)
    if h is None:
        return None
    t, m = st["step"], st["exp_avg"]
    return h if _device_step(t) and isinstance(m, torch.Tensor) and t.device == m.device and t.numel() == 1 else None


def _adam_device_norms(params: Sequence[Tensor], sts: Sequence[dict[str, Any]],
                       args: Sequence[tuple[float, float, float, float, float, bool]]) -> list[Tensor]:
    """``‖Δw‖`` of Adam parameters whose step counts are device tensors: :func:`_adam_factors`'
    arithmetic, with ``lr/bc1`` and ``√bc2`` computed on the device from each parameter's own
    step count (fp32, as torch's capturable Adam does): per chunk the step counts stacked, a few
    vector ops, then :func:`_adam_chunk_norms` with lists of 0-dim operands (those run per
    tensor on CUDA; sampled steps only). No host sync."""
    out: list[Tensor] = []
    for a, b in _chunks(params):
        sl = range(a, b)
        dev = sts[a]["step"].device
        t = torch.stack([sts[j]["step"].reshape(()) for j in sl]).to(torch.float32)
        b1 = device_tensor([args[j][1] for j in sl], torch.float32, dev)
        b2 = device_tensor([args[j][2] for j in sl], torch.float32, dev)
        lr = device_tensor([args[j][0] for j in sl], torch.float32, dev)
        step_size = lr / (1.0 - torch.pow(b1, t))  # lr / bc1
        rb2 = torch.sqrt(1.0 - torch.pow(b2, t))  # √bc2
        out.extend(_adam_chunk_norms(params[a:b], sts[a:b], [args[j][5] for j in sl], rb2.unbind(),
                                     [args[j][3] for j in sl], step_size.unbind(), [args[j][4] for j in sl]))
    return out


@torch.no_grad()
def update_norms(optimizer: Any, params: Sequence[Tensor], out_device: torch.device) -> tuple[Tensor, list[str | None]]:
    """After ``optimizer.step()``: per parameter, ``‖Δw‖`` of the step where the optimizer's state
    gives it exactly, else ``‖w‖`` after the step (for the weight-norm difference). Returns
    float32 values on ``out_device`` and, per parameter, ``"delta"``, ``"after"`` or None (empty).

    * Adam / AdamW (state ``exp_avg``, ``exp_avg_sq``, ``step`` on the host): the step's
      ``u = lr/bc1 · m / (√v/√bc2 + eps)`` from the updated moments (``max_exp_avg_sq`` under
      amsgrad) and, for a decoupled decay, ``Δw = −(lr·wd·w_new + u) / (1 − lr·wd)`` (the weight
      before the step recovered from the one after). Adam's L2 decay is inside m and v already.
    * SGD with momentum, not Nesterov: ``Δw = −lr · buf`` (the updated buffer).
    * Adam / AdamW with the step count on an accelerator (fused, capturable): the same, with the
      bias corrections taken on the device from that count (:func:`_adam_device_norms`).
    * Anything else (plain SGD, Nesterov, other optimizers, a tensor learning rate on a device):
      ``‖w‖`` after the step; the recorder reports ``|‖w_new‖ − ‖w‖| / ‖w‖``, a lower bound of the
      relative update (triangle inequality).

    Foreach ops per chunk (scratch freed with the chunk, nothing kept between steps; large fp32
    CPU Adam parameters: :func:`_adam_update_norm`); no host sync (hyper-parameters and CPU step
    counts are host values)."""
    k = len(params)
    slots: list[Tensor | None] = [None] * k
    kinds: list[str | None] = [None] * k
    state = getattr(optimizer, "state", {})
    group_of = {id(p): g for g in getattr(optimizer, "param_groups", ()) for p in g["params"]}
    adam: dict[tuple[torch.device, torch.dtype], list[tuple[int, tuple[float, float, float, float, bool]]]] = {}
    sgd: dict[tuple[torch.device, torch.dtype], list[tuple[int, float]]] = {}
    after: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    adam_dev: dict[tuple[torch.device, torch.dtype], list[tuple[int, tuple[float, float, float, float, float, bool]]]] = {}
    is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        grp = group_of.get(id(p), {})
        st = state.get(p)
        key = (p.device, p.dtype)
        if is_adam and (f := _adam_factors(optimizer, grp, st)) is not None:
            adam.setdefault(key, []).append((i, f))
            kinds[i] = "delta"
            continue
        if is_adam and (da := _adam_device_args(optimizer, grp, st)) is not None:
            adam_dev.setdefault(key, []).append((i, da))
            kinds[i] = "delta"
            continue
        buf = st.get("momentum_buffer") if isinstance(st, dict) else None
        lr = _float(grp.get("lr"))
        if (isinstance(optimizer, torch.optim.SGD) and isinstance(buf, torch.Tensor) and not grp.get("nesterov")
                and grp.get("momentum") and lr is not None and buf.shape == p.shape):
            sgd.setdefault((buf.device, buf.dtype), []).append((i, lr))
            kinds[i] = "delta"
            continue
        after.setdefault(key, []).append(i)
        kinds[i] = "after"
    outs: list[tuple[list[int], list[Tensor]]] = []
    for group in adam.values():
        items: list[tuple[int, tuple[float, float, float, float, bool]]] = []
        big: list[tuple[int, tuple[float, float, float, float, bool]]] = []
        for i, f in group:
            (big if _large_adam(params[i], state[params[i]], f) else items).append((i, f))
        if big:
            outs.append(([i for i, _ in big], [_adam_update_norm(params[i], state[params[i]], f) for i, f in big]))
        if not items:
            continue
        idx = [i for i, _ in items]
        fs = [f for _, f in items]
        vals: list[Tensor] = []
        for a, b in _chunks([params[i] for i in idx]):
            c = fs[a:b]
            vals.extend(_adam_chunk_norms([params[i] for i in idx[a:b]], [state[params[i]] for i in idx[a:b]],
                                          [f[4] for f in c], [f[1] for f in c], [f[2] for f in c],
                                          [f[0] for f in c], [f[3] for f in c]))
        outs.append((idx, vals))
    for ditems in adam_dev.values():
        idx = [i for i, _ in ditems]
        outs.append((idx, _adam_device_norms([params[i] for i in idx], [state[params[i]] for i in idx],
                                             [a for _, a in ditems])))
    for sitems in sgd.values():
        idx = [i for i, _ in sitems]
        bufs = [state[params[i]]["momentum_buffer"] for i in idx]
        norms = fp32_norms(bufs, 2)
        outs.append((idx, list(torch._foreach_mul(norms, [lr for _, lr in sitems]))))
    for idx in after.values():
        outs.append((idx, list(fp32_norms([params[i] for i in idx], 2))))
    for idx, vals in outs:
        for i, v in zip(idx, vals):
            slots[i] = v if v.device == out_device and v.dtype == torch.float32 else v.to(out_device, torch.float32)
    return _assemble(slots, out_device), kinds


def relative_update(value: float, kind: str | None, wnorm: float | None) -> float | None:
    """``‖Δw‖/‖w‖`` (kind ``"delta"``) or ``|‖w_new‖ − ‖w‖| / ‖w‖`` (kind ``"after"``), with
    ``‖w‖`` measured before the step; inf for a zero weight that moved, NaN for one that did not
    or for non-finite inputs; None when not measured."""
    if kind is None or wnorm is None:
        return None
    d = value if kind == "delta" else abs(value - wnorm)
    if wnorm == 0.0:
        return math.inf if d > 0 else math.nan
    return d / wnorm
