"""A small real training loop with ``watch()``, used in-process by the e2e tests and as a script
(for the killed-process and the 2-process gloo DDP scenarios)::

    python tests/transport/train.py --server URL --steps N [--spool-dir D] [--print]
        [--ddp RANK WORLD PORT] [--ranks all] [--run-id ID] [--sleep S]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

N_LAYERS = 6  # parameter tensors of the model below


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def sink_factory(url: str, **options: Any) -> Any:
    from gradwatch.agent.transport import make_sink

    def make(*, run: Any, layers: Any, rank: int) -> Any:
        return make_sink(url, run=run, layers=layers, rank=rank, **options)

    return make


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, watcher: Any, steps: int, *, sleep: float = 0.0,
          on_step: Any = None, ddp_model: Any = None) -> list[float]:
    """Run ``steps`` optimizer steps; return each step's wall time (seconds)."""
    times = []
    g = torch.Generator().manual_seed(1)
    fwd = ddp_model or model
    for i in range(steps):
        t0 = time.perf_counter()
        x = torch.randn(32, 16, generator=g)
        y = torch.randint(0, 4, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(fwd(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if watcher is not None:
            watcher.log(loss=loss)
        times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step(i)
        if sleep:
            time.sleep(sleep)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--spool-dir", default=None)
    ap.add_argument("--print", action="store_true", help="print each finished step (flushed)")
    ap.add_argument("--ddp", nargs=3, type=int, metavar=("RANK", "WORLD", "PORT"))
    ap.add_argument("--ranks", default="zero")
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--sleep", type=float, default=0.0)
    a = ap.parse_args()
    from gradwatch.agent import watch

    ddp_model = None
    model, opt = build()
    if a.ddp:
        import torch.distributed as dist

        rank, world, port = a.ddp
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    opts: dict[str, Any] = {"backoff_max": 1.0}
    if a.spool_dir:
        opts["spool_dir"] = a.spool_dir
    w = watch(ddp_model or model, opt, server=a.server, ranks=a.ranks, run_id=a.run_id,
              sink=sink_factory(a.server, **opts) if a.server.startswith("http") else None)
    print(f"run_id {w.run_id}", flush=True)

    def say(i: int) -> None:
        if a.print:
            print(f"step {i}", flush=True)

    train(model, opt, w, a.steps, sleep=a.sleep, on_step=say, ddp_model=ddp_model)
    w.close(timeout=30)
    print(f"stats {w.stats()}", flush=True)
    if a.ddp:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
