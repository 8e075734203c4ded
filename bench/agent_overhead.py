"""Agent overhead per training step, side by side in one run (issue 2 and issue 3).

Variants, each on its own identically initialised copy of the model:
  base      plain training step
  watch     gradwatch watch(every=1), all statistics, records streamed to a file by the
            background sender (the real path, GIL contention included)
  naive     per-parameter .item() statistics (mean, var, std, norm, max-abs, non-finite)
  wandb     wandb.watch(log="gradients", log_freq=1) offline + wandb.log each step
  tb        TensorBoard SummaryWriter.add_histogram for every gradient, every step

Method (docs/storage.md, Agent cost; the machine is shared and noisy): after warm-up, each round runs every
variant for one untimed step and then a block of timed steps, the starting variant rotating. A
round's ratio is the variant's block median over the baseline's block median in that round; the
table shows the median ratio over rounds with [min-max].

Host syncs: Tensor.item/tolist/__bool__/__float__/__int__/cpu/numpy calls made on the training
thread during one step are counted (on a GPU each would stall the host until the stream drains).

Second table: what each transform adds inside the pipeline (``apply_`` on a context whose norms
the statistics pass already computed), on fixed gradients, timed interleaved against one read
pass (_foreach_norm) and one read-write pass (_foreach_mul_) over the same gradient memory. On
small models that ratio is mostly launch cost, not memory traffic.

Third table, marginal passes (issue 3: "each transform adds at most one pass over the gradient
memory"): the same ops on synthetic gradients with the model's layer layout at its own size and
at two large sizes (every tensor k1 and k2 times larger, same tensor count and AGC units, both
past the L3 cache); marginal = (t_big - t_small) / (rw_big - rw_small) counts read-write passes
per gradient byte and fixed = t_x1 - marginal * rw_x1 is the part that does not grow with the
bytes (at the model's own size).

All transform rounds (every model, every size) are interleaved round by round, so that a burst
of load from another process on this shared machine lands on a few rounds of every op.

``[watch]`` rows hand the transform what watch()'s statistics pass hands it (fp32 sums, and for a
first Centralize or AGC the row sums/norms it asked for); ``statistics pass [rows for X]`` times
that statistics pass against the plain one. AutoClip runs with a full 10 000-norm history.

Statistics-pass table (``--moments-only``): ``layer_moments`` alone on random gradients with
each model's shapes, this checkout's against another checkout's (``--moments-before DIR/agent``),
interleaved call by call in one process, with the aten ops of one call of each.

Small-step table (issue 10): deep MLPs with 6 to 302 parameter tensors, one thread, interleaved
in one run: what ``watch(every=1)`` (all statistics, file sink) adds to a step against what one
``clip_grad_norm_(params, inf, foreach=True)`` adds on the same parameters (one foreach reduction,
a cost a user already accepts), and the aten ops one recorded step issues on the training thread
(``TorchDispatchMode`` around ``optimizer.step()``, minus the optimizer's own ops).

    .venv/bin/python bench/agent_overhead.py --small-steps-only   # the small-step table, ~3 min here
    .venv/bin/python bench/agent_overhead.py --moments-only --moments-before ../main/agent   # layer_moments alone, before/after
    .venv/bin/python bench/agent_overhead.py --signals-only   # issue 14's per-layer signals against the statistics pass
    .venv/bin/python bench/agent_overhead.py                  # everything: ~10 min of step tables + ~2 min
    .venv/bin/python bench/agent_overhead.py --skip-steps     # transform tables only, ~2 min here
    .venv/bin/python bench/agent_overhead.py --models resnet20 --rounds 3 --block 10
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from cifar_resnet import ResNetCifar  # bench/ is on sys.path when a script here runs
from torch.utils._python_dispatch import TorchDispatchMode

# ----------------------------------------------------------------------------------------------
# models (shapes of docs/storage.md, Agent cost)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 1024, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x) + self.pos[: x.shape[1]]))


def make_task(name: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """A model and its loss on a fixed batch, both on ``device`` (the batch is drawn on the CPU,
    so every device trains on the same data)."""
    g = torch.Generator().manual_seed(0)
    if name == "resnet20":
        x, y = torch.randn(64, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (64,), generator=g).to(device)
        return ResNetCifar(depth=20, width=16).to(device), lambda m: F.cross_entropy(m(x), y)
    if name == "mlp":
        layers: list[nn.Module] = []
        for _ in range(8):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        x, y = torch.randn(256, 1024, generator=g).to(device), torch.randint(0, 1024, (256,), generator=g).to(device)
        return nn.Sequential(*layers).to(device), lambda m: F.cross_entropy(m(x), y)
    if name == "transformer":
        x = torch.randint(0, 1000, (16, 128), generator=g).to(device)
        y = torch.randint(0, 1000, (16, 128), generator=g).to(device)
        return TinyLM().to(device), lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten())
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------
# variants


class Variant:
    def __init__(self, name: str, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.after_backward: Callable[[], None] = lambda: None
        self.after_step: Callable[[int], None] = lambda i: None
        self.close: Callable[[], None] = lambda: None
        self.i = 0

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model)
        loss.backward()
        self.after_backward()
        self.opt.step()
        self.after_step(self.i)
        self.i += 1


def _naive_stats(model: nn.Module) -> Callable[[], None]:
    def run() -> None:
        out = []
        for p in model.parameters():
            g = p.grad
            if g is None:
                continue
            out.append((g.mean().item(), g.var().item(), g.std().item(), g.norm().item(),
                        g.abs().max().item(), (~torch.isfinite(g)).sum().item()))
    return run


def build_variants(task: str, names: list[str], tmp: Path) -> list[Variant]:
    base_model, loss_fn = make_task(task)
    out = []
    for name in names:
        v = Variant(name, copy.deepcopy(base_model), loss_fn)
        if name == "watch":
            from gradwatch.agent import watch

            w = watch(v.model, v.opt, server=f"file:{tmp / f'{task}.gwrec'}", project="bench", every=1)
            v.close = w.close
        elif name == "naive":
            v.after_backward = _naive_stats(v.model)
        elif name == "wandb":
            import wandb

            run = wandb.init(mode="offline", dir=str(tmp), project="bench", reinit="finish_previous")
            run.watch(v.model, log="gradients", log_freq=1)
            v.after_step = lambda i, run=run: run.log({"step": i})
            v.close = run.finish
        elif name == "tb":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(tmp / f"tb-{task}"))
            params = list(v.model.named_parameters())

            def hist(i: int, writer=writer, params=params) -> None:
                for n, p in params:
                    if p.grad is not None:
                        writer.add_histogram(n, p.grad, i)
            v.after_step = hist
            v.close = writer.close
        elif name != "base":
            raise ValueError(f"unknown variant {name}")
        out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# host-sync counting on the training thread


_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@contextlib.contextmanager
def count_syncs() -> contextlib.Generator[dict[str, int], None, None]:
    counts = {"n": 0}
    main = threading.get_ident()
    saved = {m: getattr(torch.Tensor, m) for m in _SYNC_METHODS}

    def wrap(orig: Callable) -> Callable:
        def f(self, *a, **k):  # type: ignore[no-untyped-def]
            if threading.get_ident() == main:
                counts["n"] += 1
            return orig(self, *a, **k)
        return f

    for m, orig in saved.items():
        setattr(torch.Tensor, m, wrap(orig))
    try:
        yield counts
    finally:
        for m, orig in saved.items():
            setattr(torch.Tensor, m, orig)


# ----------------------------------------------------------------------------------------------


def bench_task(task: str, names: list[str], rounds: int, block: int, warmup: int, tmp: Path) -> dict[str, tuple[float, float, float, int, float]]:
    variants = build_variants(task, names, tmp)
    for v in variants:
        for _ in range(warmup):
            v.step()
    syncs = {}
    for v in variants:
        with count_syncs() as c:
            v.step()
        syncs[v.name] = c["n"]
    ratios: dict[str, list[float]] = {v.name: [] for v in variants}
    base_ms: list[float] = []
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        med: dict[str, float] = {}
        for v in order:
            v.step()  # absorbs asynchronous work left by the previous variant
            ts = []
            for _ in range(block):
                t0 = time.perf_counter()
                v.step()
                ts.append(time.perf_counter() - t0)
            med[v.name] = statistics.median(ts)
        base_ms.append(med["base"] * 1e3)
        for n, m in med.items():
            ratios[n].append(m / med["base"])
    for v in variants:
        v.close()
    bm = statistics.median(base_ms)
    return {n: (statistics.median(rs), min(rs), max(rs), syncs[n], bm) for n, rs in ratios.items()}


# ----------------------------------------------------------------------------------------------
# small steps: the per-tensor cost (issue 10)


def _deep_mlp(tensors: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(max(tensors // 2, 1)):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


class _OpCount(TorchDispatchMode):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket.__name__)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _step_ops(v: Variant) -> dict[str, int]:
    """aten ops dispatched on this thread during one ``optimizer.step()`` of ``v``."""
    v.opt.zero_grad(set_to_none=True)
    v.loss_fn(v.model).backward()
    v.after_backward()
    with _OpCount() as c:
        v.opt.step()
    return c.ops


def bench_small(sizes: list[int], width: int, batch: int, rounds: int, block: int, tmp: Path) -> list[dict[str, Any]]:
    from gradwatch.agent import watch

    out = []
    for n in sizes:
        torch.manual_seed(0)
        model = _deep_mlp(n, width)
        x, y = torch.randn(batch, width), torch.randn(batch, width)

        def loss_fn(m: nn.Module, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return F.mse_loss(m(x), y)

        base, clip, watched = (Variant(k, copy.deepcopy(model), loss_fn) for k in ("base", "clip", "watch"))
        params = list(clip.model.parameters())
        clip.after_backward = lambda ps=params: torch.nn.utils.clip_grad_norm_(ps, float("inf"), foreach=True)
        w = watch(watched.model, watched.opt, server=f"file:{tmp / f'small{n}.gwrec'}", project="bench", every=1)
        variants = [base, clip, watched]
        for v in variants:
            for _ in range(5):
                v.step()
        base_ops, watch_ops = _step_ops(base), _step_ops(watched)
        extra = {k: watch_ops.get(k, 0) - base_ops.get(k, 0) for k in watch_ops}
        meds: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in range(rounds):
            for v in variants[r % 3:] + variants[: r % 3]:
                v.step()
                ts = []
                for _ in range(block):
                    t0 = time.perf_counter()
                    v.step()
                    ts.append(time.perf_counter() - t0)
                meds[v.name].append(statistics.median(ts))
        w.close()
        adds_w = [a - b for a, b in zip(meds["watch"], meds["base"])]
        adds_c = [a - b for a, b in zip(meds["clip"], meds["base"])]
        ratios = [a / c for a, c in zip(adds_w, adds_c) if c > 0]
        out.append({
            "tensors": sum(1 for _ in model.parameters()), "base_us": statistics.median(meds["base"]) * 1e6,
            "watch_us": statistics.median(adds_w) * 1e6, "clip_us": statistics.median(adds_c) * 1e6,
            "ratio": statistics.median(ratios) if ratios else float("nan"),
            "ratio_lo": min(ratios, default=float("nan")), "ratio_hi": max(ratios, default=float("nan")),
            "ops": sum(extra.values()),
            "top": sorted(((c, k) for k, c in extra.items() if c), reverse=True)[:6],
        })
    return out


def _load_stats(agent_dir: Path) -> Any:
    """``agent/stats.py`` of another checkout (``agent_dir``: its ``agent/`` folder) as its own
    module, next to this one's, without running that package's ``__init__``."""
    import importlib
    import types

    pkg = types.ModuleType("gw_before_agent")
    pkg.__path__ = [str(agent_dir)]
    sys.modules["gw_before_agent"] = pkg
    return importlib.import_module("gw_before_agent.stats")


def bench_moments(before: Path | None, rounds: int) -> list[dict[str, Any]]:
    """``layer_moments`` alone on random gradients with each model's shapes, one thread: this
    checkout's against ``before``'s (an ``agent/`` folder), interleaved call by call with the
    order alternating, plus the aten ops of one call of each."""
    from gradwatch.agent import stats as after

    mods = {"after": after} if before is None else {"before": _load_stats(before), "after": after}
    cases: list[tuple[str, list[torch.Tensor]]] = []
    g = torch.Generator().manual_seed(0)
    for name in ("resnet20", "mlp", "transformer"):
        model = make_task(name)[0]
        cases.append((name, [torch.randn(p.shape, generator=g) * 0.01 + 1e-4 for p in model.parameters()]))
    cases.append(("deep MLP 302 x 128", [torch.randn(p.shape, generator=g) * 0.01 for p in _deep_mlp(302, 128).parameters()]))
    cases.append(("resnet20, bf16", [t.bfloat16() for t in cases[0][1]]))
    cases.append(("resnet20, fp32+bf16+fp16", [t.to((torch.float32, torch.bfloat16, torch.float16)[i % 3])
                                               for i, t in enumerate(cases[0][1])]))
    out = []
    for name, grads in cases:
        ops = {}
        for k, m in mods.items():
            m.layer_moments(grads)
            with _OpCount() as c:
                m.layer_moments(grads)
            ops[k] = sum(c.ops.values())
        ts: dict[str, list[float]] = {k: [] for k in mods}
        keys = list(mods)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                mods[k].layer_moments(grads)
                ts[k].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"case": name, "tensors": len(grads), "elements": sum(t.numel() for t in grads), "ops": ops,
                               "ms": {k: statistics.median(v) * 1e3 for k, v in ts.items()}}
        if before is not None:
            rat = [a / b for a, b in zip(ts["after"], ts["before"])]
            row["ratio"] = (statistics.median(rat), min(rat), max(rat))
        out.append(row)
    return out


def print_moments(res: list[dict[str, Any]], rounds: int) -> None:
    both = "ratio" in res[0]
    print(f"\n## statistics pass alone (layer_moments), one thread, median of {rounds} interleaved calls"
          + (" [min-max of the per-call after/before]" if both else ""))
    if both:
        print("| gradients | tensors | elements | before ms | after ms | after / before | before ops | after ops |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print("| gradients | tensors | elements | ms | aten ops |")
        print("|---|---|---|---|---|")
    for r in res:
        if both:
            m, lo, hi = r["ratio"]
            print(f"| {r['case']} | {r['tensors']} | {r['elements'] / 1e6:.2f}M | {r['ms']['before']:.2f} | "
                  f"{r['ms']['after']:.2f} | {m:.2f} [{lo:.2f}-{hi:.2f}] | {r['ops']['before']} | {r['ops']['after']} |")
        else:
            print(f"| {r['case']} | {r['tensors']} | {r['elements'] / 1e6:.2f}M | {r['ms']['after']:.2f} | {r['ops']['after']} |")
    sys.stdout.flush()


def bench_signals(rounds: int) -> list[dict[str, Any]]:
    """Issue 14 (parts 3 and 5): what each per-layer signal costs, one thread, interleaved call
    by call against the plain statistics pass (``layer_moments``, as before these signals) and
    one read pass (``_foreach_norm``) over the same gradients, with the aten ops of one call.
    The underflow count needs a loss scale (multiplier ``S·2^14``); ``mom_cos`` reads an SGD
    momentum buffer per gradient; ``upd_ratio`` is timed for its three routes (Adam state, SGD
    momentum buffer, weight norm after the step) on optimizers stepped once."""
    from gradwatch.agent.signals import momentum_cosine, update_norms
    from gradwatch.agent.stats import layer_moments

    out = []
    g = torch.Generator().manual_seed(0)
    cases: list[tuple[str, list[nn.Parameter]]] = []
    for name in ("resnet20", "mlp", "transformer"):
        cases.append((name, list(make_task(name)[0].parameters())))
    cases.append(("deep MLP 302 x 128", list(_deep_mlp(302, 128).parameters())))
    mult = torch.tensor(2.0**30)
    cpu = torch.device("cpu")
    for name, params in cases:
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        grads = [p.grad for p in params]  # type: ignore[misc]
        opts = {"adam": torch.optim.Adam(params, lr=1e-3), "sgd": torch.optim.SGD(params, lr=0.01, momentum=0.9),
                "plain": torch.optim.SGD(params, lr=0.01)}
        for o in opts.values():
            o.step()
        bufs = [opts["sgd"].state[p]["momentum_buffer"] for p in params]
        ops: dict[str, Callable[[], object]] = {
            "one read pass (_foreach_norm)": lambda gs=grads: torch._foreach_norm(gs),
            "statistics pass (before)": lambda gs=grads: layer_moments(gs),
            "+ zeros": lambda gs=grads: layer_moments(gs, counts=True),
            "+ zeros + underflow": lambda gs=grads: layer_moments(gs, counts=True, small_mult=mult),
            "mom_cos": lambda gs=grads, bs=bufs: momentum_cosine(gs, bs, cpu),
            "upd_ratio (Adam state)": lambda ps=params, o=opts["adam"]: update_norms(o, ps, cpu),
            "upd_ratio (SGD buffer)": lambda ps=params, o=opts["sgd"]: update_norms(o, ps, cpu),
            "upd_ratio (weight norm)": lambda ps=params, o=opts["plain"]: update_norms(o, ps, cpu),
        }
        counts: dict[str, int] = {}
        for k, f in ops.items():
            f()
            with _OpCount() as c:
                f()
            counts[k] = sum(c.ops.values())
        ts: dict[str, list[float]] = {k: [] for k in ops}
        keys = list(ops)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                ops[k]()
                ts[k].append(time.perf_counter() - t0)
        ms = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
        out.append({"case": name, "tensors": len(grads), "elements": sum(t.numel() for t in grads), "ms": ms,
                    "ops": counts})
    return out


@contextlib.contextmanager
def _signals_off() -> Any:
    """watch() as before issue 14's signals: the statistics pass without its counts, no momentum
    cosine, no post-step part (bench only: module attributes swapped for the duration)."""
    from gradwatch.agent import record

    saved = (record.layer_moments, record.momentum_buffers, record.Recorder.post_step)
    orig = saved[0]

    def moments(grads: Any, **kw: Any) -> torch.Tensor:
        kw.pop("counts", None), kw.pop("small_mult", None)
        m = orig(grads, **kw)
        return torch.cat([m, m.new_zeros((m.shape[0], 2))], 1)

    record.layer_moments = moments  # type: ignore[assignment]
    record.momentum_buffers = lambda o, ps: [None] * len(ps)  # type: ignore[assignment]
    record.Recorder.post_step = lambda self, pending, opt: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        record.layer_moments, record.momentum_buffers, record.Recorder.post_step = saved  # type: ignore[method-assign]


def bench_signals_steps(tasks: list[str], rounds: int, block: int, tmp: Path) -> list[dict[str, Any]]:
    """Whole training steps (Adam under gradwatch's GradScaler, CPU), interleaved block by block:
    no watcher, watch() with the signals switched off (as before them), watch() with all of
    them on every step (``signals_every=1``) and watch() as shipped (the sampled signals on every
    10th recorded step); per round the mean step of a block (so the sampled steps count), ratios
    per round, median [min-max]."""
    from gradwatch.agent import GradScaler, watch

    out = []
    for task in tasks:
        model, loss_fn = make_task(task)
        vs = {}
        for name in ("base", "watch, signals off", "watch, all signals", "watch, default (every 10)"):
            m = copy.deepcopy(model)
            opt = torch.optim.Adam(m.parameters(), lr=1e-4)
            sc = GradScaler("cpu", init_scale=2.0**10)
            w = None if name == "base" else watch(m, opt, server=f"file:{tmp / f'sig-{task}-{len(vs)}.gwrec'}",
                                                   project="bench", every=1,
                                                   signals_every=1 if name == "watch, all signals" else None)

            def step(m: nn.Module = m, opt: Any = opt, sc: Any = sc, loss_fn: Any = loss_fn) -> None:
                opt.zero_grad(set_to_none=True)
                sc.scale(loss_fn(m)).backward()
                sc.step(opt)
                sc.update()

            vs[name] = (step, w)
        off = "watch, signals off"
        for name, (step, _) in vs.items():
            for _ in range(3):
                with _signals_off() if name == off else contextlib.nullcontext():
                    step()
        meds: dict[str, list[float]] = {k: [] for k in vs}
        keys = list(vs)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                step = vs[k][0]
                ts = []
                with _signals_off() if k == off else contextlib.nullcontext():
                    for _ in range(block):
                        t0 = time.perf_counter()
                        step()
                        ts.append(time.perf_counter() - t0)
                meds[k].append(statistics.fmean(ts))  # the mean: a sampled step must count
        for _, w in vs.values():
            if w is not None:
                w.close()
        rat = {k: [a / b for a, b in zip(meds[k], meds["base"])] for k in keys[1:]}
        rat["all / off"] = [a / b for a, b in zip(meds["watch, all signals"], meds[off])]
        rat["default / off"] = [a / b for a, b in zip(meds["watch, default (every 10)"], meds[off])]
        out.append({"task": task, "base_ms": statistics.median(meds["base"]) * 1e3,
                    "ratios": {k: (statistics.median(v), min(v), max(v)) for k, v in rat.items()}})
    return out


def print_signals(res: list[dict[str, Any]], rounds: int) -> None:
    print(f"\n## per-layer signals (issue 14), one thread, median of {rounds} interleaved calls; "
          "ratios to the statistics pass before them and to one read pass")
    for r in res:
        base, read = r["ms"]["statistics pass (before)"], r["ms"]["one read pass (_foreach_norm)"]
        print(f"\n{r['case']}: {r['tensors']} tensors, {r['elements'] / 1e6:.2f}M elements\n")
        print("| op | ms | / statistics pass | / one read pass | aten ops |")
        print("|---|---|---|---|---|")
        for k, ms in r["ms"].items():
            print(f"| {k} | {ms:.3f} | {ms / base:.2f} | {ms / read:.2f} | {r['ops'][k]} |")
    sys.stdout.flush()


def print_small(res: list[dict[str, Any]], width: int, batch: int, rounds: int) -> None:
    print(f"\n## small steps: deep MLPs (width {width}, batch {batch}), one thread, watch(every=1) with all "
          f"statistics to a file sink against clip_grad_norm_(params, inf, foreach=True); median of {rounds} "
          "interleaved rounds [min-max of the per-round ratio]")
    print("| parameter tensors | base step µs | watch adds µs | clip_grad_norm_ adds µs | watch / clip | "
          "aten ops per recorded step | ops per tensor | most frequent ops |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        top = ", ".join(f"{k} {c}" for c, k in r["top"])
        print(f"| {r['tensors']} | {r['base_us']:,.0f} | {r['watch_us']:,.0f} | {r['clip_us']:,.0f} | "
              f"{r['ratio']:.1f} [{r['ratio_lo']:.1f}-{r['ratio_hi']:.1f}] | {r['ops']} | "
              f"{r['ops'] / r['tensors']:.2f} | {top} |")
    sys.stdout.flush()


_READ, _RW = "read pass (_foreach_norm)", "read-write pass (_foreach_mul_)"
_STATS = "statistics pass (layer_moments)"
_WATCH = " [watch]"  # row suffix: with what the statistics pass hands in inside watch()


def transform_ops(params: list[nn.Parameter], *, watch_rows: bool = True) -> dict[str, Callable[[], float]]:
    """Timed callables (seconds) on ``params``' gradients, each restoring the gradients first:
    one read pass, one read-write pass, the statistics pass, and ``apply_`` of every transform.

    Plain rows: the transform on a context whose per-layer norms are already cached (the
    clippers' case in ``watch()``; the normalizers then still read their sums, AGC and
    Centralize their row norms/sums): about what a standalone call costs. ``[watch]`` rows: the
    context as ``watch()`` hands it over after its statistics pass (``Recorder._measure``): sums
    (``set_sums``) and, when this transform is the first, the row sums/norms it asked for
    (``wanted_rows`` / ``set_rows``). ``statistics pass ... [rows for X]`` times the statistics
    pass itself when it also takes X's rows, against the plain statistics pass: what the rows
    cost there. AutoClip starts from a full 10 000-norm history (its steady state)."""
    from gradwatch.agent import (
        AGC,
        AutoClip,
        AutoscaledNorm,
        Centralize,
        ClipNorm,
        ClipValue,
        ZClip,
        ZScoreNorm,
    )
    from gradwatch.agent.stats import layer_moments, row_stats
    from gradwatch.agent.transforms.base import GradContext

    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2))))
    autoclip = AutoClip()
    g = torch.Generator().manual_seed(1)
    hist = norm * torch.exp(0.2 * torch.randn(autoclip.history, generator=g, dtype=torch.float64))
    autoclip.load_state_dict({"history": hist, "pos": torch.tensor(0), "len": torch.tensor(autoclip.history)})

    def measure(ctx: GradContext, first: object | None) -> None:
        """What Recorder._measure does before the transforms."""
        rows = None
        if first is not None:
            s, n = first.wanted_rows(ctx)  # type: ignore[attr-defined]
            rows = row_stats(ctx.grads, s, n) if (s or n) else None
        m = layer_moments(ctx.grads, rows=rows)
        ctx.set_norms(m[:, 1].contiguous())
        ctx.set_sums(m[:, 0])
        ctx.set_rows(rows)

    def prepare(in_watch: bool = False, t: object | None = None) -> GradContext:
        """Untimed, before every op alike (so every op starts from the same cache state): restore
        the gradients, then the per-layer norms (plain) or the whole statistics pass ([watch])."""
        torch._foreach_copy_(grads, saved)
        ctx = GradContext(params)
        if in_watch:
            measure(ctx, t)
        else:
            _ = ctx.norms
        return ctx

    def timed(t: object, in_watch: bool = False) -> float:
        ctx = prepare(in_watch, t)
        t0 = time.perf_counter()
        t.apply_(ctx)  # type: ignore[attr-defined]
        return time.perf_counter() - t0

    def plain(f: Callable[[], object]) -> float:
        prepare()
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    def stats_pass(first: object | None) -> float:
        torch._foreach_copy_(grads, saved)
        ctx = GradContext(params)
        t0 = time.perf_counter()
        measure(ctx, first)
        return time.perf_counter() - t0

    ops: dict[str, Callable[[], float]] = {
        _READ: lambda: plain(lambda: torch._foreach_norm(grads, 2)),
        _RW: lambda: plain(lambda: torch._foreach_mul_(grads, 1.0)),
        _STATS: lambda: stats_pass(None),
    }
    for t in (ClipNorm(1.0), ClipValue(0.01), AGC(), ZClip(), autoclip, AutoscaledNorm(), Centralize(), ZScoreNorm()):
        ops[type(t).__name__] = lambda t=t: timed(t)
    if watch_rows:
        for t in (AGC(), AutoscaledNorm(), Centralize(), ZScoreNorm()):
            ops[type(t).__name__ + _WATCH] = lambda t=t: timed(t, in_watch=True)
        for t in (AGC(), Centralize()):
            ops[f"{_STATS} [rows for {type(t).__name__}]"] = lambda t=t: stats_pass(t)
    for f in ops.values():  # warm-up: caches, AGC's layout plan, constant index tensors
        for _ in range(3):
            f()
    return ops


class Interleaved:
    """Timed callables run round by round, in an order that rotates each round. The caller
    interleaves the rounds of several of these (models, sizes), so a burst of load from another
    process on this shared machine lands on a few rounds of every op, not on all rounds of one
    model; medians then ignore it."""

    def __init__(self, ops: dict[Any, Callable[[], float]]) -> None:
        self.ops = ops
        self.keys = list(ops)
        self.times: dict[Any, list[float]] = {k: [] for k in ops}

    def round(self, r: int) -> None:
        n = len(self.keys)
        for k in self.keys[r % n:] + self.keys[: r % n]:
            self.times[k].append(self.ops[k]())

    def median(self, k: Any) -> float:
        return statistics.median(self.times[k])


def bench_transforms(task: str) -> Interleaved:
    """What each transform adds inside the pipeline, on the model's real gradients, against one
    read pass and one read-write pass over the same memory."""
    model, loss_fn = make_task(task)
    loss_fn(model).backward()
    return Interleaved(transform_ops([p for p in model.parameters() if p.grad is not None]))


def transforms_table(b: Interleaved) -> list[tuple[str, float, float, float]]:
    rd, rw = b.median(_READ), b.median(_RW)
    return [(k, b.median(k) * 1e3, b.median(k) / rd, b.median(k) / rw) for k in b.keys]


def scaled_params(task: str, k: int, seed: int = 0) -> list[nn.Parameter]:
    """The model's parameter layout (same tensors, same count, same units) with every tensor k
    times larger: dim 1 of tensors with ndim >= 2 (rows keep their number: AGC's units do not
    change), dim 0 of 1-d tensors, 0-d unchanged. Random weights and gradients (with an offset,
    so centering matters), float32."""
    model, _ = make_task(task)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in model.parameters():
        s = tuple(p.shape)
        if len(s) >= 2:
            s = (s[0], s[1] * k) + s[2:]
        elif len(s) == 1:
            s = (s[0] * k,)
        q = nn.Parameter(torch.randn(s, generator=gen) * 0.05)
        q.grad = torch.randn(s, generator=gen) * 0.01 + 0.002
        out.append(q)
    del model
    return out


def bench_marginal(task: str, sizes: tuple[int, int]) -> tuple[Interleaved, list[float]]:
    """Marginal passes: each op on the same layer layout at two large gradient sizes (every tensor
    x``sizes[0]`` and x``sizes[1]``; by default both well past the 32 MB L3 cache, so the extra
    bytes are memory traffic) and at the model's own size (x1), all interleaved:

        marginal = (t_big - t_small) / (rw_big - rw_small)   read-write passes per gradient byte
        fixed    = t_x1 - marginal * rw_x1                    ms that do not grow with the bytes

    The fixed cost is taken at x1, where ``t`` is small: at the large sizes it would be the
    difference of two large noisy numbers. Returns the bench (keys ``(op, 0|1|2)`` for x1, small,
    big) and the gradient MB at the three sizes."""
    psets = [scaled_params(task, k) for k in (1, sizes[0], sizes[1])]
    mb = [sum(p.numel() * p.element_size() for p in ps) / 2**20 for ps in psets]  # grads: same shapes
    per_size = [transform_ops(ps) for ps in psets]
    return Interleaved({(n, j): f for j, ops in enumerate(per_size) for n, f in ops.items()}), mb


def marginal_table(b: Interleaved) -> tuple[dict[str, tuple[float, float, float, float]], list[float]]:
    """{op: (marginal, p25, p75, fixed_ms)} (p25/p75: quartiles of the per-round marginal
    estimates, i.e. the noise) and the read-write-pass ms at x1, small and big."""
    rw = [b.median((_RW, j)) for j in range(3)]
    out = {}
    for n in dict.fromkeys(k[0] for k in b.keys):
        marg = (b.median((n, 2)) - b.median((n, 1))) / (rw[2] - rw[1])
        t = b.times
        per_round = sorted((big - s) / (rb - rs) for s, big, rs, rb in
                           zip(t[(n, 1)], t[(n, 2)], t[(_RW, 1)], t[(_RW, 2)]) if rb > rs)
        q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else [marg, marg, marg]
        out[n] = (marg, q[0], q[2], (b.median((n, 0)) - marg * rw[0]) * 1e3)
    return out, [x * 1e3 for x in rw]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,mlp,transformer")
    ap.add_argument("--variants", default="base,watch,naive,wandb,tb")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--transform-reps", type=int, default=30)
    ap.add_argument("--skip-transforms", action="store_true")
    ap.add_argument("--skip-steps", action="store_true", help="only the transform tables")
    ap.add_argument("--skip-marginal", action="store_true")
    ap.add_argument("--marginal-sizes", default="resnet20=64:256,mlp=2:8,transformer=4:16",
                    help="per model: the two large tensor-size multipliers (others: 1:8); the defaults "
                         "put both (~60 and ~250 MB of gradients) well past a 32 MB L3 cache")
    ap.add_argument("--marginal-reps", type=int, default=30)
    ap.add_argument("--small-sizes", default="6,18,50,98,302", help="parameter tensors of the deep MLPs")
    ap.add_argument("--small-width", type=int, default=256)
    ap.add_argument("--small-batch", type=int, default=32)
    ap.add_argument("--small-rounds", type=int, default=7)
    ap.add_argument("--small-block", type=int, default=10)
    ap.add_argument("--small-steps-only", action="store_true", help="only the small-step table (one thread)")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--moments-only", action="store_true",
                    help="only the statistics-pass table (layer_moments alone, one thread)")
    ap.add_argument("--moments-before", type=Path, default=None,
                    help="another checkout's agent/ folder: its layer_moments interleaved against this one's")
    ap.add_argument("--moments-rounds", type=int, default=15)
    ap.add_argument("--signals-only", action="store_true",
                    help="only the per-layer signals table (zeros, underflow, mom_cos, upd_ratio; one thread)")
    ap.add_argument("--signals-rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_SILENT", "true")
    names = args.variants.split(",")
    if "base" not in names:
        names.insert(0, "base")
    print(f"# agent overhead  torch {torch.__version__}  threads {args.threads}  "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC  (python {' '.join(sys.argv)})")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.signals_only:
            torch.set_num_threads(1)
            print_signals(bench_signals(args.signals_rounds), args.signals_rounds)
            torch.set_num_threads(args.threads)
            steps = bench_signals_steps(args.models.split(","), args.rounds, args.block, tmp)
            print(f"\n## whole steps: Adam under GradScaler (CPU, {args.threads} threads), mean step of a block of "
                  f"{args.block}, ratios median over {args.rounds} rounds [min-max]")
            print("| model | base step ms | watch, signals off / base | watch, all signals / base | "
                  "watch, default (every 10) / base | all / off | default / off |")
            print("|---|---|---|---|---|---|---|")
            for r in steps:
                q = r["ratios"]
                cells = [f"{q[k][0]:.3f} [{q[k][1]:.3f}-{q[k][2]:.3f}]"
                         for k in ("watch, signals off", "watch, all signals", "watch, default (every 10)",
                                   "all / off", "default / off")]
                print(f"| {r['task']} | {r['base_ms']:.1f} | " + " | ".join(cells) + " |")
            print(f"\n(bench wall time {(time.perf_counter() - t_start) / 60:.1f} min)")
            return 0
        if args.moments_only:
            torch.set_num_threads(1)
            print_moments(bench_moments(args.moments_before, args.moments_rounds), args.moments_rounds)
            return 0
        if not args.skip_small:
            torch.set_num_threads(1)
            sizes = [int(s) for s in args.small_sizes.split(",")]
            small = bench_small(sizes, args.small_width, args.small_batch, args.small_rounds, args.small_block, tmp)
            print_small(small, args.small_width, args.small_batch, args.small_rounds)
            torch.set_num_threads(args.threads)
            if args.small_steps_only:
                print(f"\n(bench wall time {(time.perf_counter() - t_start) / 60:.1f} min)")
                return 0
        for task in ([] if args.skip_steps else args.models.split(",")):
            res = bench_task(task, names, args.rounds, args.block, args.warmup, tmp)
            bm = next(iter(res.values()))[4]
            print(f"\n## {task}  (baseline step ~{bm:.0f} ms; ratio = median over {args.rounds} rounds [min-max])")
            print("| variant | step time / baseline | host syncs per step (training thread) |")
            print("|---|---|---|")
            for n, (m, lo, hi, s, _) in res.items():
                print(f"| {n} | {m:.3f} [{lo:.3f}-{hi:.3f}] | {s} |")
            sys.stdout.flush()
        tasks = args.models.split(",")
        spec = dict(kv.split("=") for kv in args.marginal_sizes.split(",") if kv)
        sizes: dict[str, tuple[int, int]] = {}
        for t in tasks:
            k1, k2 = (int(v) for v in spec.get(t, "1:8").split(":"))
            sizes[t] = (k1, k2)
        tables = {} if args.skip_transforms else {t: bench_transforms(t) for t in tasks}
        margs = {} if args.skip_marginal else {t: bench_marginal(t, sizes[t]) for t in tasks}
        runs = [(b, args.transform_reps) for b in tables.values()] + [(b, args.marginal_reps) for b, _ in margs.values()]
        for r in range(max((n for _, n in runs), default=0)):
            for b, n in runs[r % len(runs):] + runs[: r % len(runs)]:
                if r < n:
                    b.round(r)
        for task, b in tables.items():
            print(f"\n## transforms inside the pipeline, fixed gradients: {task} (median of {args.transform_reps})")
            print("| op | ms | / one read pass | / one read-write pass |")
            print("|---|---|---|---|")
            for k, ms, r1, r2 in transforms_table(b):
                print(f"| {k} | {ms:.2f} | {r1:.2f} | {r2:.2f} |")
        if margs:
            mres = {t: marginal_table(b) for t, (b, _) in margs.items()}
            print(f"\n## marginal passes: same layer layout at several gradient sizes (median of "
                  f"{args.marginal_reps}, interleaved)")
            for task in tasks:
                mb, rw = margs[task][1], mres[task][1]
                k = (1,) + sizes[task]
                print(f"- {task}: every tensor " + ", ".join(
                    f"x{m}: {b:.1f} MB of fp32 gradients, one read-write pass {t:.2f} ms" for m, b, t in zip(k, mb, rw)))
            print("\nmarginal = (t_big - t_small) / (rw_big - rw_small) over the two large sizes, in read-write passes "
                  "over the gradient memory [25th-75th percentile of the per-round estimates]; "
                  "fixed = t_x1 - marginal * rw_x1 (ms, at the model's own size)\n")
            print("| op | " + " | ".join(f"{t} marginal | {t} fixed ms" for t in tasks) + " |")
            print("|---|" + "---|---|" * len(tasks))
            for op in mres[tasks[0]][0]:
                cells = []
                for task in tasks:
                    m, lo, hi, fx = mres[task][0][op]
                    cells.append(f"{m:.2f} [{lo:.2f}-{hi:.2f}] | {fx:.2f}")
                print(f"| {op} | " + " | ".join(cells) + " |")
            # the rows' own cost: the marginal above mixes sizes; compare the two statistics
            # passes size by size instead (each median over the same interleaved rounds)
            print("\nstatistics pass taking a first transform's rows, time / the plain statistics pass, per size\n")
            print("| rows for | " + " | ".join(f"{t} x{k}" for t in tasks for k in (1,) + sizes[t]) + " |")
            print("|---|" + "---|" * (3 * len(tasks)))
            for what in ("AGC", "Centralize"):
                op = f"{_STATS} [rows for {what}]"
                cells = [f"{margs[t][0].median((op, j)) / margs[t][0].median((_STATS, j)):.2f}"
                         for t in tasks for j in range(3)]
                print(f"| {what} | " + " | ".join(cells) + " |")
    print(f"\n(bench wall time {(time.perf_counter() - t_start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
