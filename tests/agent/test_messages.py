"""gradwatch's warnings print as one readable line (no source echo) and remain real warnings."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from gradwatch.agent import Centralize, TransformError, watch
from gradwatch.agent.transport.base import Sink

_SCRIPT = textwrap.dedent('''
    import torch
    from torch import nn
    from gradwatch.agent import Centralize, GradScaler, ClipNorm, watch
    from gradwatch.agent.transport.base import Sink
    from gradwatch.agent.transport.buffered import WarnOnce

    class Broken(Sink):
        run = None
        def put(self, item): raise OSError("disk full")
        def flush(self, timeout=None): return True
        def close(self, timeout=None, status="finished"): pass
        def stats(self): return {}

    m = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, sink=Broken(), transforms=[Centralize()])
    for s in range(3):
        opt.zero_grad()
        m(torch.randn(8, 1)).square().mean().backward()
        opt.step()
    w.close()
    WarnOnce()("unreachable", "gradwatch: cannot reach the server at http://127.0.0.1:9 (refused)")
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    fused = torch.optim.Adam([p], fused=True)
    sc = GradScaler("cpu", transforms=[ClipNorm(1.0)])
    sc.scale(p.float().sum()).backward()
    sc.step(fused)
''')


def test_each_warning_prints_as_one_line_without_source_echo() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 4, out.stderr  # four warnings, one line each: nothing echoed under them
    assert all(line.startswith("gradwatch:0: ") and "gradwatch" in line.split(": ", 2)[2] for line in lines)
    cats = [line.split(": ")[1] for line in lines]
    assert sorted(cats) == ["RuntimeWarning", "TransportWarning", "UserWarning", "UserWarning"]
    assert not any("warn(" in line or "self." in line for line in lines)


class _Broken(Sink):
    run = None

    def put(self, item):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    def flush(self, timeout=None):  # type: ignore[no-untyped-def]
        return True

    def close(self, timeout=None, status="finished"):  # type: ignore[no-untyped-def]
        pass

    def stats(self):  # type: ignore[no-untyped-def]
        return {}


def _one_step(transforms=()) -> None:  # type: ignore[no-untyped-def]
    m = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = watch(m, opt, sink=_Broken(), transforms=transforms)
    m(torch.randn(8, 1)).square().mean().backward()
    opt.step()
    w.close()


def test_warnings_stay_filterable() -> None:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="gradwatch")
        _one_step([Centralize()])
    assert rec == []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="gradwatch: Centralize")
        with pytest.raises(TransformError) as ei:  # raised inside a transform: the step does not happen
            _one_step([Centralize()])
        assert isinstance(ei.value.__cause__, UserWarning) and "one element per output unit" in str(ei.value)
    with pytest.warns(RuntimeWarning, match="disk full"):
        _one_step()
