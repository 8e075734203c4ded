"""The agent's cost on a CUDA GPU (issue 10 point 5 "on a GPU (when lent)", issue 14's signals).

CPU runs (``agent_overhead.py``) time the host; on a GPU the step is asynchronous, so every
timing here is a block of steps between two ``_sync()`` calls, divided by the
block's length (what a training loop's throughput sees). Variants run interleaved, block by
block, the starting variant rotating each round; ratios are per round, median [min-max].

Tables:
  small steps   deep MLPs with 6 to 302 parameter tensors (width 256, batch 32): what
                ``watch(every=1)`` (file sink) adds to a step against what one
                ``clip_grad_norm_(params, inf, foreach=True)`` adds, plus the CUDA kernels and
                aten ops one recorded ``optimizer.step()`` issues beyond the bare one.
  whole steps   the 8x1024 MLP, ResNet-20 and the 4-layer transformer of agent_overhead.py:
                SGD with momentum in fp32, and Adam under fp16 autocast with a loss scaler
                (torch's ``GradScaler`` for the bare run, gradwatch's with and without watch()),
                watch() as shipped (signals on every 10th recorded step) and with every signal on
                every step; kernels per step from the profiler.
  host syncs    Tensor.item/tolist/... calls on the training thread during one watched step, and
                what ``torch.cuda.set_sync_debug_mode("error")`` says over ten scaled steps (the
                scaler's own found_inf read fires it) and around ten watched optimizer.step()
                calls without a scaler (fused AdamW, ClipNorm, every signal: must say "none").
  --profile     the profiler's kernels by name and ops by host time of one watched step.

    python3 bench/gpu.py                 # everything, ~3 min on an H200
    python3 bench/gpu.py --skip-whole --no-flat --small-sizes 6,50,302   # the foreach-only A/B
    python3 bench/gpu.py --dry-run-cpu --rounds 1 --block 1   # checks the script on a CPU (no figures)
    python3 bench/gpu.py --rounds 5 --block 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from agent_overhead import _deep_mlp, _OpCount, count_syncs  # bench/ is on sys.path
from agent_overhead import make_task as _make_task

DEV = torch.device("cuda")


_AMP = torch.float16


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _name() -> str:
    return torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (dry run)"


def _timed_blocks(steps: dict[str, Callable[[], None]], rounds: int, block: int) -> dict[str, list[float]]:
    """Per variant, the mean step time of each block (seconds), interleaved round by round."""
    keys = list(steps)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            steps[k]()  # absorbs what the previous variant left queued
            _sync()
            t0 = time.perf_counter()
            for _ in range(block):
                steps[k]()
            _sync()
            out[k].append((time.perf_counter() - t0) / block)
    return out


def _kernels(fn: Callable[[], None]) -> tuple[int, int]:
    """(kernels, memcpy/memset) that ``fn`` puts on the GPU, from the profiler."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    _sync()
    if DEV.type != "cuda":
        fn()
        return 0, 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    k = m = 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            if "memcpy" in e.name.lower() or "memset" in e.name.lower():
                m += 1
            else:
                k += 1
    return k, m


def _med(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


# ----------------------------------------------------------------------------------------------


def bench_small(sizes: list[int], width: int, batch: int, rounds: int, block: int, tmp: Path) -> list[dict[str, Any]]:
    from gradwatch.agent import watch

    out = []
    for n in sizes:
        torch.manual_seed(0)
        model = _deep_mlp(n, width).to(DEV)
        x, y = torch.randn(batch, width, device=DEV), torch.randn(batch, width, device=DEV)
        runs: dict[str, Any] = {}
        for name in ("base", "clip", "watch"):
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            ps = list(m.parameters())
            w = watch(m, opt, server=f"file:{tmp / f'small{n}.gwrec'}", project="bench", every=1) if name == "watch" else None

            def fwd(m: nn.Module = m, opt: Any = opt, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                opt.zero_grad(set_to_none=True)
                F.mse_loss(m(x), y).backward()

            def step(fwd: Callable[[], None] = fwd, opt: Any = opt, ps: list[Any] = ps, clip: bool = name == "clip") -> None:
                fwd()
                if clip:
                    torch.nn.utils.clip_grad_norm_(ps, float("inf"), foreach=True)
                opt.step()

            runs[name] = (step, fwd, opt, ps, w)
        for step, *_ in runs.values():
            for _ in range(5):
                step()
        # kernels and aten ops of the optimizer step alone (the clip inside its own), beyond the bare one
        kern: dict[str, int] = {}
        ops: dict[str, int] = {}
        for name, (_, fwd, opt, ps, _) in runs.items():
            fwd()

            def only(opt: Any = opt, ps: list[Any] = ps, clip: bool = name == "clip") -> None:
                if clip:
                    torch.nn.utils.clip_grad_norm_(ps, float("inf"), foreach=True)
                opt.step()

            kern[name] = sum(_kernels(only))
            fwd()
            with _OpCount() as c:
                only()
            ops[name] = sum(c.ops.values())
        t = _timed_blocks({k: v[0] for k, v in runs.items()}, rounds, block)
        runs["watch"][4].close()
        adds_w = [a - b for a, b in zip(t["watch"], t["base"])]
        adds_c = [a - b for a, b in zip(t["clip"], t["base"])]
        ratios = [a / c for a, c in zip(adds_w, adds_c) if c > 0]
        out.append({"tensors": len(list(model.parameters())), "base_us": statistics.median(t["base"]) * 1e6,
                    "watch_us": statistics.median(adds_w) * 1e6, "clip_us": statistics.median(adds_c) * 1e6,
                    "ratio": _med(ratios) if ratios else (float("nan"),) * 3,
                    "step_ratio": _med([a / b for a, b in zip(t["watch"], t["base"])]),
                    "k_watch": kern["watch"] - kern["base"], "k_clip": kern["clip"] - kern["base"],
                    "ops_watch": ops["watch"] - ops["base"], "ops_clip": ops["clip"] - ops["base"]})
    return out


def print_small(res: list[dict[str, Any]], width: int, batch: int, rounds: int, block: int) -> None:
    print(f"\n## small steps on {_name()}: deep MLPs (width {width}, batch {batch}, SGD "
          f"momentum, fp32), watch(every=1) to a file sink against clip_grad_norm_(params, inf, foreach=True); "
          f"mean step of {block}-step blocks between synchronizes, median of {rounds} interleaved rounds [min-max]")
    print("| parameter tensors | base step µs | watch adds µs | clip_grad_norm_ adds µs | watch / clip | "
          "watched / base step | kernels per recorded step: watch, clip | aten ops: watch, clip |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        m, lo, hi = r["ratio"]
        s, slo, shi = r["step_ratio"]
        print(f"| {r['tensors']} | {r['base_us']:,.0f} | {r['watch_us']:,.0f} | {r['clip_us']:,.0f} | "
              f"{m:.2f} [{lo:.2f}-{hi:.2f}] | {s:.3f} [{slo:.3f}-{shi:.3f}] | {r['k_watch']}, {r['k_clip']} | "
              f"{r['ops_watch']}, {r['ops_clip']} |")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------


def make_task(name: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """agent_overhead.make_task's models and batches, on this bench's device."""
    return _make_task(name, DEV)


VARIANTS = ("bare", "watch (default)", "watch, all signals")


def bench_whole(tasks: list[str], amp: bool, rounds: int, block: int, tmp: Path) -> list[dict[str, Any]]:
    from gradwatch.agent import GradScaler, watch

    out = []
    for task in tasks:
        model, loss_fn = make_task(task)
        names = ("bare", "gradwatch scaler, no watch", *VARIANTS[1:]) if amp else VARIANTS
        steps: dict[str, Callable[[], None]] = {}
        watchers = []
        for i, name in enumerate(names):
            m = copy.deepcopy(model)
            if amp:
                opt: Any = torch.optim.Adam(m.parameters(), lr=1e-4)
                sc: Any = torch.amp.GradScaler(DEV.type, init_scale=2.0**10) if name == "bare" else GradScaler(DEV.type, init_scale=2.0**10)
            else:
                opt, sc = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), None
            if name.startswith("watch"):
                watchers.append(watch(m, opt, server=f"file:{tmp / f'whole-{task}-{amp}-{i}.gwrec'}", project="bench",
                                      every=1, signals_every=1 if name.endswith("all signals") else None))

            def step(m: nn.Module = m, opt: Any = opt, sc: Any = sc, loss_fn: Any = loss_fn) -> None:
                opt.zero_grad(set_to_none=True)
                if sc is None:
                    loss_fn(m).backward()
                    opt.step()
                    return
                with torch.autocast(DEV.type, dtype=_AMP):
                    loss = loss_fn(m)
                sc.scale(loss).backward()
                sc.step(opt)
                sc.update()

            steps[name] = step
        for s in steps.values():
            for _ in range(12):  # past the first sampled-signal step and the scaler's first growth checks
                s()
        # kernels per step: one step, and the mean of ten (so the every-10th signals count)
        kern = {}
        for k, s in steps.items():
            def ten(s: Callable[[], None] = s) -> None:
                for _ in range(10):
                    s()
            kern[k] = (sum(_kernels(s)), sum(_kernels(ten)) / 10)
        t = _timed_blocks(steps, rounds, block)
        for w in watchers:
            w.close()
        out.append({"task": task, "amp": amp, "base_ms": statistics.median(t["bare"]) * 1e3,
                    "ratios": {k: _med([a / b for a, b in zip(t[k], t["bare"])]) for k in names[1:]},
                    "kernels": kern})
    return out


def print_whole(res: list[dict[str, Any]], rounds: int, block: int) -> None:
    for amp in (False, True):
        rows = [r for r in res if r["amp"] == amp]
        if not rows:
            continue
        what = ("Adam, fp16 autocast, loss scaler (bare: torch.amp.GradScaler)" if amp
                else "SGD with momentum, fp32")
        names = list(rows[0]["ratios"])
        print(f"\n## whole steps on {_name()}: {what}; watch(every=1) to a file sink; mean step "
              f"of {block}-step blocks between synchronizes, ratio to bare, median of {rounds} interleaved rounds [min-max]")
        print("| model | bare step ms | " + " | ".join(f"{n} / bare" for n in names)
              + " | kernels per step (one step; mean of 10): " + ", ".join(["bare", *names]) + " |")
        print("|---|---|" + "---|" * len(names) + "---|")
        for r in rows:
            cells = " | ".join(f"{m:.3f} [{lo:.3f}-{hi:.3f}]" for m, lo, hi in r["ratios"].values())
            ks = ", ".join(f"{a}; {b:.1f}" for a, b in r["kernels"].values())
            print(f"| {r['task']} | {r['base_ms']:.2f} | {cells} | {ks} |")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------


def check_syncs(tmp: Path) -> None:
    """Host syncs of one watched, scaled, clipped step on the training thread (Python-level
    counts, and torch's own sync detector in "error" mode over ten steps)."""
    from gradwatch.agent import ClipNorm, GradScaler, watch

    model, loss_fn = make_task("transformer")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sc = GradScaler(DEV.type, init_scale=2.0**10, transforms=[ClipNorm(1.0)])
    w = watch(model, opt, server=f"file:{tmp / 'sync.gwrec'}", project="bench", every=1, signals_every=1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEV.type, dtype=_AMP):
            loss = loss_fn(model)
        sc.scale(loss).backward()
        sc.step(opt)
        sc.update()

    for _ in range(5):
        step()
    with count_syncs() as c:
        step()
    _sync()
    err = "none"
    if DEV.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            with torch.autocast(DEV.type, dtype=_AMP):
                loss = loss_fn(model)
            opt.zero_grad(set_to_none=True)
            sc.scale(loss).backward()
            sc.step(opt)  # torch's scaler itself syncs once here (found_inf), as documented
            sc.update()
    except RuntimeError as e:
        err = str(e).splitlines()[0][:200]
    finally:
        if DEV.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    w.close()
    # without a scaler: only watch() inside optimizer.step() (fused AdamW, ClipNorm, every signal)
    m2, _ = make_task("transformer")
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-4, fused=DEV.type == "cuda")
    w2 = watch(m2, opt2, server=f"file:{tmp / 'sync2.gwrec'}", project="bench", every=1, signals_every=1,
               transforms=[ClipNorm(1.0)])
    err2 = "none"
    for i in range(12):
        opt2.zero_grad(set_to_none=True)
        loss_fn(m2).backward()
        _sync()
        if i >= 2 and DEV.type == "cuda":  # after warm-up (pinned ring allocated)
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt2.step()
        except RuntimeError as e:
            err2 = str(e).splitlines()[0][:200]
            break
        finally:
            if DEV.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    w2.close()
    print(f"\n## host syncs without a scaler (transformer, fused AdamW, ClipNorm, every signal): "
          f"set_sync_debug_mode('error') around ten watched optimizer.step() calls: {err2}")
    print(f"\n## host syncs (transformer, Adam, fp16 autocast, gradwatch GradScaler + ClipNorm, every signal): "
          f"{c['n']} Tensor.item/tolist/... calls on the training thread in one step (tensors on any device, "
          f"CPU ones included); set_sync_debug_mode('error') over ten steps: {err} (the scaler's step() "
          "reads found_inf once, as torch's does, so an error is expected here; the CUDA tests check "
          "watch() without a scaler)")
    sys.stdout.flush()


def profile_steps(tmp: Path) -> None:
    """Where a watched step's extra kernels and host time go: the profiler's CUDA kernels by name
    and its ops by self CPU time, for one recorded step with and without the sampled signals."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    from gradwatch.agent import watch

    torch.manual_seed(0)
    cases = [("mlp 8x1024", *make_task("mlp"))]
    deep = _deep_mlp(302, 256).to(DEV)
    xd, yd = torch.randn(32, 256, device=DEV), torch.randn(32, 256, device=DEV)
    cases.append(("deep MLP 302 tensors", deep, lambda m: F.mse_loss(m(xd), yd)))
    for name, model, loss_fn in cases:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        w = watch(model, opt, server=f"file:{tmp / 'prof.gwrec'}", project="bench", every=1, signals_every=4)
        for _ in range(9):  # the next recorded step is a plain one, the one after it a signal step
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            opt.step()
        for label in ("plain recorded step", "signal step"):
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            _sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                opt.step()
                host = time.perf_counter() - t0
                _sync()
            kern: dict[str, int] = {}
            for e in prof.events():
                if e.device_type == DeviceType.CUDA:
                    kern[e.name[:110]] = kern.get(e.name[:110], 0) + 1
            print(f"\n### {name}, {label}: optimizer.step() host {host * 1e3:.2f} ms (profiled), "
                  f"{sum(kern.values())} GPU kernels/copies")
            for k, c in sorted(kern.items(), key=lambda kv: -kv[1])[:25]:
                print(f"    {c:5d}  {k}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        w.close()
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,resnet20,transformer")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--small-sizes", default="6,18,50,98,302")
    ap.add_argument("--small-width", type=int, default=256)
    ap.add_argument("--small-batch", type=int, default=32)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--skip-whole", action="store_true")
    ap.add_argument("--profile", action="store_true", help="only the profiler breakdown of one watched step")
    ap.add_argument("--no-flat", action="store_true",
                    help="small tensors on the foreach route too (as before the concatenated route): an A/B")
    ap.add_argument("--dry-run-cpu", action="store_true", help="run every path on the CPU (no figures): checks the script")
    args = ap.parse_args()
    global DEV, _AMP
    if args.dry_run_cpu:
        DEV, _AMP = torch.device("cpu"), torch.bfloat16
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    if args.no_flat:
        from gradwatch.agent import stats

        stats._flat_route = lambda dev: False  # type: ignore[assignment]
        print("statistics pass: foreach route only (--no-flat)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device {_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.profile:
            profile_steps(tmp)
            return
        try:
            check_syncs(tmp)
        except Exception:  # the tables still run
            traceback.print_exc()
        if not args.skip_small:
            sizes = [int(s) for s in args.small_sizes.split(",")]
            print_small(bench_small(sizes, args.small_width, args.small_batch, args.rounds, args.block, tmp),
                        args.small_width, args.small_batch, args.rounds, args.block)
        if not args.skip_whole:
            tasks = args.models.split(",")
            res = bench_whole(tasks, False, args.rounds, args.block, tmp)
            res += bench_whole(tasks, True, args.rounds, args.block, tmp)
            print_whole(res, args.rounds, args.block)


if __name__ == "__main__":
    main()
