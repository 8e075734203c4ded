"""PyTorch Lightning integration: ``Trainer(callbacks=[GradwatchCallback(project="x")])``.

Install with ``pip install "gradwatch[lightning]"``; importing this module imports ``lightning``
(or, failing that, ``pytorch_lightning``), and nothing else in gradwatch imports this module.

What the optimizer uses is what gets measured:

- Lightning calls ``optimizer.step(closure)`` and runs forward/backward *inside* the step, so an
  optimizer step pre-hook would see the previous step's gradients. Without a loss scaler the
  callback therefore measures and transforms in ``on_before_optimizer_step`` (after backward and
  accumulation, after Lightning's unscale, before the step), and the watcher's own optimizer
  hooks are removed.
- With a loss scaler (``precision="16-mixed"``), Lightning's ``torch.amp.GradScaler`` is replaced
  by gradwatch's drop-in :class:`~gradwatch.agent.GradScaler` (same settings and state), which hands
  each step to the watcher: unscaled statistics, the loss scale, skipped steps and overflow events
  with the layers that held the non-finite values.
- Lightning's gradient clipping (``Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)``)
  is taken over: the same clip (``ClipNorm``, exact to ``clip_grad_norm_``, or ``ClipValue``) runs
  inside gradwatch, where it is applied at the same point and recorded (norm before and after, the
  clip coefficient, ``clip`` events). The trainer's setting is restored when fitting ends.

The callback's hook runs before the LightningModule's own ``on_before_optimizer_step``; gradients
a module changes there are changed after gradwatch measured them.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError:  # the standalone package
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment]
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "gradwatch.agent.lightning needs PyTorch Lightning: pip install \"gradwatch[lightning]\"",
            name="lightning") from None

from .scaler import GradScaler
from .transforms.base import Transform
from .transforms.clip import ClipNorm, ClipValue
from .watcher import Watcher, watch

__all__ = ["GradwatchCallback"]


class GradwatchCallback(Callback):
    """Attach gradwatch to the trainer's (single) optimizer when training starts.

    Args:
        **watch_kwargs: exactly the keyword arguments of :func:`gradwatch.agent.watch`
            (``project``, ``run``, ``server``, ``every``, ``transforms``, ...). The training loss
            (``training_step``'s ``loss``) is logged as the scalar ``loss`` every step.

    Attributes:
        watcher: the :class:`~gradwatch.agent.Watcher` while fitting (None before).
    """

    def __init__(self, **watch_kwargs: Any) -> None:
        super().__init__()
        if "transforms" in watch_kwargs and isinstance(watch_kwargs["transforms"], Transform):
            watch_kwargs["transforms"] = [watch_kwargs["transforms"]]
        self.watch_kwargs = watch_kwargs
        self.watcher: Watcher | None = None
        self._driven = False  # True: this callback measures in on_before_optimizer_step
        self._saved_clip: tuple[Any, Any] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(f"GradwatchCallback: expected one optimizer, the trainer has {len(optimizers)}")
        opt = optimizers[0]
        kwargs = dict(self.watch_kwargs)
        clip = _taken_clip(trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        if clip is not None:
            kwargs["transforms"] = [*kwargs.get("transforms", ()), clip]
            self._saved_clip = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
            trainer.gradient_clip_val = None
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None and not isinstance(scaler, GradScaler):
            plugin.scaler = _gradwatch_scaler(scaler)
        self.watcher = watch(pl_module, opt, **kwargs)
        self._driven = getattr(plugin, "scaler", None) is None
        if self._driven:  # see the module docstring: the pre-hook would fire before the closure
            for h in self.watcher._hooks:
                h.remove()
            self.watcher._hooks = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._driven and self.watcher is not None:
            self.watcher._pre_hook(optimizer, (), {})

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.watcher is not None and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.watcher.log(loss=loss.detach().float())

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, "finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(trainer, "crashed")

    def _finish(self, trainer: Any, status: str) -> None:
        if self._saved_clip is not None:
            trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._saved_clip
            self._saved_clip = None
        if self.watcher is not None:
            self.watcher.close(status=status)


def _taken_clip(value: Any, algorithm: Any) -> Transform | None:
    """gradwatch's transform for Lightning's ``gradient_clip_val``/``gradient_clip_algorithm``."""
    if not value:
        return None
    algo = str(getattr(algorithm, "value", algorithm) or "norm").lower()
    return ClipValue(float(value)) if algo == "value" else ClipNorm(float(value))


def _gradwatch_scaler(torch_scaler: torch.amp.GradScaler) -> GradScaler:
    """gradwatch's GradScaler with ``torch_scaler``'s settings and state."""
    ours = GradScaler(
        torch_scaler._device, init_scale=torch_scaler._init_scale, growth_factor=torch_scaler._growth_factor,
        backoff_factor=torch_scaler._backoff_factor, growth_interval=torch_scaler._growth_interval,
        enabled=torch_scaler.is_enabled())
    if torch_scaler.is_enabled() and torch_scaler._scale is not None:
        ours.load_state_dict(torch_scaler.state_dict())
    return ours
