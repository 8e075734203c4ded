"""Per-layer gradient statistics, computed on the gradients' device with few kernels.

Pure functions: gradients in, a ``(L, 5)`` float32 tensor of raw moments out
(:data:`MOMENT_COLUMNS`: sum, L2 norm, max-abs, non-finite count, centred second moment M2).
The element count is known on the host from shapes, so it never crosses the device. The mean is
finished on the host (:func:`finalize`); variance and std are derived from M2 when read
(``docs/statistics.md``), and moments of several tensors or steps merge exactly with
:func:`gradwatch.agent.spec.merge_moments`.

M2 is the shifted sum: with ``c = sum/n`` (fp32), ``M2 = Σ(c−x)² − (n·c − Σx)²/n``, the squares
accumulated in float64 and the correction (what c's rounding left) in float64. It stays within
about 1e-7 relative of a float64 two-pass reference even where |mean| ≫ std (``l2²/n − mean²``
loses ``1e-7·mean²/var`` there).

Cost model (``docs/statistics.md``, "The statistics pass"): one aten op per tensor (its fp32
cascade sum) and, per (device, dtype) group, a bounded number of foreach ops over cache-sized
chunks (:func:`_moments_group`), so the op count does not grow with the tensor count. The exact
non-finite count is taken only for layers whose norm is not finite on CPU (a finite L2 norm
proves every element finite), which makes it free on clean steps. On accelerators, branching on
the norm would be a host sync, so the count is taken eagerly. No function here synchronizes with
an accelerator; :class:`HostCopy` moves a packed result to the host with one non-blocking copy
into pinned memory that is read later, off the training thread.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ._torch import Tensor, torch
from .consts import device_tensor
from .spec import Moments, merge_moments, moments_var, std_of

__all__ = [
    "MOMENT_COLUMNS",
    "COUNT_COLUMNS",
    "layer_moments",
    "RowStats",
    "row_stats",
    "row_sums",
    "row_norms",
    "finalize",
    "merge",
    "LayerStats",
    "pack_dtype",
    "HostCopy",
    "PendingCopy",
]

#: Columns of :func:`layer_moments`' result.
MOMENT_COLUMNS = ("sum", "l2", "maxabs", "nonfinite", "m2")
#: Columns appended with ``counts=True``: non-zero elements (NaN and ±inf included) and the
#: elements ``x`` with ``|x|·small_mult < 1`` and ``x != 0`` (0 without ``small_mult``).
COUNT_COLUMNS = ("nonzero", "small")


def _group_indices(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in torch's own grouping order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def row_sums(g: Tensor) -> Tensor:
    """(shape[0],) fp32 sums of each output unit (all dims but 0) of a tensor with ndim >= 2."""
    return g.sum(dim=tuple(range(1, g.ndim)), dtype=torch.float32)


def row_norms(g: Tensor) -> Tensor:
    """(shape[0],) fp32 L2 norms of each output unit (all dims but 0) of a tensor with ndim >= 2."""
    if g.dtype == torch.float64:  # norms refuse a narrowing dtype
        return torch.linalg.vector_norm(g, 2, dim=tuple(range(1, g.ndim))).float()
    return torch.linalg.vector_norm(g, 2, dim=tuple(range(1, g.ndim)), dtype=torch.float32)


@dataclass(frozen=True, slots=True)
class RowStats:
    """Per-output-unit sums and L2 norms of some gradients, keyed by their index in the list the
    statistics pass measured. A transform that needs them (Centralize's row means, AGC's unit
    norms) asks for them up front; the statistics pass then reads those tensors row-wise and
    derives their layer sum and norm from the rows, so the gradient is read once for both."""

    sums: dict[int, Tensor]
    norms: dict[int, Tensor]


def row_stats(grads: Sequence[Tensor], sum_idx: Sequence[int] = (), norm_idx: Sequence[int] = ()) -> RowStats:
    """:func:`row_sums` of ``grads[i]`` for i in ``sum_idx``, :func:`row_norms` for ``norm_idx``
    (tensors with ndim < 2 or no elements are left out)."""
    def ok(i: int) -> bool:
        return grads[i].ndim >= 2 and grads[i].numel() > 0
    return RowStats({i: row_sums(grads[i]) for i in sum_idx if ok(i)},
                    {i: row_norms(grads[i]) for i in norm_idx if ok(i)})


def _grad_norms_into(l2: list[Tensor | None], ts: Sequence[Tensor], js: Sequence[int], ids: Sequence[int],
                     rn: dict[int, Tensor], f32: torch.dtype | None) -> None:
    """``l2[j]``: the foreach 2-norm of ``ts[j]`` (fp32: the value ``clip_grad_norm_`` computes)
    for each ``j`` in ``js`` whose row norms were not handed in (``rn``, keyed by ``ids[j]``)."""
    need = [j for j in js if ids[j] not in rn]
    for j, v in zip(need, torch._foreach_norm([ts[j] for j in need], 2, dtype=f32) if need else ()):
        l2[j] = v


def _row_norms_into(l2: list[Tensor | None], ids: Sequence[int], rn: dict[int, Tensor]) -> None:
    """``l2[j]`` of the tensors whose row norms were handed in: the 2-norm of those norms."""
    have = [j for j in range(len(l2)) if ids[j] in rn]
    for j, v in zip(have, torch._foreach_norm([rn[ids[j]] for j in have], 2) if have else ()):
        l2[j] = v


def _moments_group(ts: list[Tensor], eager_nonfinite: bool, idx: list[int] | None = None,
                   rows: RowStats | None = None, nonzero_counts: bool = False, small_mult: Tensor | None = None) -> Tensor:
    """(k, 5) float32 moments of same-device, same-dtype dense tensors (``idx``: their indices
    in ``rows``; a tensor with row sums or row norms there is not read again for them).

    One aten op per tensor (its fp32 sum, or the sum of its row sums); everything else is a foreach
    op over one of a bounded number of chunks (:func:`_chunks`), so the op count is the tensor
    count plus a constant. Each chunk is read once from memory and then re-read from the cache
    for all its reductions. Per chunk, with ``c = sum/n``:

    - the fp32 L2 norm (the value ``clip_grad_norm_`` computes, shared with the transforms) and
      the max of ``x``;
    - a scratch ``d = −x`` (exact in any dtype) whose max is ``−min x``, so max-abs is exact;
    - ``d += c`` in place and the float64 2-norm of ``d``: ``Σ(c − x)²`` accumulated in float64,
      and M2 is the shifted sum ``Σ(c − x)² − (n·c − Σx)²/n`` (the correction, in float64,
      removes what c's rounding left). fp16/bf16 ``d`` is rounded in its own dtype by ``+= c``,
      so those chunks upcast ``−x`` to fp32 first (one foreach op: ``x·(−1)`` against a fp32
      (1,)-tensor);
    - eager non-finite counts (accelerators): ``x·0`` is NaN exactly where ``x`` is not finite,
      and its 0-"norm" counts them;
    - ``nonzero_counts``: the 0-"norm" of ``x`` (non-zero elements; NaN counts as non-zero) and, with
      ``small_mult`` (a 0-dim tensor ``k``), the 0-"norm" of ``floor(min(|x|·k, 1))``, which is 1
      exactly where ``|x|·k >= 1`` or x is NaN (NaN propagates through clamp and floor), so
      ``nonzero − that`` counts ``0 < |x| < 1/k`` exactly. ``|x|`` is taken from ``d = −x``
      before the shift (fp32 for fp16/bf16 input): 5 foreach ops per chunk in all.

    No host sync."""
    dev = ts[0].device
    k = len(ts)
    hp = pack_dtype(dev)  # float64 (MPS: float32)
    rn = rows.norms if rows is not None and idx is not None else {}
    rs = rows.sums if rows is not None and idx is not None else {}
    ids = idx if idx is not None else list(range(k))
    low = ts[0].dtype not in (torch.float32, torch.float64)
    f32 = None if ts[0].dtype == torch.float64 else torch.float32  # norms refuse a narrowing dtype
    sums: list[Tensor] = [rs[i].sum() if i in rs else t.sum(dtype=torch.float32) for t, i in zip(ts, ids)]
    l2: list[Tensor | None] = [None] * k
    hi: list[Tensor] = []
    lo: list[Tensor] = []
    q: list[Tensor] = []
    cnt: list[Tensor] = []
    means: list[Tensor] = []
    nz: list[Tensor] = []
    big: list[Tensor] = []
    large = _large(ts, dev)  # CPU: per-tensor route for large fp32/fp64 tensors
    live = [j for j, t in enumerate(ts) if t.numel() > 0 and j not in large]  # foreach max refuses empty tensors
    xs = [ts[j] for j in live]
    ns = [float(x.numel()) for x in xs]
    minus = torch.full((1,), -1.0, dtype=torch.float32, device=dev) if low and xs else None
    for a, b in _chunks(xs, _CHUNK if dev.type == "cpu" else _CHUNK_ACCEL):  # re-read from the cache below
        part = xs[a:b]
        _grad_norms_into(l2, ts, live[a:b], ids, rn, f32)
        hi.extend(torch._foreach_max(part))
        cs = torch._foreach_div([sums[j] for j in live[a:b]], ns[a:b])  # fp32 means, 0-d
        means.extend(cs)
        d = torch._foreach_mul(part, [minus] * len(part)) if minus is not None else torch._foreach_neg(part)
        lo.extend(torch._foreach_max(d))  # = −min x
        if nonzero_counts:
            nz.extend(torch._foreach_norm(part, 0, dtype=f32))
            if small_mult is not None:
                ab = torch._foreach_abs(d)
                torch._foreach_mul_(ab, small_mult)
                torch._foreach_clamp_max_(ab, 1.0)
                torch._foreach_floor_(ab)
                big.extend(torch._foreach_norm(ab, 0, dtype=f32))
        torch._foreach_add_(d, cs)
        q.extend(torch._foreach_norm(d, 2, dtype=hp))
        if eager_nonfinite:
            cnt.extend(torch._foreach_norm(torch._foreach_mul(part, 0.0), 0, dtype=f32))
    if large:
        bl = sorted(large)
        _grad_norms_into(l2, ts, bl, ids, rn, f32)
        big_cols = _large_moments([ts[j] for j in bl], [sums[j] for j in bl], hp, nonzero_counts, small_mult)
    _row_norms_into(l2, ids, rn)
    zero = None
    for j in range(k):
        if l2[j] is None:  # empty tensors
            zero = zero if zero is not None else torch.zeros((), dtype=f32 or ts[0].dtype, device=dev)
            l2[j] = zero
    s = torch.stack(sums)
    norms = torch.stack(l2)  # type: ignore[arg-type]
    if norms.dtype != torch.float32:
        norms = norms.float()
    maxabs = torch.zeros(k, dtype=torch.float32, device=dev)
    m2 = torch.zeros(k, dtype=torch.float32, device=dev)
    nonfinite = torch.zeros(k, dtype=torch.float32, device=dev)
    nonzero = torch.zeros(k, dtype=torch.float32, device=dev)
    small = torch.zeros(k, dtype=torch.float32, device=dev)
    if xs:
        sel = None if len(live) == k else device_tensor(live, torch.long, dev)
        sl = (s if sel is None else s.index_select(0, sel)).to(hp)
        n = device_tensor(ns, hp, dev)
        c = torch.stack(means).to(hp)  # the fp32 means d was shifted by
        mx = torch.maximum(torch.stack(hi).abs(), torch.stack(lo).abs()).float()  # NaN propagates
        corr = n * c - sl
        mm = (torch.stack(q).square() - corr.square() / n).float()
        if sel is None:
            maxabs, m2 = mx, mm
        else:
            maxabs.index_copy_(0, sel, mx)
            m2.index_copy_(0, sel, mm)
        if eager_nonfinite:
            f = torch.stack(cnt).float()
            nonfinite = f if sel is None else nonfinite.index_copy_(0, sel, f)
        if nonzero_counts:
            z = torch.stack(nz).float()
            sm = z - torch.stack(big).float() if small_mult is not None else torch.zeros_like(z)
            nonzero = z if sel is None else nonzero.index_copy_(0, sel, z)
            small = sm if sel is None else small.index_copy_(0, sel, sm)
    if large:
        bsel = device_tensor(bl, torch.long, dev)
        maxabs.index_copy_(0, bsel, big_cols[0])
        m2.index_copy_(0, bsel, big_cols[1])
        if nonzero_counts:
            nonzero.index_copy_(0, bsel, big_cols[2])
            small.index_copy_(0, bsel, big_cols[3])
    if not eager_nonfinite or large:
        # CPU: reading the norms costs nothing, so count only where a norm is not finite (with
        # eager counts, only the large tensors, which the chunks did not count)
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if eager_nonfinite:
            bad = [j for j in bad if j in large]
        if bad:
            counts = torch._foreach_norm(torch._foreach_mul([ts[j] for j in bad], 0.0), 0, dtype=f32)
            nonfinite.index_copy_(0, device_tensor(bad, torch.long, dev), torch.stack(counts).float())
    cols = [s, norms, maxabs, nonfinite, m2]
    if nonzero_counts:
        cols += [nonzero, small]
    return torch.stack(cols, dim=1)


#: Accelerators: tensors under this many elements take the concatenated route (:func:`_moments_flat`) ...
_FLAT_MAX = 1 << 20
#: ... in concatenations of at most this many elements (a few such temporaries live at once).
_FLAT_CHUNK = 1 << 22


def _flat_route(dev: torch.device) -> bool:
    """Whether small tensors on ``dev`` take :func:`_moments_flat`: CUDA (and ROCm, which torch
    calls CUDA), where ``segment_reduce`` has kernels and the route was measured; other
    accelerators (MPS has no ``segment_reduce``) keep the foreach route. Tests force it on CPU."""
    return dev.type == "cuda"


def _flat_chunks(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive ranges of at most :data:`_FLAT_CHUNK` elements (one tensor may fill one)."""
    out: list[tuple[int, int]] = []
    a = size = 0
    for i, m in enumerate(sizes):
        if size and size + m > _FLAT_CHUNK:
            out.append((a, i))
            a, size = i, 0
        size += m
    if a < len(sizes):
        out.append((a, len(sizes)))
    return out


def _moments_flat(ts: list[Tensor], idx: list[int] | None = None, rows: RowStats | None = None,
                  nonzero_counts: bool = False, small_mult: Tensor | None = None) -> Tensor:
    """:func:`_moments_group`'s columns for small non-empty same-device, same-dtype tensors, with
    a number of kernels that does not depend on the tensor count.

    On an accelerator every per-tensor op is a kernel launch and ~10-40 µs of host time, and
    several foreach ops fall back to one kernel per tensor there (a 0-norm, a list of 0-dim
    operands, the fp32 sum, which has no foreach form). Small tensors are launch-bound, so they
    are concatenated instead (fp32; float64 stays float64) and reduced by segment: sum, max, min,
    ``Σ(x − c)²`` with ``c = sum/n`` expanded per element, and the counts (non-finite, NaN,
    non-zero, small), each one segmented reduction over the concatenation. M2 takes the same
    shifted-sum correction as the foreach route, the sums and squares in float64 (the pack dtype).
    The L2 norm stays torch's ``_foreach_norm`` (bit for bit what ``clip_grad_norm_`` computes); rows handed in feed it as in the other route.
    Counts are exact (fp32 up to 2^24 elements per concatenation, float64 beyond). No host sync."""
    dev = ts[0].device
    k = len(ts)
    hp = pack_dtype(dev)
    acc = torch.float64 if ts[0].dtype == torch.float64 else torch.float32
    f32 = None if ts[0].dtype == torch.float64 else torch.float32
    ids = idx if idx is not None else list(range(k))
    rn = rows.norms if rows is not None and idx is not None else {}
    l2: list[Tensor | None] = [None] * k
    _grad_norms_into(l2, ts, range(k), ids, rn, f32)
    _row_norms_into(l2, ids, rn)
    norms = torch.stack(l2)  # type: ignore[arg-type]
    if norms.dtype != torch.float32:
        norms = norms.float()
    sizes = [t.numel() for t in ts]
    cols: list[list[Tensor]] = []
    for a, b in _flat_chunks(sizes):
        lens = sizes[a:b]
        cnt = acc if sum(lens) <= 1 << 24 else torch.float64  # exact counts
        flat = torch.cat([t.reshape(-1) for t in ts[a:b]]) if b - a > 1 else ts[a].reshape(-1)
        flat = flat.to(acc)
        wide = flat.to(hp)  # fp32 values are exact in float64, and so are their differences
        offs = device_tensor(list(itertools.accumulate(lens, initial=0)), torch.long, dev)
        reps = device_tensor(lens, torch.long, dev)
        n = device_tensor([float(m) for m in lens], hp, dev)

        def seg(x: Tensor, how: str = "sum", offs: Tensor = offs) -> Tensor:
            # unsafe: the offsets are right by construction; the check would read them (a host sync)
            return torch.segment_reduce(x, how, offsets=offs, unsafe=True)

        s = seg(wide)
        c = (s / n).to(acc).to(hp)  # the fp32 mean each element is shifted by, as in the other route
        d = wide - torch.repeat_interleave(c, reps, output_size=flat.numel())
        q = seg(d.square_())
        m2 = (q - (n * c - s).square() / n).float()
        nan = seg(torch.isnan(flat).to(cnt))
        nonfinite = seg((~torch.isfinite(flat)).to(cnt)).float()
        mx = torch.maximum(seg(flat, "max").abs(), seg(flat, "min").abs()).float()
        mx = torch.where(nan > 0, torch.full_like(mx, math.nan), mx)  # NaN propagates, whatever the kernel
        chunk = [s.float(), mx, nonfinite, m2]  # the sum rounded once, from float64
        if nonzero_counts:
            nz = seg((flat != 0).to(cnt))  # NaN counts as non-zero
            if small_mult is not None:
                big = seg((flat.abs().mul_(small_mult).clamp_max_(1.0).floor_() != 0).to(cnt))
                chunk += [nz.float(), (nz - big).float()]
            else:
                chunk += [nz.float(), torch.zeros_like(m2)]
        cols.append(chunk)
    cat = [c[0] if len(cols) == 1 else torch.cat(c) for c in zip(*cols)]
    return torch.stack([cat[0], norms, *cat[1:]], dim=1)


#: CPU tensors of at least this many elements take the per-tensor route (:func:`_large_moments`).
_LARGE = 1 << 17
#: Elements of the per-thread scratch that route shifts a tensor into (larger tensors go slice by slice).
_SCRATCH = 1 << 22
_local = threading.local()


def _large(ts: Sequence[Tensor], dev: torch.device) -> set[int]:
    """Indices of the tensors that :func:`_large_moments` measures: on CPU, contiguous fp32/fp64
    tensors of at least :data:`_LARGE` elements."""
    if dev.type != "cpu" or ts[0].dtype not in (torch.float32, torch.float64):
        return set()
    return {j for j, t in enumerate(ts) if t.numel() >= _LARGE and t.is_contiguous()}


def _scratch(n: int, dtype: torch.dtype) -> Tensor:
    """A flat buffer of at least ``n`` elements, kept per thread and dtype: the shifted copy of a
    large tensor goes there instead of into fresh memory (on CPU, fresh multi-MB allocations
    page-fault on first touch, which cost more than the arithmetic)."""
    bufs: dict[torch.dtype, Tensor] = _local.__dict__.setdefault("bufs", {})
    b = bufs.get(dtype)
    if b is None or b.numel() < n:
        b = bufs[dtype] = torch.empty(n, dtype=dtype)
    return b


def _pieces(*flats: Tensor) -> list[tuple[Tensor, ...]]:
    """The same-length flat tensors ``flats`` in pieces of at most :data:`_SCRATCH` elements,
    each with its slice of the per-thread scratch (of the first one's dtype) appended; one piece
    of the unsliced tensors when they fit (no slice op)."""
    n = flats[0].numel()
    buf = _scratch(min(n, _SCRATCH), flats[0].dtype)
    if n <= _SCRATCH:
        return [(*flats, buf[:n])]
    return [(*(f[a:b] for f in flats), buf[: b - a]) for a, b in ((a, min(n, a + _SCRATCH)) for a in range(0, n, _SCRATCH))]


def _total(parts: list[Tensor]) -> Tensor:
    """The sum of per-piece 0-dim results (the one result itself for a single piece)."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _large_moments(xs: list[Tensor], sums: list[Tensor], hp: torch.dtype, counts: bool = False,
                   small_mult: Tensor | None = None) -> list[Tensor]:
    """(maxabs, M2[, nonzero, small]) float32 columns of large contiguous CPU tensors, a few
    vectorized passes each.

    On CPU a foreach op is a loop over per-tensor kernels, so it saves dispatch overhead on
    small tensors only; on large ones the chunk route's float64 norm converts its input into
    fresh memory and ``_foreach_max`` takes a slower kernel than ``amax``. Here, per tensor:
    ``amax`` and ``amin`` (exact, NaN propagating), ``d = x − c`` into a reused scratch (exact
    where x is near c), ``d²`` in place and its fp32 cascade sum (about 6e-8 relative at 1M
    elements), then the same shifted-sum correction as the chunk route. Seven aten ops per
    tensor beyond its sum, two of them views (more past :data:`_SCRATCH` elements, slice by
    slice), each over at least 2^17 elements, so their dispatch cost is a few percent of the
    work. ``counts``: ``count_nonzero(x)`` and, with ``small_mult`` ``k``, the same
    ``floor(min(|x|·k, 1))`` test as the chunk route in the scratch (six more ops)."""
    ns = [float(x.numel()) for x in xs]
    cs = torch._foreach_div(sums, ns)  # fp32 means, 0-d
    hi: list[Tensor] = []
    lo: list[Tensor] = []
    q: list[Tensor] = []
    nz: list[Tensor] = []
    big: list[Tensor] = []
    for x, c in zip(xs, cs):
        hi.append(x.amax())
        lo.append(x.amin())
        pieces = _pieces(x.view(-1))
        if counts:
            nz.append(torch.count_nonzero(x))
            if small_mult is not None:
                big.append(_total([torch.count_nonzero(torch.abs(src, out=dst).mul_(small_mult).clamp_max_(1.0).floor_())
                                   for src, dst in pieces]))
        q.append(_total([torch.sub(src, c, out=dst).square_().sum() for src, dst in pieces]))
    n64 = device_tensor(ns, hp, xs[0].device)
    corr = n64 * torch.stack(cs).to(hp) - torch.stack(sums).to(hp)
    m2 = (torch.stack(q).to(hp) - corr.square() / n64).float()
    mx = torch.maximum(torch.stack(hi).abs(), torch.stack(lo).abs()).float()  # NaN propagates
    out = [mx, m2]
    if counts:
        z = torch.stack(nz).float()
        out += [z, z - torch.stack(big).float() if big else torch.zeros_like(z)]
    return out


#: Elements per chunk (512 KiB of fp32): small tensors share a chunk (few launches) and each chunk
#: is re-read from the cache for all its reductions ...
_CHUNK = 1 << 17
#: ... but past ``_MAX_CHUNKS·_CHUNK`` elements the chunks grow (:func:`_chunks`), so the op count
#: stays a constant per group whatever the model's size and tensor count.
_MAX_CHUNKS = 8
#: Accelerators: a launch costs the host ~10 µs, about what 16 MiB of memory traffic costs the device,
#: so the chunks are larger there (the L2 cache still holds one: 50-60 MB on an H100/H200).
_CHUNK_ACCEL = 1 << 22


def _chunks(xs: Sequence[Tensor], chunk: int = _CHUNK) -> list[tuple[int, int]]:
    """Consecutive non-empty ranges of ``xs``, each closed once it holds ``max(chunk,
    total/_MAX_CHUNKS)`` elements or more (a large tensor may close one alone): at most
    ``_MAX_CHUNKS + 1`` ranges, whatever the tensor count; none for an empty list."""
    sizes = [x.numel() for x in xs]
    cap = max(chunk, -(-sum(sizes) // _MAX_CHUNKS))
    out: list[tuple[int, int]] = []
    a = size = 0
    for i, m in enumerate(sizes):
        size += m
        if size >= cap:
            out.append((a, i + 1))
            a, size = i + 1, 0
    if a < len(xs):
        out.append((a, len(xs)))
    return out


@torch.no_grad()
def layer_moments(grads: Sequence[Tensor], *, eager_nonfinite: bool | None = None, out_device: torch.device | None = None,
                  rows: RowStats | None = None, counts: bool = False, small_mult: Tensor | None = None) -> Tensor:
    """Raw per-tensor moments of dense gradients, in the order given.

    Args:
        grads: dense tensors (any float dtype, any devices; empty tensors allowed). For a sparse
            gradient pass its ``coalesce()._values()``.
        eager_nonfinite: count non-finite elements of every tensor (default: only on non-CPU
            devices, where the lazy rule would need a host sync).
        out_device: where the result lives (default: the first tensor's device).
        rows: row sums/norms already taken of some of ``grads`` (:func:`row_stats`, same
            indices): those tensors' sum and L2 columns are derived from their rows (the same
            fp32 values up to summation order) instead of another read.
        counts: also count, in the same pass, the non-zero elements and (with ``small_mult``, a
            0-dim float tensor ``k`` on the gradients' device) the non-zero elements with
            ``|x|·k < 1`` (:data:`COUNT_COLUMNS`; loss-scale underflow with ``k = S·2^14``).

    Returns:
        ``(len(grads), 5)`` float32 tensor with columns :data:`MOMENT_COLUMNS` (7 with ``counts``:
        :data:`COUNT_COLUMNS` appended; counts are float32, exact up to 2^24 per tensor). No host
        sync on accelerators.
    """
    width = len(MOMENT_COLUMNS) + (len(COUNT_COLUMNS) if counts else 0)
    if not grads:
        return torch.zeros((0, width), dtype=torch.float32, device=out_device)
    out_device = out_device or grads[0].device
    routed: list[tuple[list[int], bool]] = []  # (indices, concatenated route?)
    for idx in _group_indices(grads):
        if _flat_route(grads[idx[0]].device):
            small = [i for i in idx if 0 < grads[i].numel() < _FLAT_MAX]
            rest = [i for i in idx if not 0 < grads[i].numel() < _FLAT_MAX]
            routed += [(g, f) for g, f in ((small, True), (rest, False)) if g]
        else:
            routed.append((idx, False))
    groups = [idx for idx, _ in routed]
    results: list[Tensor] = []
    for idx, is_flat in routed:
        ts = [grads[i] for i in idx]
        eager = eager_nonfinite if eager_nonfinite is not None else ts[0].device.type != "cpu"
        mult = small_mult.to(ts[0].device) if small_mult is not None else None
        r = (_moments_flat(ts, idx, rows, counts, mult) if is_flat
             else _moments_group(ts, eager, idx, rows, counts, mult))
        results.append(r.to(out_device, non_blocking=True))
    if len(groups) == 1:
        return results[0]
    if [i for idx in groups for i in idx] == list(range(len(grads))):
        # already grouped (GradContext orders grads group by group): no host-built index needed
        return torch.cat(results)
    out = torch.empty((len(grads), width), dtype=torch.float32, device=out_device)
    for idx, r in zip(groups, results):
        out[device_tensor(idx, torch.long, out_device)] = r  # no blocking host-to-device copy
    return out


@dataclass(frozen=True, slots=True)
class LayerStats:
    """Finished statistics of one gradient tensor: the wire's per-layer fields (see
    :data:`gradwatch.agent.spec.LAYER_FIELDS`); ``var``/``std`` are derived from ``m2``."""

    numel: int
    mean: float
    m2: float
    l2: float
    maxabs: float
    nonfinite: int

    @property
    def var(self) -> float:
        return moments_var(self.numel, self.m2)

    @property
    def std(self) -> float:
        return std_of(self.var)


def finalize(numel: int, s1: float, l2: float, maxabs: float, nonfinite: float, m2: float) -> LayerStats:
    """The mean from the sum, in float64 on the host; M2 as measured, clamped at 0 (a rounding
    residue of all-equal elements). Non-finite inputs propagate (NaN/inf are data). An empty
    tensor reports zeros."""
    if numel == 0:
        return LayerStats(0, 0.0, 0.0, 0.0, 0.0, int(nonfinite))
    if m2 < 0.0:  # NaN compares False and stays NaN
        m2 = 0.0
    return LayerStats(numel, s1 / numel, m2, l2, maxabs, int(nonfinite))


def merge(a: tuple[int, float, float, float, float, float],
          b: tuple[int, float, float, float, float, float]) -> tuple[int, float, float, float, float, float]:
    """Merge two raw tuples ``(n, sum, l2, maxabs, nonfinite, m2)`` of one tensor's parts
    (windows, ranks): sums add, norms combine by root-sum-square, M2 by Chan's formula."""
    n1, s1, l1, x1, f1, q1 = a
    n2, s2, l2, x2, f2, q2 = b
    x = x1 if x1 != x1 else (x2 if x2 != x2 else max(x1, x2))
    mom = merge_moments(Moments(n1, s1 / n1 if n1 else 0.0, q1), Moments(n2, s2 / n2 if n2 else 0.0, q2))
    return (n1 + n2, s1 + s2, math.sqrt(l1 * l1 + l2 * l2), x, f1 + f2, mom.m2)


def pack_dtype(device: torch.device) -> torch.dtype:
    """dtype of the packed per-step tensor: float64 keeps counts exact; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class PendingCopy:
    """A packed step result on its way to the host. :meth:`values` may block on the device, so
    call it off the training thread (the sender does)."""

    __slots__ = ("_buf", "_event", "_release")

    def __init__(self, buf: Tensor, event: object | None, release: object | None) -> None:
        self._buf = buf
        self._event = event
        self._release = release

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()  # type: ignore[attr-defined]
        vals: list[float] = self._buf.tolist()
        if self._release is not None:
            self._release()  # type: ignore[operator]
            self._release = None
        return vals


class HostCopy:
    """One device→host copy per recorded step, without making the training stream wait.

    On an accelerator (CUDA, XPU, MPS: any device type whose ``torch.<type>`` module has an
    ``Event``) the packed tensor is copied ``non_blocking`` into a host buffer taken from a small
    ring (pinned where the backend has pinned memory), an event is recorded on the device's
    current stream, and the reader synchronizes on that event later. A buffer returns
    to the ring only after it was read, so step t+1 never overwrites what the sender is still
    reading; when every ring buffer is still unread, a fresh one is allocated (the ring is
    bounded, so memory stays flat once the reader keeps up). On CPU the tensor itself is handed
    over: it is freshly computed each step and nobody writes to it again. The one documented
    exception: a device type without an event API gets a blocking copy (no way to know later when
    an asynchronous one has landed).
    """

    def __init__(self, ring: int = 4) -> None:
        self._ring = ring
        self._free: dict[tuple[str, int, torch.dtype], list[Tensor]] = {}
        self._lock = threading.Lock()

    def submit(self, packed: Tensor) -> PendingCopy:
        dev = packed.device
        if dev.type == "cpu":
            return PendingCopy(packed.detach(), None, None)
        backend = getattr(torch, dev.type, None)
        if getattr(backend, "Event", None) is None:  # no event API: the documented blocking exception
            return PendingCopy(packed.detach().to("cpu"), None, None)
        key = (dev.type, packed.numel(), packed.dtype)
        with self._lock:
            free = self._free.setdefault(key, [])
            buf = free.pop() if free else None
        if buf is None:
            try:
                buf = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            except RuntimeError:  # a backend without pinned memory
                buf = torch.empty(packed.shape, dtype=packed.dtype)
        buf.copy_(packed, non_blocking=True)
        event = backend.Event()  # type: ignore[union-attr]
        stream = getattr(backend, "current_stream", None)
        if stream is not None:
            event.record(stream(dev))  # the copy's stream, which need not be the current device's
        else:
            event.record()

        def release(buf: Tensor = buf) -> None:
            with self._lock:
                lst = self._free.setdefault(key, [])
                if len(lst) < self._ring:
                    lst.append(buf)

        return PendingCopy(buf, event, release)
