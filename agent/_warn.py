"""gradwatch's own warnings: one readable line each, still issued through :mod:`warnings`.

Python prints a warning as ``FILE:LINE: Category: message`` plus the source line found at
``FILE:LINE``. For a warning raised inside gradwatch that echo is gradwatch's own code (or the
user's ``opt.step()``), which reads like a crash. :func:`warn` issues at the location
``gradwatch:0`` instead (line 0 has no source), so the default formatter prints exactly one
line: ``gradwatch:0: RuntimeWarning: gradwatch: ...``. Filters by category, message or
``module="gradwatch"`` apply as for any warning, and so do ``-W error`` and ``pytest.warns``.
"""

from __future__ import annotations

import warnings

__all__ = ["warn"]


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Issue ``message`` (a single line) as a ``category`` warning from module ``gradwatch.agent``."""
    warnings.warn_explicit(" ".join(message.split("\n")), category, "gradwatch", 0, module="gradwatch.agent")
