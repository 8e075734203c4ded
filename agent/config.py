"""The agent's configuration: one small frozen object, resolved once at ``watch()`` time.

Arguments win over environment variables; the environment is read only in :meth:`AgentConfig.from_env`
(never at import), so tests set variables with ``monkeypatch`` and nothing else. Every value is
validated at construction with an error that names the argument, so a typo fails before training
starts rather than at step 10,000.

Environment variables (all optional):

- ``GRADWATCH_URL``: where records go when ``server=None`` (default ``http://127.0.0.1:8000``).
- ``GRADWATCH_TOKEN``: bearer token for the server.
- ``GRADWATCH_DISABLED``: ``1``/``true``/``yes`` turns ``watch()`` into a no-op (hooks are not attached).
- ``GRADWATCH_PROJECT``: default project when ``project`` is left at ``"default"``.
- ``GRADWATCH_RUN``: default run name when ``run`` is not given.
- ``GRADWATCH_RUN_ID``: adopt this run id (e.g. to resume a run from a launcher script).
- ``GRADWATCH_INTERVAL_STEPS``: default recording interval when ``every`` is not given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .wire import validate_run_id

__all__ = ["AgentConfig", "DEFAULT_URL", "env_flag", "compile_filter"]

DEFAULT_URL = "http://127.0.0.1:8000"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def env_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    """A boolean environment variable; anything unrecognised is an error naming the variable."""
    raw = (env if env is not None else os.environ).get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``watch()`` needs besides the model and optimizer.

    Args:
        server: sink target: ``"memory"``, ``"file:PATH"``, ``http(s)://HOST:PORT``.
        token: bearer token passed to network sinks.
        project: project name on the server.
        run: human-readable run name (the server's display name); ``run_id`` is the identity.
        run_id: adopt an existing id (1-64 of ``[A-Za-z0-9_-]``); None: a fresh uuid4 hex.
        every: record statistics every ``every``-th optimizer step (transforms run every step).
        include / exclude: layer filters (what is *measured*); see :func:`compile_filter`.
        ranks: ``"zero"`` (only rank 0 records; every rank still applies transforms) or ``"all"``.
        config / tags: run metadata (JSON-able dict, list of strings).
        disabled: make ``watch()`` a no-op.
        noise_scale: record the gradient noise scale under DDP (``docs/noise_scale.md``): False
            (default: it adds a small all-reduce per recorded step), True (in units of per-rank
            batches) or the per-rank batch size in examples (B_simple in examples); on one
            process with gradient accumulation, the micro-batch size.
        signals_every: measure the costlier per-layer signals (``zeros``, ``underflow``,
            ``mom_cos``, ``upd_ratio``: ``docs/statistics.md``) on every ``signals_every``-th
            recorded step only (default 10: on a gradient-heavy MLP they double the statistics'
            cost, ``bench/RESULTS.md``); 1: every recorded step; 0: never. Steps without them
            hold nulls ("not measured"). The headroom costs nothing and follows every record.
    """

    server: str = DEFAULT_URL
    token: str | None = None
    project: str = "default"
    run: str | None = None
    run_id: str | None = None
    every: int = 1
    include: Any = None
    exclude: Any = None
    ranks: str = "zero"
    config: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    disabled: bool = False
    noise_scale: bool | int = False
    signals_every: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.server, str) or not self.server:
            raise ValueError(f"server: expected a non-empty target string, got {self.server!r}")
        if self.token is not None and not isinstance(self.token, str):
            raise TypeError(f"token: expected a string, got {type(self.token).__name__}")
        if not isinstance(self.project, str) or not self.project or len(self.project) > 512:
            raise ValueError(f"project: expected a non-empty string of at most 512 characters, got {self.project!r}")
        if self.run is not None and (not isinstance(self.run, str) or len(self.run) > 512):
            raise ValueError(f"run: expected a run name (string of at most 512 characters) or None, got {self.run!r}")
        if self.run_id is not None:
            validate_run_id(self.run_id, "run_id")  # the wire's rule (a WireError is a ValueError)
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every: expected a positive integer, got {self.every!r}")
        if self.ranks not in ("zero", "all"):
            raise ValueError(f"ranks: expected 'zero' or 'all', got {self.ranks!r}")
        if not isinstance(self.config, dict):
            raise TypeError(f"config: expected a dict, got {type(self.config).__name__}")
        try:  # checked now: an unencodable config would make every batch of the run undeliverable
            json.dumps(self.config, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"config: must be JSON-serializable (str keys; numbers, strings, lists, dicts): {e}") from None
        if isinstance(self.tags, str) or not all(isinstance(t, str) for t in self.tags):
            raise TypeError(f"tags: expected a sequence of strings, got {self.tags!r}")
        for name in ("include", "exclude"):
            _check_filter(name, getattr(self, name))
        se = self.signals_every
        if isinstance(se, bool) or not isinstance(se, int) or se < 0:
            raise ValueError(f"signals_every: expected 0 (never) or a positive integer, got {se!r}")
        ns = self.noise_scale
        if not isinstance(ns, (bool, int)) or (not isinstance(ns, bool) and ns < 1):
            raise ValueError(f"noise_scale: expected True/False or the per-rank batch size (a positive integer), "
                             f"got {ns!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> AgentConfig:
        """Build a config: keyword arguments that are not None win, then ``GRADWATCH_*``
        variables, then the defaults. Raises ValueError/TypeError naming the bad argument."""
        env = os.environ if env is None else env
        kw = {k: v for k, v in kwargs.items() if v is not None}
        if "server" not in kw:
            kw["server"] = env.get("GRADWATCH_URL") or DEFAULT_URL
        if "token" not in kw and env.get("GRADWATCH_TOKEN"):
            kw["token"] = env["GRADWATCH_TOKEN"]
        if kw.get("project", "default") == "default" and env.get("GRADWATCH_PROJECT"):
            kw["project"] = env["GRADWATCH_PROJECT"]
        if "run_id" not in kw and env.get("GRADWATCH_RUN_ID"):
            kw["run_id"] = env["GRADWATCH_RUN_ID"]
        if "run" not in kw and env.get("GRADWATCH_RUN"):
            kw["run"] = env["GRADWATCH_RUN"]
        if "every" not in kw and env.get("GRADWATCH_INTERVAL_STEPS"):
            raw = env["GRADWATCH_INTERVAL_STEPS"]
            try:
                kw["every"] = int(raw)
            except ValueError:
                raise ValueError(f"GRADWATCH_INTERVAL_STEPS={raw!r}: expected a positive integer") from None
        if "disabled" not in kw:
            kw["disabled"] = env_flag("GRADWATCH_DISABLED", env)
        if "tags" in kw and not isinstance(kw["tags"], str):
            kw["tags"] = tuple(kw["tags"])
        return cls(**kw)


def _check_filter(name: str, f: Any) -> None:
    if f is None or callable(f):
        return
    if isinstance(f, str):
        return
    if isinstance(f, Sequence) and all(isinstance(p, str) for p in f):
        return
    raise TypeError(f"{name}: expected a glob pattern, a list of patterns or a callable(name, param) -> bool, got {f!r}")


def compile_filter(include: Any, exclude: Any) -> Callable[[str, Any], bool]:
    """One predicate ``(name, param) -> measured`` from the include/exclude arguments.

    Patterns are :mod:`fnmatch` globs on parameter names (``"encoder.*"``, ``"*.bias"``); a name
    is measured when it matches some include pattern (all names when ``include`` is None) and no
    exclude pattern. Callables are called once per parameter at attach time, never per step.
    """
    import fnmatch

    def as_pred(f: Any, default: bool) -> Callable[[str, Any], bool]:
        if f is None:
            return lambda n, p: default
        if callable(f):
            return lambda n, p: bool(f(n, p))
        pats = [f] if isinstance(f, str) else list(f)
        return lambda n, p: any(fnmatch.fnmatchcase(n, pat) for pat in pats)

    inc = as_pred(include, True)
    exc = as_pred(exclude, False)
    return lambda n, p: inc(n, p) and not exc(n, p)
