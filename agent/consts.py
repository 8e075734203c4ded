"""Small host-built tensors (index vectors, per-layer constants) on a device, without a blocking copy.

``torch.tensor(list, device="cuda")`` copies from pageable host memory, which makes the host wait
for the device. The layout of a step (which parameters have gradients, in which groups) is known
on the host, so index tensors are built there; :func:`device_tensor` puts them on the device
from pinned memory with ``non_blocking=True`` (the copy is queued on the device's current stream,
before the kernels that read it, and torch's pinned-memory allocator keeps the source alive
until it has run), and caches the result per (values, dtype, device) in a bounded LRU.

LRU, not a one-entry cache: models whose set of parameters with gradients changes between steps
(frozen/unfrozen branches, mixture-of-experts routing, alternating optimizers) revisit a few
layouts over and over, and each revisit is then a dictionary hit. Past :data:`CAPACITY` layouts
the least recently used ones are rebuilt when they recur, still without a blocking copy.

Accelerators without pinned memory (where ``pin_memory=True`` raises) get a pageable
``non_blocking`` copy: asynchronous wherever the backend supports it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ._torch import Tensor, torch

__all__ = ["device_tensor", "CAPACITY", "fp32_norms", "fp32_norm"]

#: Most cached tensors (all devices and dtypes together); each is a few hundred bytes.
CAPACITY = 1024

_cache: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()
_lock = threading.Lock()
_unpinnable: set[str] = set()  # device types whose backend refused pinned memory


def device_tensor(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, cached; never a blocking host→device copy.

    The result is shared between callers: treat it as read-only."""
    key = (tuple(values), dtype, device)
    with _lock:
        t = _cache.get(key)
        if t is not None:
            _cache.move_to_end(key)
            return t
    t = _build(key[0], dtype, device)
    with _lock:
        _cache[key] = t
        if len(_cache) > CAPACITY:
            _cache.popitem(last=False)
    return t


def _build(values: tuple[Any, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    if device.type not in _unpinnable:
        try:
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
        except RuntimeError:
            _unpinnable.add(device.type)
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def cache_size() -> int:
    """Number of cached tensors (tests)."""
    with _lock:
        return len(_cache)


def fp32_norms(ts: Sequence[Tensor], ord: float = 2) -> list[Tensor]:
    """``torch._foreach_norm(ts, ord, dtype=float32)`` (the value ``clip_grad_norm_`` computes),
    also for float64 tensors, which norms refuse to narrow: those are measured in float64 and
    rounded to float32 after."""
    if not any(t.dtype == torch.float64 for t in ts):
        return list(torch._foreach_norm(list(ts), ord, dtype=torch.float32))
    out: list[Tensor | None] = [None] * len(ts)
    lo = [i for i, t in enumerate(ts) if t.dtype != torch.float64]
    hi = [i for i, t in enumerate(ts) if t.dtype == torch.float64]
    for i, v in zip(lo, torch._foreach_norm([ts[i] for i in lo], ord, dtype=torch.float32) if lo else ()):
        out[i] = v
    for i, v in zip(hi, torch._foreach_norm([ts[i] for i in hi], ord)):
        out[i] = v.float()
    return out  # type: ignore[return-value]  # every slot is filled


def fp32_norm(t: Tensor, ord: float = 2) -> Tensor:
    """:func:`torch.linalg.vector_norm` as float32, float64 input included (see :func:`fp32_norms`)."""
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t, ord).float()
    return torch.linalg.vector_norm(t, ord, dtype=torch.float32)
