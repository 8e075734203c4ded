"""Loss-scale headroom and optimizer-aware per-layer signals (``docs/statistics.md``).

* ``headroom``: how many powers of two the scaled gradient sits below fp16's largest finite
  value, ``log2(65504 / (maxabs · S))``, from the measured max-abs and the loss scale ``S`` the
  backward used; computed on the host when the record is built (no device work at all).
* ``underflow`` and ``zeros``: counts taken inside the fused statistics pass
  (:func:`gradwatch.agent.stats.layer_moments` with ``counts=True``); :func:`small_multiplier`
  gives the multiplier that pass compares against.
* ``mom_cos``: the cosine between the gradient and the optimizer's own momentum buffer (the
  buffer from the previous step, read before the optimizer steps), :func:`momentum_cosine`:
  a bounded number of foreach ops per (device, dtype) group, no host sync, nothing kept between
  steps.

Pure functions; nothing here raises into training (the recorder guards every call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._torch import Tensor, torch
from .consts import device_tensor
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
    res = torch.zeros(k, dtype=torch.float32, device=out_device)
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = {}
    for i, (g, m) in enumerate(zip(grads, bufs)):
        if m is not None and g.numel() > 0 and m.device == g.device:
            groups.setdefault((g.device, g.dtype, m.dtype), []).append(i)
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
        sel = device_tensor(idx, torch.long, out_device)
        res.index_copy_(0, sel, cos.to(device=out_device, dtype=torch.float32))
    return res
