"""Agent overhead per training step, side by side in one run (issue 2 and issue 3).

Variants, each on its own identically initialised copy of the model:
  base      plain training step
  watch     gradwatch watch(every=1), all statistics, records streamed to a file by the
            background sender (the real path, GIL contention included)
  naive     per-parameter .item() statistics (mean, var, std, norm, max-abs, non-finite)
  wandb     wandb.watch(log="gradients", log_freq=1) offline + wandb.log each step
  tb        TensorBoard SummaryWriter.add_histogram for every gradient, every step

Method (BASELINES.md §A; the machine is shared and noisy): after warm-up, each round runs every
variant for one untimed step and then a block of timed steps, the starting variant rotating. A
round's ratio is the variant's block median over the baseline's block median in that round; the
table shows the median ratio over rounds with [min-max].

Host syncs: Tensor.item/tolist/__bool__/__float__/__int__/cpu/numpy calls made on the training
thread during one step are counted (on a GPU each would stall the host until the stream drains).

Second table: what each transform adds inside the pipeline (``apply_`` on a context whose norms
the statistics pass already computed), on fixed gradients, timed interleaved against one read
pass (_foreach_norm) and one read-write pass (_foreach_mul_) over the same gradient memory, so
"adds at most one pass" reads directly as a ratio.

    .venv/bin/python bench/agent_overhead.py                  # all models, ~10 min here
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

import torch
import torch.nn as nn
import torch.nn.functional as F
from cifar_resnet import ResNetCifar  # bench/ is on sys.path when a script here runs

# ----------------------------------------------------------------------------------------------
# models (shapes of BASELINES.md §A)


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


def make_task(name: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if name == "resnet20":
        x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        return ResNetCifar(depth=20, width=16), lambda m: F.cross_entropy(m(x), y)
    if name == "mlp":
        layers: list[nn.Module] = []
        for _ in range(8):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        x, y = torch.randn(256, 1024, generator=g), torch.randint(0, 1024, (256,), generator=g)
        return nn.Sequential(*layers), lambda m: F.cross_entropy(m(x), y)
    if name == "transformer":
        x = torch.randint(0, 1000, (16, 128), generator=g)
        y = torch.randint(0, 1000, (16, 128), generator=g)
        return TinyLM(), lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten())
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


def bench_transforms(task: str, reps: int) -> list[tuple[str, float, float, float]]:
    """What each transform adds inside the pipeline, on fixed gradients, against one read pass and
    one read-write pass over the same memory. As in ``watch()``, the per-layer norms are already
    in the context (the statistics pass computed them), so only ``apply_`` is timed."""
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
    from gradwatch.agent.transforms.base import GradContext

    model, loss_fn = make_task(task)
    loss_fn(model).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def timed(t: object) -> float:
        torch._foreach_copy_(grads, saved)
        ctx = GradContext(params)
        _ = ctx.norms  # filled by the statistics pass in watch(); not part of the transform's cost
        t0 = time.perf_counter()
        t.apply_(ctx)  # type: ignore[attr-defined]
        return time.perf_counter() - t0

    def plain(f: Callable[[], object]) -> float:
        torch._foreach_copy_(grads, saved)
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    ops: dict[str, Callable[[], float]] = {
        "read pass (_foreach_norm)": lambda: plain(lambda: torch._foreach_norm(grads, 2)),
        "read-write pass (_foreach_mul_)": lambda: plain(lambda: torch._foreach_mul_(grads, 1.0)),
    }
    for t in (ClipNorm(1.0), ClipValue(0.01), AGC(), ZClip(), AutoClip(), AutoscaledNorm(), Centralize(), ZScoreNorm()):
        ops[type(t).__name__] = lambda t=t: timed(t)
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(reps):
        for k, f in ops.items():
            times[k].append(f())
    med = {k: statistics.median(v) for k, v in times.items()}
    rd, rw = med["read pass (_foreach_norm)"], med["read-write pass (_foreach_mul_)"]
    return [(k, m * 1e3, m / rd, m / rw) for k, m in med.items()]


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_SILENT", "true")
    names = args.variants.split(",")
    if "base" not in names:
        names.insert(0, "base")
    print(f"# agent overhead  torch {torch.__version__}  threads {args.threads}  {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for task in args.models.split(","):
            res = bench_task(task, names, args.rounds, args.block, args.warmup, tmp)
            bm = next(iter(res.values()))[4]
            print(f"\n## {task}  (baseline step ~{bm:.0f} ms; ratio = median over {args.rounds} rounds [min-max])")
            print("| variant | step time / baseline | host syncs per step (training thread) |")
            print("|---|---|---|")
            for n, (m, lo, hi, s, _) in res.items():
                print(f"| {n} | {m:.3f} [{lo:.3f}-{hi:.3f}] | {s} |")
            sys.stdout.flush()
        if not args.skip_transforms:
            for task in args.models.split(","):
                print(f"\n## transforms inside the pipeline, fixed gradients: {task} (median of {args.transform_reps})")
                print("| op | ms | / one read pass | / one read-write pass |")
                print("|---|---|---|---|")
                for k, ms, r1, r2 in bench_transforms(task, args.transform_reps):
                    print(f"| {k} | {ms:.2f} | {r1:.2f} | {r2:.2f} |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
