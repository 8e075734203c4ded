"""JSON helpers: non-finite floats go out as "NaN"/"Infinity"/"-Infinity", exactly as on the wire."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import Response

from gradwatch.agent.wire import encode_float

_INF = math.inf


def enc(x: float | None) -> float | str | None:
    """Encode one float (fast path for finite values)."""
    if x is None or (x == x and x != _INF and x != -_INF):
        return x
    return encode_float(x)


def enc_nan(x: float | None, is_nan: bool) -> float | str | None:
    """A stored value plus its NaN flag (NaN is stored as NULL + flag)."""
    return "NaN" if is_nan else enc(x)


def enc_value(v: Any) -> Any:
    """Encode every float in a JSON-able structure."""
    t = type(v)
    if t is float:
        return enc(v)
    if t is list or t is tuple:
        return [enc_value(x) for x in v]
    if t is dict:
        return {k: enc_value(x) for k, x in v.items()}
    return v


class FastJSONResponse(Response):
    """JSON response for payloads already encoded with :func:`enc` (strict JSON, no NaN tokens)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()
