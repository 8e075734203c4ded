"""One rank of the DDP test (run as a subprocess by test_ddp.py): trains a small model under
DistributedDataParallel with a watcher and, independently, a plain copy of the model on the union
of every rank's batch (the gradient DDP's all-reduce average must equal). Writes JSON to OUT."""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from gradwatch.agent import ClipNorm, watch
from gradwatch.agent.spec import with_derived

STEPS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def ref_stats(g: torch.Tensor) -> dict[str, float]:
    x = g.detach().double().reshape(-1)
    return {"mean": x.mean().item(), "var": x.var(correction=0).item(), "l2": x.norm().item(),
            "maxabs": x.abs().max().item()}


def main() -> None:
    rank, world, port, out, ranks = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = watch(model, opt, server="memory", ranks=ranks, transforms=[ClipNorm(0.05)])

    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    names = [n for n, _ in ref.named_parameters()]
    expected = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = batch(step, rank)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        w.log(loss=1.0)

        ref_opt.zero_grad()
        xs, ys = zip(*(batch(step, r) for r in range(world)))
        nn.functional.cross_entropy(ref(torch.cat(xs)), torch.cat(ys)).backward()
        expected.append({n: ref_stats(p.grad) for n, p in ref.named_parameters()})
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()

    result = {"rank": rank, "run_id": w.run_id, "recording": w.recording, "expected": expected, "names": names,
              "params_match": all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
                                  for a, b in zip(model.module.parameters(), ref.parameters()))}
    if w.sink is not None:
        w.close()
        table = {la.index: la.name for la in w.sink.layers}
        result["steps"] = [{"step": s.step, "rank": s.rank, "names": [table[i] for i in s.layer_ids],
                            "layers": with_derived(s.layers), "total_norm": s.total_norm} for s in w.sink.steps]
        result["scalar_ranks"] = [s.rank for s in w.sink.scalars]
        result["world_size"] = w.sink.run.world_size
    else:
        w.close()
    with open(out, "w") as f:
        json.dump(result, f, allow_nan=True)
    # every rank past its last collective, DDP's reducer gone, then the group (see _noise_ddp_worker)
    dist.barrier()
    del model, opt, w
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
