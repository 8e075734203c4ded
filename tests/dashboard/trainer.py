"""A real training run for the dashboard tests: a small MLP under gradwatch's GradScaler (CPU) with
ClipNorm (and AutoscaledNorm with ``--autoscaled``), streaming to a server. An overflow is injected at ``--overflow-at`` (one element of
the first layer's gradient set to inf, as fp16 training would produce), so the scaler records it
with that layer. ``--sleep`` paces the steps so a browser can watch them arrive::

    python tests/dashboard/trainer.py --server URL --run-id ID --steps N [--sleep S] [--overflow-at K]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--overflow-at", type=int, default=-1)
    ap.add_argument("--layers", type=int, default=4, help="hidden Linear layers")
    ap.add_argument("--seed", type=int, default=0, help="model and data seed")
    ap.add_argument("--autoscaled", action="store_true", help="also AutoscaledNorm (before ClipNorm)")
    ap.add_argument("--dead-at", type=int, default=-1, help="from this step on, zero the last hidden layer's "
                    "weight gradient (its hook), as a dead layer would")
    ap.add_argument("--hold", default="", help="before step --dead-at, wait until this file exists")
    a = ap.parse_args()
    from gradwatch.agent import AutoscaledNorm, ClipNorm, GradScaler, watch

    torch.manual_seed(a.seed)
    mods: list[torch.nn.Module] = [torch.nn.Linear(16, 32), torch.nn.ReLU()]
    for _ in range(a.layers - 1):
        mods += [torch.nn.Linear(32, 32), torch.nn.ReLU()]
    model = torch.nn.Sequential(*mods, torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(a.seed + 1)
    step = [0]
    if a.dead_at >= 0:
        dying = model[2 * (a.layers - 1)].weight
        dying.register_hook(lambda grad: torch.zeros_like(grad) if step[0] >= a.dead_at else grad)
    with watch(model, opt, run=a.run_id, project="dashboard-test", server=a.server,
               transforms=[*([AutoscaledNorm()] if a.autoscaled else []), ClipNorm(1.0)]) as w:
        scaler = GradScaler(device="cpu", init_scale=1024.0, growth_interval=20, watcher=w)
        for i in range(a.steps):
            step[0] = i
            if i == a.dead_at and a.hold:
                while not os.path.exists(a.hold):  # the test watches the healthy page first
                    time.sleep(0.05)
            x = torch.randn(32, 16, generator=g)
            y = torch.randint(0, 4, (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            if i == a.overflow_at:
                with torch.no_grad():
                    model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            w.log(loss=loss.item(), lr=0.05)
            print(i, flush=True)
            if a.sleep:
                time.sleep(a.sleep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
