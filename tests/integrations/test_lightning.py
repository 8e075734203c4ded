"""Lightning end to end into a real server: statistics of the gradient the optimizer used (unscaled,
accumulated, clipped by Lightning's own setting through gradwatch), AMP skipped steps recorded."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch

pytestmark = pytest.mark.slow

LR = 0.5
INJECT_BATCH = 5  # micro-batch 5 with accumulate_grad_batches=2 belongs to optimizer step 2


class Tiny(L.LightningModule):  # type: ignore[misc]
    def __init__(self, inject: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        self.inject = inject

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y) * 20  # large enough for clipping to act

    def on_after_backward(self) -> None:
        # before Lightning's unscale: exactly where an fp16 overflow would put the inf
        if self.inject and self.trainer.fit_loop.epoch_loop.batch_idx == INJECT_BATCH:
            self.net[0].weight.grad.view(-1)[3] = math.inf

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Probe(L.Callback):  # type: ignore[misc]
    """The gradient the optimizer applied, read back from the parameter change (plain SGD)."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] | None = None
        self.used: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.before is None:
            return
        deltas = [(b - p.detach()) / LR for b, p in zip(self.before, pl_module.parameters())]
        self.used.append(float(torch.linalg.vector_norm(torch.cat([d.flatten() for d in deltas]))))
        self.before = None


@pytest.mark.parametrize("amp", [True, False], ids=["fp16-mixed+scaler", "32-true"])
def test_lightning_callback_end_to_end(gw: Any, tmp_path: Path, amp: bool) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    from gradwatch.agent.lightning import GradwatchCallback

    base = gw.serve(f"sqlite:///{tmp_path / 'gw.db'}")
    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(96, 8), torch.randint(0, 4, (96,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    cb = GradwatchCallback(server=base, project="lightning", run="tiny")
    probe = Probe()
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))] if amp else []
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                        gradient_clip_val=1.0, plugins=plugins, callbacks=[cb, probe])
    trainer.fit(Tiny(inject=amp), loader)
    assert trainer.gradient_clip_val == 1.0  # the trainer's setting is restored

    run_id = cb.watcher.run_id  # type: ignore[union-attr]
    api = f"{base}/api/v1/runs/{run_id}"
    assert gw.get_json(api)["status"] == "finished"
    points = gw.get_json(f"{api}/steps")["points"]
    assert [p["step"] for p in points] == list(range(6))  # 12 micro-batches, accumulated in pairs
    assert len(probe.used) == 6
    for p, used in zip(points, probe.used):
        if p["skipped"]:
            assert used == 0.0  # the scaler skipped the optimizer: nothing moved
            continue
        # what gradwatch recorded after its transforms is what the optimizer applied (unscaled,
        # accumulated over the two micro-batches, clipped to Lightning's gradient_clip_val)
        assert p["total_norm_post"] == pytest.approx(used, rel=1e-4)
        assert p["total_norm_post"] <= 1.0 + 1e-5
    assert any(p["total_norm"] > 1.5 for p in points if not p["skipped"])  # Lightning's clip acted ...
    clips = gw.get_json(f"{api}/events?kind=clip")["data"]
    assert clips and all(c["data"]["max_norm"] == 1.0 for c in clips)  # ... and was recorded
    loss = gw.get_json(f"{api}/scalars?key=loss")
    assert "loss" in str(loss)
    skipped = [p["step"] for p in points if p["skipped"]]
    if amp:
        assert skipped == [2]
        ev = gw.get_json(f"{api}/events?kind=overflow")["data"]
        assert len(ev) == 1 and ev[0]["step"] == 2 and ev[0]["data"]["layers"] == ["net.0.weight"]
        assert points[1]["loss_scale"] == 1024.0 and points[3]["loss_scale"] == 512.0
        assert points[2]["total_norm"] == "Infinity"
    else:
        assert skipped == [] and all(p["loss_scale"] is None for p in points)


def test_importing_the_agent_does_not_import_lightning() -> None:
    import subprocess

    code = ("import sys, gradwatch.agent, gradwatch.agent.watcher; "
            "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules "
            "and 'transformers' not in sys.modules, sorted(sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
