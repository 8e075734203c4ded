"""One rank of the noise-scale DDP tests (run as a subprocess by test_noise.py).

Trains a small model under DistributedDataParallel with ``watch(..., noise_scale=B)`` and, on the
side, computes the reference directly: a plain copy of the model takes the gradient of EVERY
rank's batch separately (the local gradients, explicitly), from which |G_small|² (the mean over
ranks of the local squared norms) and |G_big|² (the squared norm of their mean) follow per layer,
then the estimators and bias-corrected EMAs in float64 on the host. Writes JSON to OUT.

Modes: ``plain`` (noise scale on), ``closeearly`` (rank 1 closes its watcher after step
CLOSE_AT while training goes on), ``every3`` (``watch(every=3)``), ``userhook`` (the user registered a comm hook first: the
watcher must warn and record no noise scale, and training must be unchanged), ``server`` (records
into the server at URL, given as argv[6]).
"""

from __future__ import annotations

import gc
import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from gradwatch.agent import watch

BATCH = 4
BETA = 0.99
#: ``closeearly``: rank 1 closes its watcher after this step's optimizer step.
CLOSE_AT = 5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task (labels from a fixed linear map) so the true gradient is not ~0."""
    g = torch.Generator().manual_seed(7919 * step + rank)
    x = torch.randn(BATCH, 6, generator=g)
    w = torch.Generator().manual_seed(3)
    return x, (x @ torch.randn(6, 3, generator=w)).argmax(1)


def main() -> None:
    rank, world, port, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    steps = int(sys.argv[6])
    url = sys.argv[7] if len(sys.argv) > 7 else "memory"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(make_model())
    user_calls = [0]
    if mode == "userhook":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def mine(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations, not strings
            user_calls[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, mine)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = watch(model, opt, server=url, run="noise-ddp", noise_scale=BATCH, every=3 if mode == "every3" else 1)

        ref = make_model()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
        names = [n for n, _ in ref.named_parameters()]
        expected = []
        for step in range(steps):
            opt.zero_grad()
            x, y = batch(step, rank)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if mode == "closeearly" and rank == 1 and step == CLOSE_AT:
                w.close()  # this rank stops measuring; rank 0 goes on: no mismatched collective

            local: list[list[torch.Tensor]] = []  # per rank, per parameter: the local gradient
            for r in range(world):
                ref.zero_grad()
                xr, yr = batch(step, r)
                nn.functional.cross_entropy(ref(xr), yr).backward()
                local.append([p.grad.detach().double().clone() for p in ref.parameters()])  # type: ignore[union-attr]
            small = [sum(float(g[i].square().sum()) for g in local) / world for i in range(len(names))]
            mean = [sum(g[i] for g in local) / world for i in range(len(names))]
            big = [float(m.square().sum()) for m in mean]
            expected.append({"small": small, "big": big})
            for p, m in zip(ref.parameters(), mean):
                p.grad = m.float()
            ref_opt.step()
        if url != "memory":
            w.flush(30)
    warned = [str(c.message) for c in caught if "communication hook" in str(c.message)]
    result = {"rank": rank, "run_id": w.run_id, "names": names, "expected": expected, "warned": warned,
              "user_calls": user_calls[0], "world": world, "batch": BATCH,
              "params_match": all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
                                  for a, b in zip(model.module.parameters(), ref.parameters()))}
    sink = w.sink
    w.close()
    if sink is not None and url == "memory":
        table = {la.index: la.name for la in sink.layers}  # type: ignore[attr-defined]
        result["steps"] = [{"step": s.step, "names": [table[i] for i in s.layer_ids],
                            "noise_scale": s.noise_scale, "noise_g2": s.noise_g2, "noise_trace": s.noise_trace,
                            "layer_noise": s.layers["noise_scale"]} for s in sink.steps]  # type: ignore[attr-defined]
    with open(out, "w") as f:
        json.dump(result, f, allow_nan=True)
    # Tear down in order: every rank past its last collective, then DDP's reducer (which holds the
    # process group) before the group itself. Leaving both to interpreter exit let a gloo thread
    # outlive its owner now and then ("terminate called without an active exception").
    dist.barrier()
    del model, opt, w, sink
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
