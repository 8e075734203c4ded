"""Loss-scale headroom, underflow, zeros and the momentum cosine against direct torch computations
(docs/statistics.md, "Loss-scale headroom and optimizer-aware signals").

Counts are exact; the headroom is exact to float64 rounding of the measured max-abs; the cosine
is compared with a float64 reference."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch.agent.signals as signals
import gradwatch.agent.stats as stats
from gradwatch.agent import GradScaler, watch
from gradwatch.agent.signals import FP16_MAX, FP16_TINY, headroom, momentum_buffers, momentum_cosine
from gradwatch.agent.stats import COUNT_COLUMNS, MOMENT_COLUMNS, layer_moments

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NZ = len(MOMENT_COLUMNS) + COUNT_COLUMNS.index("nonzero")
_SMALL = len(MOMENT_COLUMNS) + COUNT_COLUMNS.index("small")


def _tensor(rng: random.Random, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random shapes (empty, scalar, past a chunk), magnitudes spread over many binades (so some
    fall under any threshold), exact zeros, and sometimes NaN/±inf."""
    kind = rng.random()
    shape: tuple[int, ...] = ((0,) if kind < 0.08 else () if kind < 0.15 else (rng.randint(1, 400),) if kind < 0.7
                              else (rng.randint(1, 40), rng.randint(1, 40)) if kind < 0.95 else (300, 600))
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-40, 10, shape, generator=g).float())
    x = x.to(dtype)
    flat = x.view(-1)
    if flat.numel():
        if rng.random() < 0.5:
            flat[torch.rand(flat.shape, generator=g) < rng.random()] = 0
        if rng.random() < 0.2:
            flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf, -math.inf])
    return x


def _ref_counts(x: torch.Tensor, scale: float) -> tuple[int, int]:
    """(non-zero elements, those with 0 < |x·S| < 2^-14), in float64 (exact for these S)."""
    xd = x.double().reshape(-1)
    nz = xd != 0
    return int(nz.sum()), int((nz & ((xd.abs() * scale) < FP16_TINY)).sum())


@pytest.mark.parametrize("seed", range(12))
def test_counts_match_direct_computation(seed: int) -> None:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for dtype in _DTYPES:
        grads = [_tensor(rng, g, dtype) for _ in range(rng.randint(1, 30))]
        scale = 2.0 ** rng.randint(-4, 24)  # GradScaler scales are powers of two
        mult = torch.tensor(scale / FP16_TINY, dtype=torch.float32)
        for eager in (False, True):
            m = layer_moments(grads, counts=True, small_mult=mult, eager_nonfinite=eager)
            assert m.shape == (len(grads), len(MOMENT_COLUMNS) + len(COUNT_COLUMNS))
            for x, row in zip(grads, m.tolist()):
                assert (row[_NZ], row[_SMALL]) == _ref_counts(x, scale), (dtype, tuple(x.shape), scale)
        # without a multiplier: non-zero counts only, and the moments are those of counts=False
        plain = layer_moments(grads)
        m = layer_moments(grads, counts=True)
        assert torch.equal(m[:, :len(MOMENT_COLUMNS)].nan_to_num(7.0), plain.nan_to_num(7.0))
        assert m[:, _SMALL].eq(0).all()
        assert [int(v) for v in m[:, _NZ]] == [_ref_counts(x, 1.0)[0] for x in grads]


def test_counts_with_a_scale_that_is_not_a_power_of_two_follow_the_fp32_product() -> None:
    """Any other scale: |x|·(S·2^14) compared with 1 in fp32 (the rounding of that product is the
    only difference from exact arithmetic, at the threshold itself)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g) * torch.exp2(torch.randint(-30, 0, (5000,), generator=g).float())
    for s in (3.0, 1000.0, 12345.678):
        k = torch.tensor(s, dtype=torch.float32) * (1.0 / FP16_TINY)
        m = layer_moments([x], counts=True, small_mult=k)
        want = int(((x != 0) & (x.abs() * k < 1.0)).sum())
        assert int(m[0, _SMALL]) == want


def test_counts_leave_out_nan_and_count_inf_as_large() -> None:
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, math.nan, math.inf, -math.inf, 1.0])
    m = layer_moments([x], counts=True, small_mult=torch.tensor(1.0 / FP16_TINY))
    assert (int(m[0, _NZ]), int(m[0, _SMALL])) == (6, 2)


def test_headroom_is_log2_of_fp16_max_over_the_scaled_maxabs() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        mx = math.ldexp(rng.random() + 0.5, rng.randint(-60, 40))
        s = 2.0 ** rng.randint(-8, 30)
        assert headroom(mx, s, 10) == pytest.approx(math.log2(FP16_MAX / (mx * s)), rel=1e-13, abs=1e-13)
    assert headroom(0.0, 1024.0, 3) == math.inf
    assert headroom(math.inf, 1024.0, 3) == -math.inf
    assert math.isnan(headroom(math.nan, 1024.0, 3))  # type: ignore[arg-type]
    assert headroom(1.0, 1024.0, 0) is None  # empty tensor
    assert headroom(1e300, 1e300, 1) == pytest.approx(math.log2(FP16_MAX) - 2 * math.log2(1e300))  # no overflow
    assert headroom(FP16_MAX, 1.0, 1) == 0.0


def _ref_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    nx, ny = x.norm().item(), y.norm().item()
    if not (math.isfinite(nx) and math.isfinite(ny)):
        return math.nan
    return 0.0 if nx == 0 or ny == 0 else max(-1.0, min(1.0, (x @ y).item() / (nx * ny)))


def _check_cosines(gs: list[torch.Tensor], ms: list[torch.Tensor | None], got: list[float], dtype: torch.dtype) -> None:
    """Each cosine: 0 without a buffer or for an empty tensor, else within 2e-7 of float64 (NaN where it is)."""
    for x, m, c in zip(gs, ms, got):
        if m is None or x.numel() == 0:
            assert c == 0.0
            continue
        want = _ref_cos(x, m)
        assert (math.isnan(c) and math.isnan(want)) or c == pytest.approx(want, abs=2e-7), (dtype, tuple(x.shape))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("large", [None, (50, 1 << 22), (50, 77)])
def test_momentum_cosine_matches_float64(monkeypatch: pytest.MonkeyPatch, seed: int, large: tuple[int, int] | None) -> None:
    """``large``: thresholds lowered so that fp32 pairs take the CPU per-tensor route (a small
    scratch: slice by slice)."""
    if large is not None:
        monkeypatch.setattr(stats, "_LARGE", large[0])
        monkeypatch.setattr(stats, "_SCRATCH", large[1])
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for dtype in _DTYPES:
        gs, ms = [], []
        for _ in range(rng.randint(1, 25)):
            x = _tensor(rng, g, dtype)
            kind = rng.random()
            if kind < 0.2:
                m = None
            elif kind < 0.4:  # nearly the same direction, another scale
                m = (x.float() * rng.uniform(1e-3, 1e3) + torch.randn(x.shape, generator=g) * 1e-4).to(dtype)
            elif kind < 0.5:
                m = (-x.float() * 3).to(dtype)
            elif kind < 0.55:
                m = torch.zeros_like(x)
            else:
                m = torch.randn(x.shape, generator=g).to(dtype)
            gs.append(x)
            ms.append(m)
        _check_cosines(gs, ms, momentum_cosine(gs, ms, torch.device("cpu")).tolist(), dtype)


def test_momentum_cosine_of_large_cpu_tensors_matches_float64() -> None:
    """Real sizes on the CPU per-tensor route (2^18 and 2^22 + 3 elements: one slice and two),
    nearly parallel, opposite, orthogonal-ish and scaled pairs."""
    g = torch.Generator().manual_seed(3)
    gs, ms = [], []
    for n in (1 << 18, (1 << 22) + 3):
        x = torch.randn(n, generator=g) * 1e-3 + 2e-4
        for m in (x * 7 + torch.randn(n, generator=g) * 1e-7, -x * 1e-4, torch.randn(n, generator=g), x.clone()):
            gs.append(x)
            ms.append(m)
    got = momentum_cosine(gs, ms, torch.device("cpu")).tolist()
    for x, m, c in zip(gs, ms, got):
        assert c == pytest.approx(_ref_cos(x, m), abs=2e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(6))
def test_counts_and_cosine_on_cuda_match_direct_computation(seed: int) -> None:
    """The accelerator route (eager non-finite counts, foreach reductions on the device) gives the
    same exact counts and a cosine within 2e-7 of float64, NaN/±inf, empty and 0-dim included."""
    rng = random.Random(f"cuda-{seed}")
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    for dtype in _DTYPES:
        grads = [_tensor(rng, g, dtype) for _ in range(rng.randint(1, 30))]
        bufs = [None if rng.random() < 0.2 else torch.randn(x.shape, generator=g).to(dtype) for x in grads]
        scale = 2.0 ** rng.randint(-4, 24)
        mult = torch.tensor(scale / FP16_TINY, dtype=torch.float32, device=dev)
        m = layer_moments([x.to(dev) for x in grads], counts=True, small_mult=mult).cpu()
        for x, row in zip(grads, m.tolist()):
            assert (row[_NZ], row[_SMALL]) == _ref_counts(x, scale), (dtype, tuple(x.shape), scale)
        got = momentum_cosine([x.to(dev) for x in grads], [None if b is None else b.to(dev) for b in bufs],
                              torch.device("cpu")).tolist()
        _check_cosines(grads, bufs, got, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "adamw_fused", "adagrad"])
def test_every_signal_on_cuda_without_a_host_sync(opt_name: str) -> None:
    """Counts, momentum cosine and relative update on every step: no blocking host sync inside
    ``optimizer.step()`` once the pinned ring is allocated (torch's detector in "error" mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    opt = _OPTS[opt_name][0](model.parameters())
    w = watch(model, opt, server="memory", every=1, signals_every=1)
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    for i in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if i >= 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    w.close()
    assert w.stats()["failures"] == 0
    recs = w.sink.steps
    assert len(recs) == 6
    for rec in recs:
        assert all(v is not None and v > 0 for v in rec.layers["upd_ratio"])
        assert all(v is not None for v in rec.layers["zeros"])
    if _OPTS[opt_name][1] == "momentum_buffer" or opt_name.startswith("adam"):
        assert all(v is not None and -1.0 <= v <= 1.0 for rec in recs[1:] for v in rec.layers["mom_cos"])


# -- through watch(): every optimizer case, with and without a loss scaler ------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)
        self.unused = nn.Linear(2, 2)  # None grads: not measured

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _capture(opt: torch.optim.Optimizer, model: nn.Module, key: str | None, scaler: Any) -> list[dict[str, Any]]:
    """A step pre-hook registered after watch(): what the watcher saw, taken directly."""
    seen: list[dict[str, Any]] = []
    names = {id(p): n for n, p in model.named_parameters()}

    def hook(o: Any, args: Any, kwargs: Any) -> None:
        row: dict[str, Any] = {"scale": None}
        if scaler is not None:
            row["scale"] = float(scaler._scale.item())
        for grp in o.param_groups:
            for p in grp["params"]:
                if p.grad is None:
                    continue
                buf = o.state.get(p, {}).get(key) if key else None
                gs = getattr(o, "grad_scale", None)  # fused under torch's scaler: grads still scaled
                grad = p.grad.detach().clone() / (gs if isinstance(gs, torch.Tensor) else 1.0)
                row[names[id(p)]] = (grad, None if buf is None else buf.detach().clone())
                row["w:" + names[id(p)]] = p.detach().double().clone()
        seen.append(row)

    def post(o: Any, args: Any, kwargs: Any) -> None:  # runs after the watcher's post-hook
        row = seen[-1]
        for n, p in model.named_parameters():
            if "w:" + n in row:
                before = row["w:" + n]
                after = p.detach().double()
                row["upd:" + n] = ((after - before).norm() / before.norm()).item()
                row["lb:" + n] = abs(after.norm() - before.norm()).item() / before.norm().item()

    opt.register_step_pre_hook(hook)
    opt.register_step_post_hook(post)
    return seen


#: optimizers whose relative update is exact from their state (the others report the lower bound)
_EXACT_UPDATE = {"sgd_momentum", "adam", "adamw", "adam_amsgrad_l2", "adamw_fused"}

_OPTS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05), None),
    "adam_amsgrad_l2": (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=0.01), "exp_avg"),
    "sgd_momentum": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), "momentum_buffer"),
    "sgd_nesterov_foreach": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
                             "momentum_buffer"),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-3), "exp_avg"),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5), "exp_avg"),
    # fused: under torch's scaler the kernel unscales, so the watcher measures scaled gradients
    "adamw_fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), "exp_avg"),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.01), None),
    "rmsprop_momentum": (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9), None),  # momentum of g/√v
}


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("scaler_kind", ["none", "gradwatch", "torch"])
@pytest.mark.parametrize("opt_name", list(_OPTS))
def test_watch_records_the_signals_of_each_optimizer(monkeypatch: pytest.MonkeyPatch, opt_name: str, scaler_kind: str,
                                                     large: bool) -> None:
    """``large``: thresholds lowered so that the CPU per-tensor routes (statistics, cosine, Adam's
    update) take the bigger tensors, slice by slice."""
    _check_signals(monkeypatch, opt_name, scaler_kind, large, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scaler_kind", ["none", "gradwatch", "torch"])
@pytest.mark.parametrize("opt_name", list(_OPTS))
def test_watch_records_the_signals_of_each_optimizer_cuda(monkeypatch: pytest.MonkeyPatch, opt_name: str,
                                                          scaler_kind: str) -> None:
    _check_signals(monkeypatch, opt_name, scaler_kind, False, "cuda")


@pytest.mark.parametrize("scaler_kind", ["none", "gradwatch"])
@pytest.mark.parametrize("opt_name", ["adam", "adamw", "adam_amsgrad_l2", "adamw_fused"])
def test_adam_with_its_step_count_on_a_device_gives_the_exact_update(monkeypatch: pytest.MonkeyPatch, opt_name: str,
                                                                     scaler_kind: str) -> None:
    """Fused or capturable Adam on an accelerator keeps its step count there: the bias corrections
    are then taken on the device (forced here on CPU) and the update is still exact."""
    calls = {"dev": 0}
    real = signals._adam_device_norms

    def spy(*a: Any) -> list[torch.Tensor]:
        calls["dev"] += 1
        return real(*a)
    monkeypatch.setattr(signals, "_device_step", lambda t: isinstance(t, torch.Tensor))
    monkeypatch.setattr(signals, "_adam_device_norms", spy)
    _check_signals(monkeypatch, opt_name, scaler_kind, False, "cpu")
    assert calls["dev"] > 0


def _check_signals(monkeypatch: pytest.MonkeyPatch, opt_name: str, scaler_kind: str, large: bool, device: str) -> None:
    calls = {"adam": 0}
    if large:
        monkeypatch.setattr(stats, "_LARGE", 64)
        monkeypatch.setattr(stats, "_SCRATCH", 40)
        real = signals._adam_update_norm

        def spy(*a: Any) -> torch.Tensor:
            calls["adam"] += 1
            return real(*a)
        monkeypatch.setattr(signals, "_adam_update_norm", spy)
    torch.manual_seed(0)
    model = _Net().to(device)
    make, key = _OPTS[opt_name]
    opt = make(model.parameters())
    scaler: Any = None
    if scaler_kind == "gradwatch":
        scaler = GradScaler(device, init_scale=2.0**12, growth_interval=2)
    elif scaler_kind == "torch":
        scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=2)
    w = watch(model, opt, server="memory", scaler=scaler if scaler_kind == "torch" else None,
              signals_every=1)
    seen = _capture(opt, model, key, scaler)
    for i in range(5):
        opt.zero_grad()
        x = torch.randn(8, 6).to(device) * (10.0 ** (i - 2))
        loss = model(x).square().mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    w.close()
    assert w.stats()["failures"] == 0
    # the per-tensor Adam route ran for every Adam variant here (plain, amsgrad, AdamW, fused)
    assert (calls["adam"] > 0) == (large and opt_name.startswith("adam")), calls
    recs = w.sink.steps
    assert len(recs) == len(seen) == 5
    names = [la.name for la in w.sink.layers]
    for rec, ref in zip(recs, seen):
        S = ref["scale"]
        assert (rec.loss_scale is None) == (S is None) and (S is None or rec.loss_scale == S)
        for j, lid in enumerate(rec.layer_ids):
            grad, buf = ref[names[lid]]
            nz, small = _ref_counts(grad, S or 1.0)
            assert rec.layers["zeros"][j] == grad.numel() - nz
            if S is None:
                assert rec.layers["headroom"][j] is None and rec.layers["underflow"][j] is None
            else:
                assert rec.layers["underflow"][j] == small
                mx = grad.double().abs().max().item()
                assert rec.layers["headroom"][j] == pytest.approx(math.log2(FP16_MAX / (mx * S)), rel=1e-12)
            if key is None or buf is None:
                assert rec.layers["mom_cos"][j] is None, (opt_name, rec.step)
            else:
                assert rec.layers["mom_cos"][j] == pytest.approx(_ref_cos(grad, buf), abs=2e-7)
            upd = rec.layers["upd_ratio"][j]
            if opt_name in _EXACT_UPDATE:  # the realized update (w rounded to fp32 after the step)
                assert upd == pytest.approx(ref["upd:" + names[lid]], rel=1e-3), (opt_name, rec.step, names[lid])
            else:
                assert upd == pytest.approx(ref["lb:" + names[lid]], rel=1e-5, abs=1e-5), (opt_name, rec.step, names[lid])
                assert upd <= ref["upd:" + names[lid]] * (1 + 1e-5) + 1e-5  # a lower bound
    if key is not None:  # a momentum exists from the second step on
        assert all(v is not None for rec in recs[1:] for v in rec.layers["mom_cos"])


def test_momentum_buffers_are_looked_up_only_where_they_mean_a_gradient_momentum() -> None:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    for opt, has in ((torch.optim.SGD([p], lr=0.1, momentum=0.9), True), (torch.optim.SGD([p], lr=0.1), False),
                     (torch.optim.Adamax([p]), True), (torch.optim.NAdam([p]), True), (torch.optim.RAdam([p]), True),
                     (torch.optim.RMSprop([p], momentum=0.9), False), (torch.optim.Adadelta([p]), False)):
        assert momentum_buffers(opt, [p]) == [None]  # no state before the first step
        opt.step()
        got = momentum_buffers(opt, [p])
        assert (got[0] is not None) == has, type(opt).__name__


# -- cost: a constant number of ops per (device, dtype) group, whatever the tensor count ----------


class _Count(TorchDispatchMode):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += 1
        return func(*args, **(kwargs or {}))


#: ops of the statistics pass per group beyond one per tensor (tests/agent/test_op_count.py) ...
_C_PASS = 110
#: ... plus the counts: 5 foreach ops per chunk, at most _MAX_CHUNKS + 1 chunks
_C_COUNTS = 5 * 9
#: the momentum cosine: 7 foreach ops per chunk plus a few to finish
_C_COS = 8 * 9 + 12


@pytest.mark.parametrize("n", [1, 7, 60, 400])
def test_counts_and_cosine_cost_a_constant_number_of_ops(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    grads = [torch.randn(int(s), generator=g) for s in torch.randint(1, 3000, (n,), generator=g)]
    bufs = [torch.randn(x.shape, generator=g) for x in grads]
    mult = torch.tensor(2.0**20)
    with _Count() as c:
        layer_moments(grads, counts=True, small_mult=mult, eager_nonfinite=True)
    assert c.n <= n + _C_PASS + _C_COUNTS, c.n
    with _Count() as c:
        momentum_cosine(grads, bufs, torch.device("cpu"))
    assert c.n <= _C_COS, c.n  # nothing per tensor


def test_sparse_gradients_count_their_stored_values() -> None:
    """A sparse embedding gradient: zeros and underflow among its coalesced values; no momentum
    cosine or relative update (they are measured on dense gradients only)."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 4, sparse=True)
    with torch.no_grad():
        emb.weight[3] = 0.0
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**10)
    w = watch(emb, opt, server="memory", signals_every=1)
    vals: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda o, a, k: vals.append(emb.weight.grad.coalesce()._values().clone()))
    for _ in range(3):
        opt.zero_grad()
        idx = torch.tensor([1, 3, 3, 7, 9])
        out = emb(idx) * torch.tensor([1.0, 1e-9, 1e-9, 0.0, 1.0])[:, None]  # tiny and exactly-zero rows
        scaler.scale(out.sum() + 1e-3 * out.square().sum()).backward()
        scaler.step(opt)
        scaler.update()
    w.close()
    assert w.layers[0].sparse and len(w.sink.steps) == 3
    for rec, v in zip(w.sink.steps, vals):
        nz, small = _ref_counts(v, rec.loss_scale)
        assert rec.layers["numel"] == [v.numel()]
        assert rec.layers["zeros"] == [v.numel() - nz] and rec.layers["underflow"] == [small]
        assert small > 0 and v.numel() - nz > 0  # both cases present
        assert rec.layers["mom_cos"] == [None] and rec.layers["upd_ratio"] == [None]


def test_a_step_that_raises_or_is_skipped_keeps_its_record_without_the_update() -> None:
    """The record waits for the post-hook; when optimizer.step() raises (no post-hook) it is
    handed over without ``upd_ratio`` at the next step, and a step the scaler skips has none."""

    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    calls = [0]

    def flaky(o: Any, args: Any, kwargs: Any) -> None:  # after the watcher's pre-hook: the step raises
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")

    w = watch(m, opt, server="memory", signals_every=1)
    opt.register_step_pre_hook(flaky)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 4)).sum().backward()
        try:
            opt.step()
        except RuntimeError:
            pass
    w.close()
    ups = [r.layers["upd_ratio"] for r in w.sink.steps]
    assert [r.step for r in w.sink.steps] == [0, 1, 2]
    assert ups[1] == [None, None] and all(v is not None and v > 0 for v in ups[0] + ups[2])

    m2 = nn.Linear(4, 2)
    opt2 = torch.optim.Adam(m2.parameters(), lr=0.1)
    # the first backward overflows fp32; the backoff then brings the scale to 2^27
    scaler = GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100, growth_interval=100)
    w2 = watch(m2, opt2, server="memory", signals_every=1)
    for _ in range(3):
        opt2.zero_grad()
        scaler.scale(m2(torch.randn(5, 4) * 100).square().sum()).backward()
        scaler.step(opt2)
        scaler.update()
    w2.close()
    recs = w2.sink.steps
    assert recs[0].skipped and recs[0].layers["upd_ratio"] == [None, None]
    assert all(h is not None and not h > 0 for h in recs[0].layers["headroom"])  # overflowed: -inf or NaN
    done = [r for r in recs if not r.skipped]
    assert done and all(v is not None for r in done for v in r.layers["upd_ratio"])


# -- sampling: signals_every -------------------------------------------------------------------


@pytest.mark.parametrize("every,k", [(1, 1), (2, 3), (1, 10), (3, 0)])
def test_signals_every_measures_the_sampled_signals_on_every_kth_recorded_step(every: int, k: int) -> None:
    """The costlier signals are measured on recorded steps ``step % (every·k) == 0`` only (k = 0:
    never) and are null elsewhere; the free headroom and the moments follow every record."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    w = watch(m, opt, server="memory", every=every, signals_every=k)
    scaler = GradScaler(device="cpu", init_scale=256.0, watcher=w)
    for _ in range(24):
        opt.zero_grad()
        scaler.scale(m(torch.randn(8, 5)).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    steps = list(w.sink.steps)  # type: ignore[attr-defined]
    w.close()
    assert [s.step for s in steps] == list(range(0, 24, every))
    for s in steps:
        sampled = k > 0 and s.step % (every * k) == 0
        for name in ("zeros", "underflow", "upd_ratio"):
            assert (None not in s.layers[name]) == sampled, (s.step, name, s.layers[name])
        # SGD's momentum buffer exists from the second step on
        assert (None not in s.layers["mom_cos"]) == (sampled and s.step > 0), (s.step, s.layers["mom_cos"])
        assert None not in s.layers["headroom"] and None not in s.layers["l2"]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_signals_every_refuses_bad_values(bad: Any) -> None:
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="signals_every"):
        watch(m, torch.optim.SGD(m.parameters(), lr=0.1), server="memory", signals_every=bad)
