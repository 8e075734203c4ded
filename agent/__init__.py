"""gradwatch's in-process agent: exact gradient control and per-layer statistics for PyTorch.

Importing this package loads neither torch nor any server dependency: public names resolve
lazily on first access, so the server can import :mod:`gradwatch.agent.wire` without torch.

    from gradwatch.agent import watch, GradScaler, ClipNorm
    with watch(model, optimizer, server="file:run.gwrec", transforms=[ClipNorm(1.0)]) as w:
        ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it (Prefect-style lazy API)
_EXPORTS: dict[str, str] = {
    "watch": "watcher",
    "Watcher": "watcher",
    "GradScaler": "scaler",
    "ScalerUsageError": "scaler",
    "Transform": "transforms.base",
    "TransformError": "transforms.base",
    "NonFiniteNormError": "transforms.base",
    "TransformLayoutError": "transforms.base",
    "ClipNorm": "transforms.clip",
    "ClipValue": "transforms.clip",
    "AGC": "transforms.adaptive",
    "ZClip": "transforms.adaptive",
    "AutoClip": "transforms.adaptive",
    "AutoscaledNorm": "transforms.normalize",
    "Centralize": "transforms.normalize",
    "ZScoreNorm": "transforms.normalize",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time names resolve lazily
    from .scaler import GradScaler, ScalerUsageError  # noqa: F401
    from .transforms.adaptive import AGC, AutoClip, ZClip  # noqa: F401
    from .transforms.base import NonFiniteNormError, Transform, TransformError, TransformLayoutError  # noqa: F401
    from .transforms.clip import ClipNorm, ClipValue  # noqa: F401
    from .transforms.normalize import AutoscaledNorm, Centralize, ZScoreNorm  # noqa: F401
    from .watcher import Watcher, watch  # noqa: F401


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'gradwatch.agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
