"""Hugging Face ``Trainer`` integration: ``Trainer(..., callbacks=[GradwatchCallback(project="x")])``.

Install with ``pip install "gradwatch[hf]"``; importing this module imports ``transformers``, and
nothing else in gradwatch imports this module.

What the optimizer uses is what gets measured: the watcher hooks the torch optimizer inside
accelerate's ``AcceleratedOptimizer``, so its statistics are those of the accumulated gradient
after accelerate's unscale, right before the step.

- Loss scaling (``fp16=True`` on a GPU): accelerate's ``torch.amp.GradScaler`` skips
  ``optimizer.step()`` on an overflow, which no optimizer hook can see. The callback reads
  accelerate's verdict (``step_was_skipped``) after each step and records the skipped step (with
  the loss scale it ran at) and an ``overflow`` event naming the layers whose gradients were
  non-finite. HF computes the gradient norm before every step, which spreads a single inf into
  NaN in every layer, so on HF the event names every layer that had a gradient.
- HF's gradient clipping (``max_grad_norm``, default 1.0) is taken over: the same clip runs as
  gradwatch's ``ClipNorm`` (exact to ``clip_grad_norm_``) at the same point, recorded (norm before
  and after, coefficient, ``clip`` events); ``args.max_grad_norm`` is restored when training ends.
  HF still logs its ``grad_norm`` (the norm before the clip).
- HF's logs (``loss``, ``grad_norm``, ``learning_rate``, ...) are recorded as scalars.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ModuleNotFoundError:
    raise ModuleNotFoundError("gradwatch.agent.hf needs Hugging Face Transformers: pip install \"gradwatch[hf]\"",
                              name="transformers") from None

from .transforms.base import Transform
from .transforms.clip import ClipNorm
from .watcher import Watcher, watch

__all__ = ["GradwatchCallback"]


class GradwatchCallback(TrainerCallback):
    """Attach gradwatch to the Trainer's optimizer when training begins.

    Args:
        **watch_kwargs: exactly the keyword arguments of :func:`gradwatch.agent.watch`
            (``project``, ``run``, ``server``, ``every``, ``transforms``, ...).

    Attributes:
        watcher: the :class:`~gradwatch.agent.Watcher` while training (None before).
    """

    def __init__(self, **watch_kwargs: Any) -> None:
        if "transforms" in watch_kwargs and isinstance(watch_kwargs["transforms"], Transform):
            watch_kwargs["transforms"] = [watch_kwargs["transforms"]]
        self.watch_kwargs = watch_kwargs
        self.watcher: Watcher | None = None
        self._wrapper: Any = None
        self._saved_max_grad_norm: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if optimizer is None:
            raise ValueError("GradwatchCallback: the Trainer passed no optimizer to on_train_begin")
        inner = optimizer
        while type(inner).__module__.startswith("accelerate"):
            inner = inner.optimizer  # accelerate's AcceleratedOptimizer wraps the torch optimizer
        self._wrapper = optimizer
        watch_kwargs = dict(self.watch_kwargs)
        if args.max_grad_norm and args.max_grad_norm > 0:
            watch_kwargs["transforms"] = [*watch_kwargs.get("transforms", ()), ClipNorm(float(args.max_grad_norm))]
            self._saved_max_grad_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
        scaler = getattr(optimizer, "scaler", None)
        if isinstance(scaler, torch.amp.GradScaler) and "scaler" not in watch_kwargs:
            watch_kwargs["scaler"] = scaler
        self.watcher = watch(model, inner, **watch_kwargs)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        w, wrapper = self.watcher, self._wrapper
        if w is None or not getattr(wrapper, "step_was_skipped", False):
            return
        scaler = getattr(wrapper, "scaler", None)
        if scaler is None or scaler._scale is None:
            return
        # the scale already backed off in update(); the step ran at the scale before it
        after = float(scaler._scale)
        before = after / scaler._backoff_factor
        inner = w._optimizer
        w._on_scaler_step(inner, scaler=SimpleNamespace(_scale=scaler._scale / scaler._backoff_factor), skipped=True)
        w._scaler_pending = False  # torch's scaler never called optimizer.step(): nothing to hand over
        bad = [w._param_name(p) for g in inner.param_groups for p in g["params"]
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        w._on_scaler_event("overflow", {"scale_before": before, "scale_after": after, "layers": bad})
        w._on_scaler_event("skipped", {"optimizer": 0, "layers": bad})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.watcher is None or not logs:
            return
        values: dict[str, Any] = {k: float(v) for k, v in logs.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) and len(k) <= 64
                                  and k != "step"}
        if values:
            self.watcher.log(**values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._saved_max_grad_norm is not None:
            args.max_grad_norm = self._saved_max_grad_norm
            self._saved_max_grad_norm = None
        if self.watcher is not None:
            self.watcher.close()
