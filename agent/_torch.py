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

TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if TORCH_VERSION < (2, 4):  # pragma: no cover
    raise ImportError(f"gradwatch needs torch >= 2.4, found {torch.__version__}")

__all__ = ["torch", "Tensor", "TORCH_VERSION"]
