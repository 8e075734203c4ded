"""Hugging Face Trainer end to end into a real server, on a tiny randomly initialised BERT built
from a config (nothing downloaded): statistics of the gradient the optimizer used (unscaled,
accumulated, clipped by HF's max_grad_norm through gradwatch), skipped loss-scaled steps recorded."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

pytestmark = pytest.mark.slow

LR = 0.5
INJECT_MICRO = 5  # with gradient_accumulation_steps=2, micro-batch 5 belongs to optimizer step 2


class Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 50, (48, 12), generator=g)
        self.y = torch.randint(0, 2, (48,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


class Probe(transformers.TrainerCallback):  # type: ignore[misc]
    """The gradient the optimizer applied, read back from the parameter change (plain SGD)."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.used: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.before = [p.detach().clone() for p in model.parameters()]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        d = [((b - p.detach()) / LR).flatten() for b, p in zip(self.before, model.parameters())]
        self.used.append(float(torch.linalg.vector_norm(torch.cat(d))))


@pytest.mark.parametrize("scaled", [True, False], ids=["bf16-autocast+loss-scaler", "fp32"])
def test_hf_trainer_callback_end_to_end(gw: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         scaled: bool) -> None:
    from gradwatch.agent.hf import GradwatchCallback

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    base = gw.serve(f"sqlite:///{tmp_path / 'gw.db'}")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    micro = {"n": 0}

    def inject(g: torch.Tensor) -> torch.Tensor:
        micro["n"] += 1
        if scaled and micro["n"] - 1 == INJECT_MICRO:  # an fp16-style overflow in the scaled gradient
            g = g.clone()
            g.view(-1)[0] = math.inf
        return g

    model.classifier.weight.register_hook(inject)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.5,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=scaled, dataloader_num_workers=0,
        disable_tqdm=True)
    cb = GradwatchCallback(server=base, project="hf", run="tiny-bert")
    probe = Probe()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb, probe])
    if scaled:
        # accelerate refuses fp16 autocast on a CPU; its loss-scaling path (scale, unscale, skip) is
        # the same code on any device, so give it a scaler here: bf16 autocast + loss scaling.
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.train()
    assert args.max_grad_norm == 0.5  # restored

    api = f"{base}/api/v1/runs/{cb.watcher.run_id}"  # type: ignore[union-attr]
    assert gw.get_json(api)["status"] == "finished"
    points = gw.get_json(f"{api}/steps")["points"]
    assert [p["step"] for p in points] == list(range(6)) and len(probe.used) == 6
    for p, used in zip(points, probe.used):
        if p["skipped"]:
            assert used == 0.0
            continue
        assert p["total_norm_post"] == pytest.approx(used, rel=1e-4)
        assert p["total_norm_post"] <= 0.5 + 1e-5
    assert any(p["total_norm"] > 0.6 for p in points if not p["skipped"])  # HF's clip acted ...
    assert gw.get_json(f"{api}/events?kind=clip")["data"]  # ... and was recorded
    layers = {la["name"] for la in gw.get_json(f"{api}/layers")["data"]}
    assert "classifier.weight" in layers and "bert.embeddings.word_embeddings.weight" in layers
    assert "grad_norm" in str(gw.get_json(f"{api}/scalars?key=grad_norm"))  # HF's own logs
    skipped = [p["step"] for p in points if p["skipped"]]
    if scaled:
        assert skipped == [2]
        ev = gw.get_json(f"{api}/events?kind=overflow")["data"]
        assert len(ev) == 1 and ev[0]["step"] == 2 and "classifier.weight" in ev[0]["data"]["layers"]
        assert ev[0]["data"]["scale_before"] == 1024.0 and ev[0]["data"]["scale_after"] == 512.0
        assert points[1]["loss_scale"] == 1024.0 and points[2]["loss_scale"] == 1024.0
        assert points[3]["loss_scale"] == 512.0
    else:
        assert skipped == []
    assert os.environ["HF_HUB_OFFLINE"] == "1"
