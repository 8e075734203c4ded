"""The file sink's end-of-run line says what reached the disk: no "recorded to" (nor an upload
hint) for a file that could not be written."""

from __future__ import annotations

import warnings

import torch

from gradwatch.agent import watch


def _one_step(target: str) -> dict[str, int]:
    m = torch.nn.Linear(2, 2)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sink's own write warning
        w = watch(m, o, server=target)
        m(torch.randn(3, 2)).sum().backward()
        o.step()
        w.close()
    return w.stats()


def test_unwritable_path_is_not_reported_as_recorded(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")  # a regular file where a directory should be: unwritable even as root
    path = blocker / "dir" / "x.gwrec"
    st = _one_step(f"file:{path}")
    err = capsys.readouterr().err
    assert st["written"] == 0 and st["lost"] >= 1
    assert "recorded to" not in err and "gradwatch upload" not in err, err
    assert f"nothing was written to {path} ({path} does not exist)" in err, err
    assert "lost to failed writes (1 ENOTDIR)" in err, err
    assert not path.exists()


def test_written_file_is_reported_with_its_records(tmp_path, capsys):
    path = tmp_path / "sub" / "x.gwrec"
    st = _one_step(f"file:{path}")
    err = capsys.readouterr().err
    assert st["written"] == 1 and path.stat().st_size > 0
    assert f"recorded to {path} (1 records in" in err and "gradwatch upload" in err, err
