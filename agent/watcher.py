"""``watch(model, optimizer)``: one line that measures and controls every optimizer step.

The watcher lives at the optimizer, not in the model: it registers a step pre-hook
(``Optimizer.register_step_pre_hook``), so it sees exactly the gradients ``step()`` is about to
use: accumulated over micro-batches, all-reduced by DDP, unscaled by the loss scaler. Nothing is
added to ``forward`` or ``backward``, so a ``torch.compile``-d model gets no graph break.

Failure policy: arguments are validated in :func:`watch` (errors name the argument); after that,
no *monitoring* failure (statistics, packing, transport) raises into the training loop. Each kind
of failure warns once (``RuntimeWarning``) and is counted in :meth:`Watcher.stats`; training
continues (a failed measurement never costs the step its transforms). *Transforms* are control,
not monitoring: a transform that refuses or fails raises a
:class:`~gradwatch.agent.TransformError` out of ``optimizer.step()`` (or ``scaler.step()``)
before the optimizer steps, with the gradients untouched or, after an unexpected mid-edit
failure, discarded (never half-transformed; see :func:`~gradwatch.agent.transforms.base.apply_transforms`).
A user who asked for clipping never silently gets an unclipped step. ``ClipNorm(error_if_nonfinite=True)``'s
error is such a ``TransformError`` (``NonFiniteNormError``, still a ``RuntimeError`` as in torch).
:meth:`Watcher.log` with a value that is not a number (a programming error) raises ``TypeError``.

Loss scaling: ``gradwatch.GradScaler`` hands the step to the watcher itself
(:meth:`Watcher._on_scaler_step`), so skipped steps, the loss scale and overflow events are all
recorded. With torch's own ``torch.amp.GradScaler`` the pre-hook sees unscaled grads (torch
unscales before ``step()``), but a step torch skips never calls ``step()`` and so is invisible;
pass ``scaler=`` to record the loss scale. For fused optimizers torch does not unscale, it sets
``optimizer.grad_scale``/``found_inf``: statistics are divided by the scale on the device, and when
the watcher has transforms it unscales the grads in place first (one foreach multiply) and sets
``grad_scale`` to ones so the fused kernel does not divide twice (a tensor still, as an optimizer
reading ``self.grad_scale`` expects under a scaler).
"""

from __future__ import annotations

import sys
import time as _time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from ._torch import Tensor, torch
from ._warn import warn
from .config import AgentConfig, compile_filter
from .noise import NoiseScale
from .record import LayerRegistry, Recorder, warn_once_factory
from .transforms.adaptive import AGC
from .transforms.base import Transform, TransformError, order_transforms
from .transport import Sink, make_sink
from .wire import _MAX_KEY, EVENT_KINDS, Event, RunInfo, ScalarRecord

__all__ = ["watch", "Watcher", "TRANSFORMS_CONFIG_KEY"]

#: Key of the run config (RunInfo.config) holding each transform's fixed settings, sent once.
TRANSFORMS_CONFIG_KEY = "gradwatch.transforms"

_STATE_VERSION = 1


def watch(
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    *,
    run: str | None = None,
    project: str = "default",
    server: str | None = None,
    every: int | None = None,
    transforms: Iterable[Transform] = (),
    include: Any = None,
    exclude: Any = None,
    ranks: str = "zero",
    config: dict[str, Any] | None = None,
    tags: Sequence[str] = (),
    run_id: str | None = None,
    token: str | None = None,
    scaler: Any = None,
    sink: Sink | Callable[..., Sink] | None = None,
    transport: dict[str, Any] | None = None,
    noise_scale: bool | int = False,
    signals_every: int | None = None,
) -> Watcher:
    """Attach gradwatch to ``optimizer``: statistics once per optimizer step, transforms, streaming.

    Args:
        model: the module whose ``named_parameters()`` name the layers (wrappers such as DDP or
            ``torch.compile`` are fine: their prefixes are stripped). None: layers are named
            ``param{i}`` in optimizer order.
        optimizer: any ``torch.optim.Optimizer`` (foreach, fused, or a subclass).
        run: display name of the run. project: project name.
        server: ``"memory"``, ``"file:PATH"`` or ``http(s)://HOST:PORT``; None reads
            ``GRADWATCH_URL`` (default ``http://127.0.0.1:8000``).
        every: record statistics every ``every``-th step (default ``GRADWATCH_INTERVAL_STEPS`` or 1);
            transforms run on every step regardless.
        transforms: gradient transforms applied to the unscaled grads before each step, sorted
            into the canonical order; conflicting ones raise ValueError here.
        include / exclude: glob patterns on parameter names (``"encoder.*"``) or a
            ``callable(name, param) -> bool``: what is *measured*. Transforms act on all of the
            optimizer's parameters.
        ranks: under torch.distributed, ``"zero"`` records on rank 0 only, ``"all"`` on every
            rank (each record carries its rank). Transforms run on every rank either way.
        config, tags: run metadata. run_id: adopt an id (resume); default a new uuid4, shared by
            all ranks (broadcast from rank 0 when the process group is up).
        token: bearer token (default ``GRADWATCH_TOKEN``).
        scaler: a ``torch.amp.GradScaler`` whose scale to record (gradwatch's own GradScaler
            finds the watcher by itself).
        sink: inject a :class:`Sink`, or a factory ``f(run=, layers=, rank=)`` (tests, custom
            transports); overrides ``server``.
        transport: options for the sink, e.g. ``{"spool_dir": ..., "flush_interval": 0.2,
            "close_timeout": 10.0, "buffer_max": 10_000, "backoff_max": 10.0}``; unknown keys
            raise TypeError here.
        noise_scale: under DistributedDataParallel (pass the DDP-wrapped model), record the
            gradient noise scale B_simple per step and per layer from each rank's local and the
            all-reduced gradient norms (a DDP comm hook; one extra tiny all-reduce per recorded
            step). True: in units of per-rank batches; an int: the per-rank batch size, giving
            B_simple in examples. Off by default. A model that already has a comm hook keeps it
            (one warning, nothing recorded). Without DDP, on one process, the micro-batches of
            gradient accumulation serve as the small batches instead (the int is then the
            micro-batch size; each micro-loss divided by their number). See ``docs/noise_scale.md``.
        signals_every: measure the costlier per-layer signals (zero and underflow counts, the
            gradient-momentum cosine, the relative update) on every ``signals_every``-th recorded
            step (default 10; 1: every recorded step; 0: never); other steps hold nulls for them.

    Returns:
        The :class:`Watcher` (a context manager). With ``GRADWATCH_DISABLED=1`` it is inert.

    Raises:
        ValueError / TypeError: a bad argument (named in the message), an unsupported target, or
        an optimizer that is already watched.

    Starts no thread itself (the network sink does); never synchronizes with the device.

    Example::

        with watch(model, opt, server="file:run.gwrec", transforms=[ClipNorm(1.0)]) as w:
            for x, y in data:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
                w.log(loss=loss)
    """
    if isinstance(tags, str):
        raise TypeError(f"tags: expected a sequence of strings, got the string {tags!r}")
    if server is not None and not isinstance(server, str):
        raise TypeError(f"server: expected a target string or None, got {type(server).__name__}")
    cfg = AgentConfig.from_env(
        server=server, token=token, project=project, run=run, run_id=run_id, every=every, include=include,
        exclude=exclude, ranks=ranks, config=dict(config) if config is not None else None, tags=tuple(tags),
        noise_scale=noise_scale, signals_every=signals_every,
    )
    if transport is not None and not isinstance(transport, dict):
        raise TypeError(f"transport: expected a dict of sink options, got {type(transport).__name__}")
    return Watcher(model, optimizer, cfg, transforms=transforms, scaler=scaler, sink=sink, transport=transport)


def _dist() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def fp16_fused(optimizer: Any) -> bool:
    """True when ``optimizer`` unscales inside a fused kernel and holds fp16 parameters: its
    gradients stay loss-scaled up to the kernel (torch refuses to unscale fp16 grads outside it,
    small values would underflow), so no transform can run on them under a loss scaler."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    return any(p.dtype == torch.float16 for g in optimizer.param_groups for p in g["params"])


def warn_fp16_fused(optimizer: Any, transforms: Sequence[Transform], where: str) -> None:
    """Say at construction (not at the first scaled step) that ``transforms`` will not run."""
    if transforms and fp16_fused(optimizer):
        warn(f"gradwatch: {where}: {type(optimizer).__name__} is fused and holds fp16 parameters, so under a loss "
             f"scaler its gradients stay scaled until its kernel and the transforms "
             f"({', '.join(type(t).__name__ for t in transforms)}) are skipped on every scaled step; use fp32 "
             "master parameters (or a non-fused optimizer) to get them.", UserWarning)


def _exclude_classifier(model: torch.nn.Module | None, transforms: Sequence[Transform]) -> None:
    """docs/transforms.md, AGC: AGC leaves the final classifier alone. For each AGC whose ``exclude``
    was left to its default, exclude the model's last ``nn.Linear`` (once)."""
    if model is None:
        return
    agcs = [t for t in transforms if isinstance(t, AGC) and t.default_exclude]
    if not agcs:
        return
    last = None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    for t in agcs:
        t.default_exclude = False
        if last is not None:
            t.add_exclude([last])


def _combine(scaler_ts: Sequence[Transform], own: Sequence[Transform], what: str) -> list[Transform]:
    """A scaler's transforms with a watcher's (each instance once), in canonical order.

    Raises:
        ValueError: ``what: ...`` when the two lists contradict each other.
    """
    try:
        return order_transforms(list(scaler_ts) + [t for t in own if all(t is not e for e in scaler_ts)])
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


#: The code of torch's ``optimizer.step`` wrapper (``Optimizer.profile_hook_step``), which runs
#: the step hooks: one frame of it per ``step()`` call on the stack.
_STEP_CODE = getattr(torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None), "__code__", None)


def _nested_step(optimizer: torch.optim.Optimizer) -> bool:
    """True when this hook runs in an inner ``step()`` of the same optimizer: a subclass whose
    ``step()`` calls ``super().step()`` goes through torch's hook wrapper twice once both classes'
    ``step`` are patched (any instance of the parent class patches it), so without this one
    step would be measured, transformed and counted twice. Only the outer call counts. Walks
    the stack (a few microseconds); with a torch whose wrapper differs it finds nothing and
    every call counts, as before."""
    f: FrameType | None = sys._getframe(2)
    n = 0
    while f is not None:
        if f.f_code is _STEP_CODE and f.f_locals.get("self") is optimizer:
            n += 1
            if n > 1:
                return True
        f = f.f_back
    return False


class Watcher:
    """The attached monitor of one optimizer; made by :func:`watch`.

    Attributes:
        sink: where records go (None on ranks that do not record, or when disabled).
        transforms: the watcher's own transforms, in canonical order.
        rank: this process's rank (0 without torch.distributed).
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        cfg: AgentConfig,
        *,
        transforms: Iterable[Transform] = (),
        scaler: Any = None,
        sink: Sink | Callable[..., Sink] | None = None,
        transport: dict[str, Any] | None = None,
    ) -> None:
        self._transport = dict(transport or {})
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module or None, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        other = getattr(optimizer, "_gradwatch_watcher", None)
        if other is not None and not other.closed:
            raise ValueError("optimizer: already watched by another Watcher; close() it first")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}")
        if isinstance(transforms, Transform):
            transforms = [transforms]
        self.transforms: list[Transform] = order_transforms(transforms)
        self._model = model
        _exclude_classifier(model, self.transforms)
        scaler_ts = list(getattr(scaler, "_gw_transforms", ()) or ())
        if scaler_ts:
            _combine(scaler_ts, self.transforms, "transforms: conflict with the scaler's transforms")
        if not cfg.disabled:
            warn_fp16_fused(optimizer, self.transforms + scaler_ts, "watch(transforms=...)")
        self.config = cfg
        self.rank, self.world_size = _dist()
        self._optimizer = optimizer
        self._torch_scaler = scaler
        self._step = 0
        self._closed = False
        self._scaler_pending = False
        self._held: Any = None  # a recorded step waiting for its post-step part (optimizer.step's post-hook)
        self._union_cache: tuple[tuple[int, ...], list[Transform]] | None = None
        self._report, self._failures = warn_once_factory()
        self._hooks: list[Any] = []
        self._run_id = cfg.run_id or self._shared_run_id()
        self.enabled = not cfg.disabled
        self.recording = self.enabled and (cfg.ranks == "all" or self.rank == 0)
        self.sink: Sink | None = None
        params = self._params()
        self._registry = LayerRegistry(model, params, compile_filter(cfg.include, cfg.exclude))
        self._recorder = Recorder(self._registry, self._report)
        self._noise: NoiseScale | None = None
        if self.enabled and cfg.noise_scale is not False:
            self._noise = NoiseScale(
                model, lookup=self._registry.lookup, n_layers=lambda: len(self._registry.table()),
                batch_size=None if cfg.noise_scale is True else int(cfg.noise_scale),
                active=lambda: not self._closed and self._step % self.config.every == 0, report=self._report)
        self._started_at = _time.time()
        self._sink_arg = sink
        if self.recording:
            self.sink = self._make_sink(sink)
        if self.enabled:
            # Hidden from dynamo: a user who compiles ``optimizer.step`` gets one clean break at
            # each hook instead of dynamo tracing (and breaking inside) the monitoring code.
            disable = getattr(torch.compiler, "disable", lambda f: f)
            self._hooks = [
                optimizer.register_step_pre_hook(disable(self._pre_hook)),
                optimizer.register_step_post_hook(disable(self._post_hook)),
            ]
            optimizer._gradwatch_watcher = self  # type: ignore[attr-defined]

    # -- setup ---------------------------------------------------------------------------------

    def _shared_run_id(self) -> str:
        rid = uuid.uuid4().hex
        if self.world_size > 1:
            try:  # every rank calls watch(), so this collective is matched
                box = [rid]
                torch.distributed.broadcast_object_list(box, src=0)
                rid = str(box[0])
            except Exception as e:  # noqa: BLE001
                self._report("sharing the run id across ranks", e)
        return rid

    def _run_info(self) -> RunInfo:
        c = self.config
        config = dict(c.config)
        ts = self._all_transforms()
        if ts:  # fixed settings once, here, never per step (a user key of that name wins)
            config.setdefault(TRANSFORMS_CONFIG_KEY, [{"transform": t.name, **t.settings()} for t in ts])
        return RunInfo(run_id=self._run_id, project=c.project, name=c.run, config=config,
                       tags=list(c.tags), started_at=self._started_at, world_size=self.world_size)

    def _all_transforms(self) -> list[Transform]:
        """The watcher's transforms with those of a scaler known at watch() (``scaler=``)."""
        extra = list(getattr(self._torch_scaler, "_gw_transforms", ()) or ())
        return _combine(extra, self.transforms, "transforms") if extra else list(self.transforms)

    def _make_sink(self, sink: Sink | Callable[..., Sink] | None) -> Sink:
        run = self._run_info()
        if isinstance(sink, Sink):
            if getattr(sink, "run", None) is None:
                sink.run = run
            return sink
        if sink is not None:
            return sink(run=run, layers=self._registry.table, rank=self.rank)
        opts: dict[str, Any] = dict(self._transport)
        if self.config.token:
            opts["token"] = self.config.token
        if self.config.run_id is not None:  # an adopted id: the run may already hold batches
            opts.setdefault("resume", True)
        return make_sink(self.config.server, run=run, layers=self._registry.table, rank=self.rank, **opts)

    def _params(self) -> list[Tensor]:
        return [p for g in self._optimizer.param_groups for p in g["params"]]

    # -- properties ----------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run's id (32 hex chars unless adopted); the server uses it as the run's id."""
        return self._run_id

    @property
    def step(self) -> int:
        """Optimizer steps seen so far (the next step's number)."""
        return self._step

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def layers(self) -> list[Any]:
        """The run's layer table (:class:`LayerInfo` of every measured parameter)."""
        return self._registry.table()

    # -- failure policy ------------------------------------------------------------------------

    @contextmanager
    def _guard(self, kind: str) -> Iterator[None]:
        try:
            yield
        except TransformError:
            raise  # control, not monitoring: the optimizer must not step
        except Exception as e:  # noqa: BLE001 - monitoring never raises into training
            self._report(kind, e)

    # -- hooks ---------------------------------------------------------------------------------

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if _nested_step(optimizer):
            return
        if self._scaler_pending:  # gradwatch's GradScaler already handled this step
            self._scaler_pending = False
            return
        step = self._step
        try:
            with self._guard("measuring the optimizer step"):
                self._on_step(optimizer)
        except TransformError:
            self._step = step  # the optimizer does not step: the next attempt is the same step
            raise

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if _nested_step(optimizer):
            return
        self._scaler_pending = False
        held, self._held = self._held, None
        if held is not None:
            with self._guard("measuring the relative update"):
                self._recorder.post_step(held, optimizer)
            self._put(held)

    def _hold_or_put(self, pending: Any) -> None:
        """A record whose post-step part (the relative update) is still to come waits for the
        post-hook of this ``optimizer.step()``; any other goes to the sink now."""
        self._release_held()
        if pending is None or self.sink is None:
            return
        if pending.params:
            self._held = pending
        else:
            self._put(pending)  # a sink failure is reported as one kind whether the record was held or not

    def _release_held(self) -> None:
        """Hand a held record over without its post-step part (the post-hook never came: the
        step raised, or the watcher closes)."""
        held, self._held = self._held, None
        if held is not None:
            held.params = []
            self._put(held)

    def _put(self, pending: Any) -> None:
        if self.sink is not None:
            with self._guard("recording a step"):
                self.sink.put(pending)

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self._step
        self._step += 1
        record = self.recording and step % self.config.every == 0
        self._noise_install()
        if not record and not self.transforms:
            return
        now = _time.time()
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        grad_scale = grad_scale if isinstance(grad_scale, torch.Tensor) else None
        found_inf = found_inf if isinstance(found_inf, torch.Tensor) else None
        loss_scale: Any = grad_scale
        ts = self._torch_scaler
        if loss_scale is None and ts is not None and getattr(ts, "_scale", None) is not None and ts.is_enabled():
            loss_scale = ts._scale
        params = self._params()
        transforms = self.transforms
        if grad_scale is not None and transforms:
            if any(p.grad is not None and p.grad.dtype == torch.float16 for p in params):
                # torch refuses to unscale fp16 grads (small values would underflow), and transforms
                # on scaled grads would use wrong thresholds: leave this step's grads alone.
                self._report("transforms on fp16 gradients of a fused optimizer under torch's GradScaler "
                             "(skipped; use fp32 master parameters)", RuntimeError("fp16 gradients are still scaled"))
                transforms = []
            else:
                self._unscale_(params, grad_scale)
                # the fused kernel must not divide again, and an optimizer reading grad_scale expects a tensor
                optimizer.grad_scale = torch.ones_like(grad_scale)  # type: ignore[attr-defined]
                grad_scale = None
        pending = self._recorder.step(
            params, transforms=transforms, record=record, step=step, time=now, rank=self.rank,
            found_inf=found_inf, loss_scale=loss_scale, grad_scale=grad_scale,
            has_scaler=ts is not None or found_inf is not None, optimizer=optimizer,
            signals=self._signals_step(step),
            noise=self._noise_update(record, loss_scale=loss_scale, found_inf=found_inf,
                                     grads_scaled=grad_scale is not None),
        )
        self._hold_or_put(pending)

    def _signals_step(self, step: int) -> bool:
        """Whether a recorded ``step`` also measures the sampled signals (``signals_every``)."""
        k = self.config.signals_every
        return k > 0 and step % (self.config.every * k) == 0

    def _noise_install(self) -> None:
        """Register the noise-scale comm hook at the first optimizer step (after the user's own
        setup, so a hook they register before training wins). Never raises."""
        if self._noise is not None and not self._noise._tried:
            with self._guard("installing the noise-scale hook"):
                self._noise.install()

    def _noise_update(self, record: bool, **kw: Any) -> Any:
        """This step's noise-scale snapshot for the record (None: not measured). Never raises."""
        if not record or self._noise is None or not self._noise.installed:
            return None
        try:
            return self._noise.update(**kw)
        except Exception as e:  # noqa: BLE001
            self._report("computing the noise scale", e)
            return None

    @staticmethod
    @torch.no_grad()
    def _unscale_(params: list[Tensor], scale: Tensor) -> None:
        by_dev: dict[torch.device, list[Tensor]] = {}
        for p in params:
            if p.grad is not None and not p.grad.is_sparse:
                by_dev.setdefault(p.grad.device, []).append(p.grad)
        for dev, gs in by_dev.items():
            # as torch's GradScaler.unscale_ computes it (double reciprocal), 0-dim for foreach
            inv = scale.reshape(()).to(dev).double().reciprocal().float()
            torch._foreach_mul_(gs, inv)

    # -- the GradScaler interface (gradwatch.agent.scaler) -------------------------------------

    def _check_transforms(self, extra: Iterable[Transform]) -> list[Transform]:
        """Validate the union of ``extra`` (a scaler's transforms) and the watcher's own; raises
        ValueError on conflicts. The scaler calls this at construction."""
        return order_transforms(list(extra) + self.transforms)

    def _union(self, extra: Sequence[Transform]) -> list[Transform]:
        """The scaler's transforms with the watcher's own, in canonical order.

        Raises:
            ValueError: the two lists contradict each other (two normalizers or two global
                clippers). A scaler built without ``watcher=`` meets the watcher only at its
                first step, so this is the earliest the conflict can be seen; running either
                list alone instead would silently train with a configuration nobody asked for.
        """
        if not extra:
            return self.transforms
        key = tuple(id(t) for t in extra)
        if self._union_cache is None or self._union_cache[0] != key:
            union = _combine(extra, self.transforms, "GradScaler(transforms=...) conflicts with watch(transforms=...)")
            _exclude_classifier(self._model, union)
            self._union_cache = (key, union)
        return self._union_cache[1]

    def _on_scaler_step(self, optimizer: torch.optim.Optimizer, *, scaler: Any, skipped: bool,
                        transforms: Sequence[Transform] = ()) -> None:
        """Called by ``gradwatch.GradScaler.step`` after ``unscale_`` and its skip decision, before
        ``optimizer.step()`` (or instead of it when ``skipped``): measures the unscaled grads,
        applies the scaler's and the watcher's transforms (unless skipped), and records the loss
        scale and the skip. The pre-hook of the following ``optimizer.step()`` is then a no-op.
        No host sync.

        Raises:
            TransformError: a transform refused or failed (the scaler does not step then).
            ValueError: the scaler's and the watcher's transforms contradict each other.
        """
        if not self.enabled or self._closed:
            return
        # The next optimizer.step() belongs to this step (fused optimizers are stepped even when
        # skipped; the kernel leaves the parameters alone): its pre-hook must not record again.
        self._scaler_pending = True
        step = self._step
        try:
            union = self._union(list(transforms))  # a contradictory configuration raises, once, here
            with self._guard("measuring the scaled optimizer step"):
                self._step += 1
                record = self.recording and step % self.config.every == 0
                self._noise_install()
                if not record and (not union or skipped):
                    return
                pending = self._recorder.step(
                    self._params(), transforms=union, record=record, step=step, time=_time.time(), rank=self.rank,
                    skip=bool(skipped), loss_scale=getattr(scaler, "_scale", None), has_scaler=True,
                    noise=self._noise_update(record, loss_scale=getattr(scaler, "_scale", None), skipped=bool(skipped)),
                    optimizer=optimizer, signals=self._signals_step(step),
                )
                self._hold_or_put(pending)
        except (TransformError, ValueError):
            self._scaler_pending = False  # no optimizer.step() follows
            self._step = step
            raise

    def _param_name(self, param: Tensor) -> str:
        """The layer name of ``param`` (the scaler names layers in its events with this)."""
        return self._registry.name(param)

    def _on_scaler_event(self, kind: str, data: dict[str, Any]) -> None:
        """An event from the loss scaler (overflow, scale_growth, skipped, manual_scale), filed
        under the most recent optimizer step. Never raises."""
        if not self.recording or self._closed or self.sink is None:
            return
        with self._guard("recording a scaler event"):
            if kind not in EVENT_KINDS:
                raise ValueError(f"unknown event kind {kind!r}")
            self.sink.put(Event(kind=kind, step=max(self._step - 1, 0), time=_time.time(), rank=self.rank,
                                data=dict(data)))

    # -- user API ------------------------------------------------------------------------------

    def log(self, step: int | None = None, **scalars: Any) -> None:
        """Record user scalars (loss, lr, accuracy...) with a step.

        Args:
            step: the optimizer step they belong to; default the most recent optimizer step
                (log after ``optimizer.step()``), 0 before the first.
            **scalars: numbers: int, float, bool, None, numpy scalars, or 1-element tensors.
                Tensors are detached and read on the sink's thread, so ``w.log(loss=loss)``
                does not synchronize a CUDA device.

        Raises:
            TypeError: a value that is not a number (a programming error, raised at the first
                call). Transport problems never raise.
        """
        values: dict[str, Any] = {}
        lazy = False
        for k, v in scalars.items():
            if len(k) > _MAX_KEY:
                raise ValueError(f"log: scalar name {k[:40]!r}... is longer than {_MAX_KEY} characters")
            if isinstance(v, torch.Tensor):
                if v.numel() != 1 or v.is_complex():
                    raise TypeError(f"log: {k} must be a number or a 1-element real tensor, got a tensor of shape "
                                    f"{tuple(v.shape)}")
                values[k] = v.detach().reshape(())
                lazy = True
            elif v is None:
                values[k] = None
            else:
                try:
                    if isinstance(v, (str, bytes)) or isinstance(v, complex):
                        raise TypeError
                    values[k] = float(v)
                except (TypeError, ValueError):
                    raise TypeError(f"log: {k} must be a number, got {type(v).__name__} {v!r:.40}") from None
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise TypeError(f"log: step must be a non-negative int, got {step!r}")
        if not self.recording or self._closed or self.sink is None:
            return
        with self._guard("logging scalars"):
            st = max(self._step - 1, 0) if step is None else step
            now = _time.time()
            if lazy:
                self.sink.put(_ScalarPending(st, now, self.rank, values))
            else:
                self.sink.put(ScalarRecord(step=st, time=now, values=values, rank=self.rank))

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything recorded so far (may wait for the device). True when delivered."""
        if self.sink is None:
            return True
        try:
            return self.sink.flush(timeout)
        except Exception as e:  # noqa: BLE001
            self._report("flushing", e)
            return False

    def close(self, timeout: float | None = None, status: str = "finished") -> None:
        """Detach the hooks, flush within ``timeout`` seconds and mark the run ``status``
        (``finished``/``crashed``). Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._release_held()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._noise is not None:
            self._noise.remove()
        if getattr(self._optimizer, "_gradwatch_watcher", None) is self:
            del self._optimizer._gradwatch_watcher
        if self.sink is not None:
            try:
                self.sink.close(timeout, status)
            except Exception as e:  # noqa: BLE001
                self._report("closing the sink", e)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(status="crashed" if exc_type is not None else "finished")

    def stats(self) -> dict[str, int]:
        """The sink's counters (sent, spooled, dropped, pending) plus ``steps`` and ``failures``."""
        out: dict[str, int] = {}
        if self.sink is not None:
            try:
                out.update(self.sink.stats())
            except Exception as e:  # noqa: BLE001
                self._report("reading sink stats", e)
        out["steps"] = self._step
        out["failures"] = sum(self._failures.values())
        return out

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the same run: run id, step counter, transforms' state."""
        return {
            "version": _STATE_VERSION,
            "run_id": self._run_id,
            "step": self._step,
            "transforms": [[type(t).__name__, t.state_dict()] for t in self.transforms],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: adopt the run id and step counter and restore the transforms' state.

        Call it right after :func:`watch`, before the first step. When the run id changes, the
        sink is re-made for the restored run (the fresh one, with nothing recorded, is closed
        without a status change being sent for the restored run).

        Raises:
            ValueError: a state from a different version or transform list.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"state: expected a gradwatch Watcher state (version {_STATE_VERSION})")
        saved = state.get("transforms", [])
        names = [n for n, _ in saved]
        mine = [type(t).__name__ for t in self.transforms]
        if names != mine:
            raise ValueError(f"state: saved transforms {names} do not match this watcher's {mine}")
        for t, (_, s) in zip(self.transforms, saved):
            t.load_state_dict(s)
        self._step = int(state["step"])
        rid = str(state["run_id"])
        if rid != self._run_id:
            self._run_id = rid
            self.config = _replace(self.config, run_id=rid)
            if self.sink is not None:
                if isinstance(self._sink_arg, Sink):  # an injected instance: point it at the restored run
                    self.sink.run = self._run_info()
                    return
                old, self.sink = self.sink, None
                try:
                    old.close(0.0, "finished")
                except Exception as e:  # noqa: BLE001
                    self._report("closing the replaced sink", e)
                self.sink = self._make_sink(self._sink_arg)

    def __repr__(self) -> str:
        return (f"Watcher(run_id={self._run_id!r}, step={self._step}, rank={self.rank}, "
                f"transforms={self.transforms!r}, recording={self.recording})")


def _replace(cfg: AgentConfig, **kw: Any) -> AgentConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


class _ScalarPending:
    """User scalars that include device tensors: read (``float()``) on the sink's thread."""

    __slots__ = ("step", "time", "rank", "values")

    def __init__(self, step: int, time: float, rank: int, values: dict[str, Any]) -> None:
        self.step, self.time, self.rank, self.values = step, time, rank, values

    def resolve(self) -> list[Any]:  # ScalarRecords; every sink accepts them from resolve()
        vals = {k: (float(v.item()) if isinstance(v, torch.Tensor) else v) for k, v in self.values.items()}
        return [ScalarRecord(step=self.step, time=self.time, values=vals, rank=self.rank)]
