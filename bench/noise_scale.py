"""Cost of the gradient noise scale: the DDP step with and without it, side by side.

Two gloo ranks on CPU (``torch.multiprocessing``), one process group, three identical DDP copies
of the model: ``base`` (no gradwatch), ``watch`` (``watch(every=1)``, all statistics, noise scale
off) and ``noise`` (the same plus ``noise_scale=BATCH``). Rounds interleave one untimed and
``--block`` timed steps per variant, the starting variant rotating; a ratio is the variant's block
median over ``base``'s in the same round, reported as the median over rounds [min-max]; the
same for rank 0's process CPU time per block (less sensitive to other tenants than wall time:
it counts the work the variant adds, not the waiting).

    .venv/bin/python bench/noise_scale.py --rounds 5 --block 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

BATCH = 32
VARIANTS = ("base", "watch", "noise")


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def worker(rank: int, world: int, port: int, args: Any, out: Any) -> None:
    from gradwatch.agent import watch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, Any]] = {}
    for v in VARIANTS:
        m = nn.parallel.DistributedDataParallel(make_model(args.width, args.depth))
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        w = None if v == "base" else watch(m, opt, server="memory", noise_scale=BATCH if v == "noise" else False)
        runs[v] = (m, opt, w)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(BATCH, 64, generator=g), torch.randint(0, 10, (BATCH,), generator=g)

    def step(v: str) -> None:
        m, opt, w = runs[v]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        if w is not None and w.sink is not None and len(w.sink.steps) > 200:  # type: ignore[attr-defined]
            w.sink.steps.clear()  # type: ignore[attr-defined]  # keep the memory sink small

    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    base_ms: list[float] = []
    for r in range(args.rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        med: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for v in order:
            step(v)  # untimed
            ts, cs = [], []
            for _ in range(args.block):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                step(v)
                ts.append(time.perf_counter() - t0)
                cs.append(time.process_time() - c0)
            med[v] = statistics.median(ts)
            cpu[v] = sum(cs)
        for v in VARIANTS:
            ratios[v].append(med[v] / med["base"])
            cpu_ratios[v].append(cpu[v] / cpu["base"])
        base_ms.append(med["base"] * 1e3)
    recorded = runs["noise"][2].sink.steps[-1] if rank == 0 else None  # type: ignore[union-attr]
    for _, _, w in runs.values():
        if w is not None:
            w.close()
    if rank == 0:
        out.put({"ratios": ratios, "cpu": cpu_ratios, "base_ms": base_ms,
                 "noise_scale": None if recorded is None else recorded.noise_trace})
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(worker, args=(2, port, args, q), nprocs=2, join=True, start_method="spawn")
    res = q.get()
    n_params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
    print(f"#### MLP {args.depth}×{args.width} ({n_params / 1e6:.2f} M parameters), 2 gloo ranks, batch {BATCH} per rank "
          f"(base step ~{statistics.median(res['base_ms']):.1f} ms; ratio = median over {args.rounds} rounds [min-max])")
    print("| variant | step time / base | process CPU time / base |")
    print("|---|---|---|")

    def fmt(r: list[float]) -> str:
        return f"{statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]"

    for v in VARIANTS:
        print(f"| {v} | {fmt(res['ratios'][v])} | {fmt(res['cpu'][v])} |")
    for key, what in (("ratios", "step time"), ("cpu", "CPU time")):
        rel = [n / w for n, w in zip(res[key]["noise"], res[key]["watch"])]
        print(f"\nnoise / watch ({what}): {fmt(rel)}")
    print(f"last recorded noise_trace on rank 0: {res['noise_scale']}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
