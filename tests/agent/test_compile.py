"""torch.compile: the watcher lives at the optimizer, so it adds no graph break to forward/backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.agent import ClipNorm, watch


def _train(backend: str, watched: bool) -> tuple[int, int, list, list]:  # type: ignore[type-arg]
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))
    cmodel = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(cmodel.parameters(), lr=1e-2)
    w = watch(cmodel, opt, server="memory", transforms=[ClipNorm(0.5)]) if watched else None
    grads = []
    opt.register_step_pre_hook(lambda o, a, k: grads.append([p.grad.clone() for p in model.parameters()]))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        if w is not None:
            w.log(loss=loss)
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    recs = []
    if w is not None:
        w.close()
        recs = w.sink.steps
        assert [la.name for la in w.sink.layers] == [n for n, _ in model.named_parameters()]  # no _orig_mod.
    return breaks, graphs, recs, grads


def _check(backend: str) -> None:
    b0, g0, _, ref_grads = _train(backend, watched=False)
    b1, g1, recs, grads = _train(backend, watched=True)
    assert g0 >= 1, "the model was not compiled at all"
    assert (b1, g1) == (b0, g0)  # no graph break and no recompilation added by the watcher
    assert b1 == 0
    assert len(recs) == 3
    for rec, gs in zip(recs, grads):
        assert rec.total_norm_post == pytest.approx(
            float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gs]))), rel=1e-5)
        assert rec.total_norm_post <= 0.5 + 1e-6


def test_compiled_model_eager_backend_no_graph_breaks() -> None:
    _check("eager")


@pytest.mark.slow
def test_compiled_model_inductor_no_graph_breaks() -> None:
    _check("inductor")


def _compiled_optimizer_step(watched: bool) -> tuple[tuple[int, int, int], list]:  # type: ignore[type-arg]
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = watch(model, opt, server="memory", transforms=[ClipNorm(0.1)]) if watched else None
    step = torch.compile(opt.step, backend="eager")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4, generator=g)).pow(2).mean().backward()
        step()
    recs = []
    if w is not None:
        w.close()
        recs = w.sink.steps
    stats = counters["stats"]
    return (sum(counters["graph_break"].values()), stats["unique_graphs"], stats["calls_captured"]), recs


def test_compiled_optimizer_step_hooks_are_not_traced() -> None:
    (b0, g0, c0), _ = _compiled_optimizer_step(watched=False)
    (b1, g1, c1), recs = _compiled_optimizer_step(watched=True)
    # the hooks are hidden from dynamo (torch.compiler.disable): the step compiles to the same
    # graph, and no break is added (torch's own Adam has one that the hooks happen to absorb)
    assert (g1, c1) == (g0, c0) and g0 >= 1
    assert b1 <= b0
    assert [r.step for r in recs] == [0, 1, 2] and all(r.total_norm_post <= 0.1 + 1e-6 for r in recs)
