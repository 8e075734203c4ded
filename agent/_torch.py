"""The one place the agent imports torch, with a clear error when it is missing."""

from __future__ import annotations

try:
    import torch
    from torch import Tensor
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "gradwatch.agent needs PyTorch for this feature; install your own build "
        "(e.g. `pip install torch`) or `pip install 'gradwatch[torch]'`."
    ) from e

#: The oldest torch the agent supports: the one CI runs its tests on (pyproject's ``torch`` extra
#: declares the same floor; a test keeps the three in step).
MIN_TORCH = (2, 13)
TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if TORCH_VERSION < MIN_TORCH:  # pragma: no cover
    raise ImportError(f"gradwatch needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {torch.__version__}")

__all__ = ["torch", "Tensor", "TORCH_VERSION", "MIN_TORCH"]
