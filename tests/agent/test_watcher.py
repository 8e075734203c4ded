"""watch()/Watcher: what is recorded, when, and that monitoring never breaks training."""

from __future__ import annotations

import gc
import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

from gradwatch.agent import ClipNorm, GradScaler, watch
from gradwatch.agent.spec import with_derived
from gradwatch.agent.transforms.base import Slot, Transform
from gradwatch.agent.transport.base import Sink
from gradwatch.agent.wire import LAYER_FIELDS, StepRecord, decode_batch


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(m: nn.Module, seed: int) -> torch.Tensor:
    x, y = _batch(seed)
    return nn.functional.cross_entropy(m(x), y)


def _ref(g: torch.Tensor) -> dict[str, float]:
    x = g.detach().to(torch.float64).reshape(-1)
    return {"numel": x.numel(), "mean": x.mean().item(), "var": x.var(correction=0).item(),
            "std": x.std(correction=0).item(), "l2": x.norm().item(), "maxabs": x.abs().max().item(),
            "nonfinite": int((~torch.isfinite(x)).sum())}


class _Capture:
    """A step pre-hook registered after the watcher's: the grads the optimizer really uses."""

    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str]) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.names = names
        opt.register_step_pre_hook(self)

    def __call__(self, opt, args, kwargs):  # type: ignore[no-untyped-def]
        self.steps.append({self.names[id(p)]: p.grad.detach().clone() for g in opt.param_groups
                           for p in g["params"] if p.grad is not None})


def _names(m: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in m.named_parameters()}


def _assert_matches(rec: StepRecord, grads: dict[str, torch.Tensor], layers, rel: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    names = {la.index: la.name for la in layers}
    assert sorted(names[i] for i in rec.layer_ids) == sorted(grads)
    cols = with_derived(rec.layers)
    for j, lid in enumerate(rec.layer_ids):
        want = _ref(grads[names[lid]])
        for k, v in want.items():
            got = cols[k][j]
            assert got == pytest.approx(v, rel=rel, abs=1e-7), (names[lid], k)
    total = math.sqrt(sum(_ref(g)["l2"] ** 2 for g in grads.values()))
    assert rec.total_norm == pytest.approx(total, rel=rel)


def _train(m, opt, w, steps: int, *, accum: int = 1, seed0: int = 0):  # type: ignore[no-untyped-def]
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for k in range(accum):
            (_loss(m, seed0 + s * accum + k) / accum).backward()
        opt.step()
        if w is not None:
            w.log(loss=float(s))


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stats_match_naive_reference_on_random_models(seed: int) -> None:
    torch.manual_seed(seed)
    width = [int(x) for x in torch.randint(1, 20, (4,))]
    layers: list[nn.Module] = []
    d = 6
    for wd in width:
        layers += [nn.Linear(d, wd), nn.GELU()]
        d = wd
    m = nn.Sequential(*layers, nn.Linear(d, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    w = watch(m, opt, server="memory")
    cap = _Capture(opt, _names(m))
    _train(m, opt, w, 4, seed0=seed * 100)
    w.close()
    steps = w.sink.steps
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert all(s.rank == 0 and not s.skipped and s.loss_scale is None for s in steps)
    for rec, grads in zip(steps, cap.steps):
        assert set(rec.layers) == set(LAYER_FIELDS)
        assert rec.layers["l2_post"] == [None] * len(rec.layer_ids)
        _assert_matches(rec, grads, w.sink.layers)


def test_layer_table_names_shapes_and_order() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory")
    table = w.sink.layers
    assert [la.name for la in table] == [n for n, _ in m.named_parameters()]
    assert [la.index for la in table] == list(range(len(table)))
    assert table[0].shape == [16, 6] and table[0].dtype == "float32" and not table[0].sparse
    w.close()


def test_model_none_names_params_in_optimizer_order() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(None, opt, server="memory")
    assert [la.name for la in w.layers] == [f"param{i}" for i in range(6)]
    w.close()


def test_gradient_accumulation_records_once_with_accumulated_grad() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory")
    cap = _Capture(opt, _names(m))
    _train(m, opt, w, 3, accum=4)
    steps = w.sink.steps
    assert len(steps) == 3 and len(cap.steps) == 3
    # the captured grad is the sum over 4 micro-batches; check it against a fresh recomputation
    ref = _model()
    ref.load_state_dict(_model().state_dict())
    for k in range(4):
        (_loss(ref, k) / 4).backward()
    first = {n: p.grad for n, p in ref.named_parameters()}
    for n, g in first.items():
        torch.testing.assert_close(cap.steps[0][n], g)
    for rec, grads in zip(steps, cap.steps):
        _assert_matches(rec, grads, w.sink.layers)
    w.close()


@pytest.mark.parametrize("name,kw", [
    ("SGD", {"foreach": True, "momentum": 0.9}), ("SGD", {"fused": True}),
    ("Adam", {"foreach": True}), ("Adam", {"fused": True}),
    ("AdamW", {"foreach": False}), ("AdamW", {"fused": True}),
])
def test_foreach_and_fused_optimizers(name: str, kw: dict) -> None:  # type: ignore[type-arg]
    m = _model()
    opt = getattr(torch.optim, name)(m.parameters(), lr=1e-2, **kw)
    w = watch(m, opt, server="memory", transforms=[ClipNorm(0.5)])
    cap = _Capture(opt, _names(m))  # after the watcher's hook: sees clipped grads
    _train(m, opt, w, 3)
    for rec, clipped in zip(w.sink.steps, cap.steps):
        post = math.sqrt(sum(g.double().norm().item() ** 2 for g in clipped.values()))
        assert post <= 0.5 + 1e-5
        assert rec.total_norm_post == pytest.approx(post, rel=1e-5)
        assert rec.clip_coef == pytest.approx(min(1.0, 0.5 / (rec.total_norm + 1e-6)), rel=1e-5)
        names = {la.index: la.name for la in w.sink.layers}
        for j, lid in enumerate(rec.layer_ids):
            assert rec.layers["l2_post"][j] == pytest.approx(clipped[names[lid]].double().norm().item(), rel=1e-5)
        assert rec.transforms["clip_norm"]["coef"] == pytest.approx(rec.clip_coef)
    w.close()


def test_clipping_matches_torch_clip_grad_norm_bitwise() -> None:
    a, b = _model(), _model()
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    w = watch(a, oa, server="memory", transforms=[ClipNorm(0.3)])
    for s in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            _loss(m, s).backward()
            if m is b:
                torch.nn.utils.clip_grad_norm_(b.parameters(), 0.3, foreach=True)
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    w.close()


# ---------------------------------------------------------------------------------------------
# scheduling and filters


def test_every_n_records_every_nth_but_transforms_run_every_step() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", every=3, transforms=[ClipNorm(1e-3)])
    cap = _Capture(opt, _names(m))
    _train(m, opt, w, 7)
    assert [s.step for s in w.sink.steps] == [0, 3, 6]
    for grads in cap.steps:  # clipped on every step, recorded or not
        assert math.sqrt(sum(g.double().norm().item() ** 2 for g in grads.values())) <= 1e-3 + 1e-8
    w.close()


def test_include_exclude_globs_and_callable() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", include=["0.*", "4.*"], exclude="*.bias", transforms=[ClipNorm(1e-3)])
    cap = _Capture(opt, _names(m))
    _train(m, opt, w, 2)
    assert [la.name for la in w.sink.layers] == ["0.weight", "4.weight"]
    rec = w.sink.steps[0]
    assert rec.layer_ids == [0, 1]
    # transforms act on all params: the unmeasured layers are clipped too
    assert math.sqrt(sum(g.double().norm().item() ** 2 for g in cap.steps[0].values())) <= 1e-3 + 1e-8
    # total_norm covers every gradient of the optimizer, measured or not
    w.close()
    m2 = _model()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    w2 = watch(m2, opt2, server="memory", include=lambda n, p: p.dim() == 1)
    assert [la.name for la in w2.layers] == ["0.bias", "2.bias", "4.bias"]
    w2.close()


def test_none_grads_are_absent_from_the_step() -> None:
    m = _model()
    extra = nn.Linear(3, 3)  # in the optimizer, never used
    opt = torch.optim.SGD(list(m.parameters()) + list(extra.parameters()), lr=0.1)
    w = watch(m, opt, server="memory")
    _train(m, opt, w, 2)
    rec = w.sink.steps[0]
    assert len(w.sink.layers) == 8
    assert rec.layer_ids == list(range(6))
    assert all(len(v) == 6 for v in rec.layers.values())
    w.close()


def test_sparse_embedding_grads_recorded_as_sparse() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(50, 4, sparse=True)
    head = nn.Linear(4, 2)
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = watch(model, opt, server="memory", transforms=[ClipNorm(0.1)])
    for s in range(3):
        opt.zero_grad()
        idx = torch.tensor([s, s + 1, s + 1, 7])
        head(emb(idx)).sum().backward()
        ref = emb.weight.grad.coalesce()._values().clone()
        opt.step()
    names = {la.name: la for la in w.sink.layers}
    assert names["emb.weight"].sparse and not names["head.weight"].sparse
    rec = w.sink.steps[-1]
    j = rec.layer_ids.index(names["emb.weight"].index)
    want = _ref(ref)
    assert rec.layers["numel"][j] == 12 == want["numel"]
    assert rec.layers["l2"][j] == pytest.approx(want["l2"], rel=1e-5)
    assert rec.layers["mean"][j] == pytest.approx(want["mean"], rel=1e-5)
    w.close()


def test_nonfinite_event_names_the_layer() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    w = watch(m, opt, server="memory")
    opt.zero_grad()
    _loss(m, 0).backward()
    m[2].weight.grad[0, 0] = float("nan")
    m[2].weight.grad[1, 1] = float("inf")
    opt.step()
    rec = w.sink.steps[0]
    j = rec.layer_ids.index(2)
    assert rec.layers["nonfinite"][j] == 2 and math.isnan(rec.layers["l2"][j])
    assert math.isnan(rec.total_norm)
    (ev,) = [e for e in w.sink.events if e.kind == "nonfinite"]
    assert ev.data["layers"] == ["2.weight"] and ev.data["counts"] == [2] and ev.step == 0
    w.close()


# ---------------------------------------------------------------------------------------------
# log, close, context manager, state


def test_log_values_steps_and_type_errors() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory")
    w.log(lr=0.1)  # before any step: step 0
    opt.zero_grad()
    loss = _loss(m, 0)
    loss.backward()
    opt.step()
    w.log(loss=loss, acc=1, ok=True, missing=None)  # a tensor with grad_fn: detached, read later
    w.log(step=10, other=2.5)
    with pytest.raises(TypeError, match="acc"):
        w.log(acc="high")
    with pytest.raises(TypeError, match="v"):
        w.log(v=torch.ones(3))
    with pytest.raises(TypeError, match="step"):
        w.log(step=-1, x=1.0)
    sc = sorted(w.sink.scalars, key=lambda s: s.time)  # the sink may deliver resolved records later
    assert [(s.step, s.values) for s in sc] == [
        (0, {"lr": 0.1}), (0, {"loss": pytest.approx(loss.item()), "acc": 1.0, "ok": 1.0, "missing": None}),
        (10, {"other": 2.5})]
    w.close()


def test_context_manager_statuses_and_hooks_removed() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with watch(m, opt, server="memory") as w:
        _train(m, opt, w, 2)
    assert w.sink.status == "finished" and w.closed
    assert not hasattr(opt, "_gradwatch_watcher")
    _train(m, opt, None, 2)  # after close: no hook fires
    assert len(w.sink.steps) == 2
    w.close()  # idempotent

    opt2 = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with watch(m, opt2, server="memory") as w2:
            raise RuntimeError("boom")
    assert w2.sink.status == "crashed"


def test_state_dict_resumes_run_id_step_and_transform_state() -> None:
    from gradwatch.agent import AutoClip

    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", transforms=[AutoClip(percentile=50.0, history=8)])
    _train(m, opt, w, 5)
    state = w.state_dict()
    w.close()
    assert state["step"] == 5 and state["run_id"] == w.run_id and len(w.run_id) == 32

    opt2 = torch.optim.SGD(m.parameters(), lr=0.1)
    w2 = watch(m, opt2, server="memory", transforms=[AutoClip(percentile=50.0, history=8)])
    assert w2.run_id != w.run_id
    w2.load_state_dict(state)
    assert w2.run_id == w.run_id and w2.sink.run.run_id == w.run_id
    torch.testing.assert_close(w2.transforms[0].state_dict(), w.transforms[0].state_dict(), equal_nan=True)
    _train(m, opt2, w2, 2)
    assert [s.step for s in w2.sink.steps] == [5, 6]
    w2.close()
    with pytest.raises(ValueError, match="transforms"):
        w3 = watch(m, torch.optim.SGD(m.parameters(), lr=0.1), server="memory")
        try:
            w3.load_state_dict(state)
        finally:
            w3.close()


# ---------------------------------------------------------------------------------------------
# validation at watch() time


@pytest.mark.parametrize("kw,exc,match", [
    ({"every": 0}, ValueError, "every"),
    ({"every": 1.5}, ValueError, "every"),
    ({"ranks": "some"}, ValueError, "ranks"),
    ({"server": "ftp://x"}, ValueError, "unsupported"),
    ({"include": 3}, TypeError, "include"),
    ({"tags": "a"}, TypeError, "tags"),
    ({"config": {"device": torch.device("cpu")}}, TypeError, "config"),
    ({"scaler": object()}, TypeError, "scaler"),
    ({"run_id": "bad id!"}, ValueError, "run_id"),
    ({"transforms": [ClipNorm(1.0), ClipNorm(2.0)]}, ValueError, "global clipper"),
    ({"transforms": [object()]}, TypeError, "Transform"),
])
def test_bad_arguments_raise_at_watch(kw: dict, exc: type, match: str) -> None:  # type: ignore[type-arg]
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    kw = {"server": "memory", **kw}
    with pytest.raises(exc, match=match):
        watch(m, opt, **kw)
    assert not opt._optimizer_step_pre_hooks


def test_second_watcher_on_same_optimizer_is_an_error() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory")
    with pytest.raises(ValueError, match="already watched"):
        watch(m, opt, server="memory")
    w.close()
    watch(m, opt, server="memory").close()


def test_env_server_and_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    monkeypatch.setenv("GRADWATCH_URL", "memory")
    w = watch(m, opt)
    assert w.sink is not None and type(w.sink).__name__ == "MemorySink"
    w.close()
    monkeypatch.setenv("GRADWATCH_DISABLED", "1")
    w = watch(m, opt)
    _train(m, opt, w, 2)
    assert w.sink is None and not opt._optimizer_step_pre_hooks and w.stats()["steps"] == 0
    w.close()
    monkeypatch.setenv("GRADWATCH_DISABLED", "maybe")
    with pytest.raises(ValueError, match="GRADWATCH_DISABLED"):
        watch(m, opt)


# ---------------------------------------------------------------------------------------------
# failure policy


class _BrokenSink(Sink):
    def __init__(self) -> None:
        self.calls = 0

    def put(self, item):  # type: ignore[no-untyped-def]
        self.calls += 1
        raise OSError("disk full")

    def flush(self, timeout=None):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    def close(self, timeout=None, status="finished"):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    def stats(self):  # type: ignore[no-untyped-def]
        return {"sent": 0, "spooled": 0, "dropped": 0, "pending": 0}


class _BrokenTransform(Transform):
    name = "broken"
    slot = Slot.ELEMENTWISE

    def apply_(self, ctx) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("state corrupted")


def test_failing_sink_warns_once_and_training_completes() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sink = _BrokenSink()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.warns(RuntimeWarning, match="disk full") as rec:
        w = watch(m, opt, sink=sink)
        _train(m, opt, w, 5)
        w.flush()
        w.close()
    assert sink.calls == 10  # 5 steps + 5 log calls were attempted
    kinds = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(kinds) == len(set(k.split(" failed")[0] for k in kinds)) == 4  # once per kind
    assert w.stats()["failures"] == 12
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_failure_while_building_record_off_thread_is_contained() -> None:
    class BadEvents(_BrokenTransform):
        name = "bad_events"

        def apply_(self, ctx) -> None:  # type: ignore[no-untyped-def]
            ctx.report(self.name, x=1.0)

        def events(self, values):  # type: ignore[no-untyped-def]
            raise KeyError("nope")

    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", transforms=[BadEvents()])
    with pytest.warns(RuntimeWarning, match="BadEvents.events"):
        _train(m, opt, w, 3)
        steps = w.sink.steps
    assert len(steps) == 3 and steps[0].transforms["bad_events"] == {"x": 1.0}
    w.close()


# ---------------------------------------------------------------------------------------------
# loss scaling


def test_torch_gradscaler_nonfused_records_unscaled_grads() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w = watch(m, opt, server="memory", scaler=scaler)
    cap = _Capture(opt, _names(m))
    for s in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(m, s)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    for rec, grads in zip(w.sink.steps, cap.steps):
        _assert_matches(rec, grads, w.sink.layers)
        assert rec.loss_scale == 1024.0 and not rec.skipped
    assert max(rec.total_norm for rec in w.sink.steps) < 100  # unscaled, not x1024
    w.close()


def test_torch_gradscaler_fused_divides_stats_and_unscales_for_transforms() -> None:
    a, b = _model(), _model()
    oa = torch.optim.Adam(a.parameters(), lr=1e-2, fused=True)
    ob = torch.optim.Adam(b.parameters(), lr=1e-2, fused=True)
    sa = torch.amp.GradScaler("cpu", init_scale=256.0)
    sb = torch.amp.GradScaler("cpu", init_scale=256.0)
    w = watch(a, oa, server="memory", transforms=[ClipNorm(0.2)])
    for s in range(3):
        for m, o, sc in ((a, oa, sa), (b, ob, sb)):
            o.zero_grad()
            sc.scale(_loss(m, s)).backward()
            if m is b:  # the reference: explicit unscale and torch's clipping
                sc.unscale_(ob)
                torch.nn.utils.clip_grad_norm_(b.parameters(), 0.2, foreach=True)
            sc.step(o)
            sc.update()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    rec = w.sink.steps[0]
    assert rec.loss_scale == 256.0 and rec.total_norm < 50 and rec.total_norm_post <= 0.2 + 1e-6

    # without transforms the grads stay scaled for the fused kernel and only the stats are divided
    c = _model()
    oc = torch.optim.Adam(c.parameters(), lr=1e-2, fused=True)
    scc = torch.amp.GradScaler("cpu", init_scale=256.0)
    w2 = watch(c, oc, server="memory")
    cap = _Capture(oc, _names(c))
    oc.zero_grad()
    scc.scale(_loss(c, 0)).backward()
    scc.step(oc)
    scc.update()
    unscaled = {n: g / 256.0 for n, g in cap.steps[0].items()}
    _assert_matches(w2.sink.steps[0], unscaled, w2.sink.layers)
    w.close()
    w2.close()


@pytest.mark.parametrize("fused", [False, True])
def test_gradwatch_scaler_records_skips_scale_and_events(fused: bool) -> None:
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, fused=fused)
    w = watch(m, opt, server="memory", transforms=[ClipNorm(1.0)])
    scaler = GradScaler("cpu", init_scale=2.0**10)
    for s in range(4):
        opt.zero_grad()
        scaler.scale(_loss(m, s)).backward()
        if s == 1:
            m[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    steps = w.sink.steps
    assert [s.step for s in steps] == [0, 1, 2, 3]  # one record per step, fused or not
    assert [s.skipped for s in steps] == [False, True, False, False]
    assert [s.loss_scale for s in steps] == [1024.0, 1024.0, 512.0, 512.0]
    assert steps[1].layers["l2_post"][0] is None and steps[0].total_norm_post is not None
    assert steps[1].layers["nonfinite"][0] == 1
    kinds = {e.kind: e for e in w.sink.events}
    assert "overflow" in kinds and kinds["overflow"].step == 1
    assert "nonfinite" not in kinds  # the scaler owns non-finite steps
    w.close()


# ---------------------------------------------------------------------------------------------
# file sink and memory


def test_file_sink_lines_are_decodable_batches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "run.gwrec"
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with watch(m, opt, server=f"file:{path}", run="t", transforms=[ClipNorm(1.0)]) as w:
        _train(m, opt, w, 5)
    batches = [decode_batch(line) for line in path.read_bytes().splitlines() if line.strip()]
    assert batches and all(b.run.run_id == w.run_id for b in batches)
    assert sorted(s.step for b in batches for s in b.steps) == [0, 1, 2, 3, 4]
    assert batches[-1].status == "finished"
    assert {la.name for b in batches for la in b.layers} == {n for n, _ in m.named_parameters()}
    json.loads(path.read_bytes().splitlines()[0])


class _CountingSink(Sink):
    """Resolves every pending record at once and keeps only counters."""

    def __init__(self) -> None:
        self.steps = 0

    def put(self, item):  # type: ignore[no-untyped-def]
        if hasattr(item, "resolve"):
            self.steps += sum(isinstance(r, StepRecord) for r in item.resolve())

    def flush(self, timeout=None):  # type: ignore[no-untyped-def]
        return True

    def close(self, timeout=None, status="finished"):  # type: ignore[no-untyped-def]
        pass

    def stats(self):  # type: ignore[no-untyped-def]
        return {"sent": self.steps, "spooled": 0, "dropped": 0, "pending": 0}


def test_memory_flat_over_3000_steps() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True)
    sink = _CountingSink()
    w = watch(m, opt, sink=sink, transforms=[ClipNorm(1.0)])
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    def census() -> tuple[int, int, int]:
        """(gc-tracked Python objects, live tensors, resident set size in bytes)."""
        gc.collect()
        objs = gc.get_objects()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance on deprecated torch module attributes
            n_t = sum(1 for o in objs if isinstance(o, torch.Tensor))
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return len(objs), n_t, rss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster and immune to a busy machine
    try:
        run(300)
        o0, t0, r0 = census()
        run(3000)
        o1, t1, r1 = census()
    finally:
        torch.set_num_threads(threads)
    assert sink.steps == 3300
    # A record, dict or list kept per step would add >= 3000 objects; a tensor per step, 3000 tensors.
    assert o1 - o0 < 200, o1 - o0
    assert t1 <= t0
    assert r1 - r0 < 8 * 2**20, r1 - r0  # and no native growth to speak of
    w.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    w = watch(m, opt, server="memory", transforms=[ClipNorm(1.0)])
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 8, (32,), device="cuda")
    for i in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        if i >= 2:  # after warm-up (pinned ring allocated)
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            w.log(loss=torch.ones((), device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    steps = w.sink.steps
    assert len(steps) == 5 and all(math.isfinite(s.total_norm) for s in steps)
    assert w.stats()["failures"] == 0
    w.close()


def test_per_layer_transform_reports_align_with_layer_ids() -> None:
    from gradwatch.agent import AGC

    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", include="*.weight", transforms=[AGC(clipping=1e-4)])
    _train(m, opt, w, 2)
    rec = w.sink.steps[0]
    assert rec.layer_ids == [0, 1, 2]
    per_layer = rec.transforms["agc"]["layers"]
    # the model's last Linear is AGC's final classifier: left unclipped by default (ALGORITHMS §6)
    assert isinstance(per_layer, list) and per_layer == [1.0, 1.0, 0.0]
    assert rec.layers["l2_post"][0] < rec.layers["l2"][0]
    assert rec.layers["l2_post"][2] == rec.layers["l2"][2]
    w.close()
    # exclude=() clips every layer, the classifier included
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", include="*.weight", transforms=[AGC(clipping=1e-4, exclude=())])
    _train(m, opt, w, 1)
    assert w.sink.steps[0].transforms["agc"]["layers"] == [1.0, 1.0, 1.0]
    w.close()


def test_gradwatch_scaler_every_n_still_transforms_each_step() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", every=2, transforms=[ClipNorm(1e-3)])
    cap = _Capture(opt, _names(m))
    scaler = GradScaler("cpu", init_scale=8.0)
    for s in range(4):
        opt.zero_grad()
        scaler.scale(_loss(m, s)).backward()
        scaler.step(opt)
        scaler.update()
    assert [s.step for s in w.sink.steps] == [0, 2] and w.step == 4
    assert len(cap.steps) == 4
    for grads in cap.steps:
        assert math.sqrt(sum(g.double().norm().item() ** 2 for g in grads.values())) <= 1e-3 + 1e-8
    w.close()


def test_interval_env_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWATCH_INTERVAL_STEPS", "2")
    monkeypatch.setenv("GRADWATCH_RUN", "from-env")
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory")
    _train(m, opt, w, 3)
    assert [s.step for s in w.sink.steps] == [0, 2] and w.sink.run.name == "from-env"
    w.close()
    w = watch(m, opt, server="memory", every=1)  # an argument wins over the environment
    _train(m, opt, w, 2)
    assert len(w.sink.steps) == 2
    w.close()


def test_measuring_failure_keeps_the_transforms(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradwatch.agent.record as record

    def broken(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("kernel missing")

    monkeypatch.setattr(record, "layer_moments", broken)
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", transforms=[ClipNorm(1e-3)])
    cap = _Capture(opt, _names(m))
    with pytest.warns(RuntimeWarning, match="measuring gradients failed.*kernel missing"):
        _train(m, opt, w, 3)
    assert w.sink.steps == [] and w.stats()["failures"] == 3
    for grads in cap.steps:  # clipping still happened on every step
        assert math.sqrt(sum(g.double().norm().item() ** 2 for g in grads.values())) <= 1e-3 + 1e-8
    w.close()


class _Mixed(nn.Module):
    """Layers interleaved in fp32/bf16/fp16: torch's grouping reorders them, the record must not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8).to(torch.bfloat16)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 3).to(torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.a(x))
        x = torch.tanh(self.b(x.bfloat16())).float()
        x = torch.tanh(self.c(x))
        return self.d(x.half()).float()


def test_mixed_dtype_layers_keep_their_identity() -> None:
    m = _Mixed()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, server="memory", transforms=[ClipNorm(1e-2)])
    pre = []
    for s in range(2):
        opt.zero_grad()
        x, y = _batch(s)
        nn.functional.cross_entropy(m(x), y).backward()
        pre.append({n: p.grad.detach().clone() for n, p in m.named_parameters()})
        opt.step()
    for rec, grads in zip(w.sink.steps, pre):
        assert [w.sink.layers[i].name for i in rec.layer_ids] == [n for n, _ in m.named_parameters()]
        _assert_matches(rec, grads, w.sink.layers, rel=2e-3)
        assert [w.sink.layers[i].dtype for i in rec.layer_ids][2:4] == ["bfloat16", "bfloat16"]
        for j, lid in enumerate(rec.layer_ids):  # post norms are the clipped grads' norms, in layer order
            name = w.sink.layers[lid].name
            assert rec.layers["l2_post"][j] == pytest.approx(
                dict(m.named_parameters())[name].grad.double().norm().item() if rec.step == 1 else
                rec.layers["l2"][j] * rec.clip_coef, rel=2e-2)
    w.close()


def test_empty_scalar_and_one_element_params() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.empty = nn.Parameter(torch.zeros(0, 4))
            self.scalar = nn.Parameter(torch.tensor(2.0))
            self.one = nn.Parameter(torch.tensor([3.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.scalar * self.one).sum() + self.empty.sum()

    m = Odd()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, foreach=True)
    w = watch(m, opt, server="memory", transforms=[ClipNorm(1.0)], signals_every=1)
    for _ in range(2):
        opt.zero_grad()
        m(torch.ones(3)).backward()
        opt.step()
    rec = w.sink.steps[0]
    cols = {w.sink.layers[i].name: {k: v[j] for k, v in with_derived(rec.layers).items()}
            for j, i in enumerate(rec.layer_ids)}
    assert cols["empty"]["numel"] == 0 and cols["empty"]["mean"] == 0.0 and cols["empty"]["l2"] == 0.0
    assert cols["scalar"] == {"numel": 1, "mean": 9.0, "m2": 0.0, "var": 0.0, "std": 0.0, "l2": 9.0, "maxabs": 9.0,
                              "nonfinite": 0, "wnorm": 2.0, "l2_post": pytest.approx(9.0 / math.hypot(9.0, 6.0), rel=1e-5),
                              "noise_scale": None,  # not measured: no DDP, not asked for
                              # no loss scaler: no headroom/underflow; AdamW's exp_avg exists from step 1 on
                              "zeros": 0, "headroom": None, "underflow": None, "mom_cos": None,
                              # AdamW's first step: |Δw| = lr·wd·w + lr·g/(|g|+eps) = 0.002 + 0.1, over |w| = 2
                              "upd_ratio": pytest.approx(0.102 / 2.0, rel=1e-6)}
    assert cols["one"]["mean"] == 6.0 and cols["one"]["var"] == 0.0
    assert all(math.isfinite(v) for c in cols.values() for v in c.values() if v is not None)
    later = w.sink.steps[1]
    assert [later.layers["mom_cos"][j] for j, i in enumerate(later.layer_ids)
            if w.sink.layers[i].name != "empty"] == [1.0, 1.0]  # the same gradient both steps
    w.close()


def test_agent_config_from_env_precedence_and_errors() -> None:
    from gradwatch.agent.config import DEFAULT_URL, AgentConfig, compile_filter

    c = AgentConfig.from_env({})
    assert (c.server, c.token, c.every, c.disabled, c.ranks) == (DEFAULT_URL, None, 1, False, "zero")
    env = {"GRADWATCH_URL": "http://h:1", "GRADWATCH_TOKEN": "t", "GRADWATCH_PROJECT": "p",
           "GRADWATCH_RUN_ID": "abc", "GRADWATCH_INTERVAL_STEPS": "5", "GRADWATCH_DISABLED": "yes"}
    c = AgentConfig.from_env(env)
    assert (c.server, c.token, c.project, c.run_id, c.every, c.disabled) == ("http://h:1", "t", "p", "abc", 5, True)
    c = AgentConfig.from_env(env, server="memory", project="mine", every=2, run_id="xyz")
    assert (c.server, c.project, c.every, c.run_id) == ("memory", "mine", 2, "xyz")
    with pytest.raises(ValueError, match="GRADWATCH_INTERVAL_STEPS"):
        AgentConfig.from_env({"GRADWATCH_INTERVAL_STEPS": "often"})
    with pytest.raises(ValueError, match="project"):
        AgentConfig(project="")
    f = compile_filter(["enc.*", "head.weight"], lambda n, p: n.endswith("bias"))
    assert [f(n, None) for n in ("enc.w", "enc.bias", "head.weight", "dec.w")] == [True, False, True, False]


def test_transport_options_reach_the_sink_and_unknown_ones_are_refused(tmp_path) -> None:
    import torch

    from gradwatch.agent import watch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="unknown gradwatch transport option"):
        watch(model, opt, server=f"file:{tmp_path / 'a.gwrec'}", transport={"flush_intervall": 1.0})
    with pytest.raises(TypeError, match="transport: expected a dict"):
        watch(model, opt, server=f"file:{tmp_path / 'a.gwrec'}", transport=[("x", 1)])  # type: ignore[arg-type]
    w = watch(model, opt, server=f"file:{tmp_path / 'b.gwrec'}", transport={"flush_interval": 0.05})
    try:
        assert w.sink is not None and w.sink.flush_interval == 0.05  # type: ignore[attr-defined]
    finally:
        w.close()
