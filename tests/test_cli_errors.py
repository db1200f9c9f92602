"""Errors read like errors: one line on the terminal, the full traceback in a file (or raised with --debug)."""

import re
from pathlib import Path

import pytest

from keel import cli
from keel.errors import CheckpointError


def _deep(n: int) -> None:
    if n == 0:
        raise RuntimeError("device lost\nwith a second line of library detail")
    _deep(n - 1)


def test_a_crash_is_one_line_and_a_traceback_file(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv("KEEL_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "goodput", lambda args: _deep(30))
    assert cli.main(["goodput", "somewhere"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "keel: crash: RuntimeError: device lost" and len(err) == 2
    path = Path(re.search(r"traceback is in (\S+);", err[1]).group(1))
    text = path.read_text()
    assert path.parent == tmp_path / "keel-logs" and "Traceback" in text and "in _deep" in text
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "goodput", "somewhere"])


def test_an_error_with_a_library_cause_keeps_its_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    def restore(args):
        try:
            _deep(5)
        except RuntimeError as e:
            raise CheckpointError("checkpoint 60 cannot be restored; resuming from 50") from e

    monkeypatch.setitem(cli.COMMANDS, "goodput", restore)
    assert cli.main(["goodput", "somewhere"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keel: checkpoint error: checkpoint 60 cannot be restored")
    assert "device lost" in Path(re.search(r"traceback: (\S+)\)", err[0]).group(1)).read_text()


def test_a_run_that_cannot_fit_stops_before_anything_is_allocated(tiny_args, capsys):
    from keel.train.events import read_events

    run = Path(next(a.split("=", 1)[1] for a in tiny_args if a.startswith("run_dir=")))
    assert cli.main(["train", "--no-progress", *tiny_args, "model.d_model=1000000", "model.mlp_dim=4000000"]) == 2
    err = capsys.readouterr().err
    assert "the run does not fit: about" in err and "GiB per device predicted" in err and "mesh.fsdp" in err
    kinds = [e["kind"] for e in read_events(run / "events" / "host0000.jsonl")]
    assert "data_prepare" not in kinds and "init" not in kinds and not (run / "checkpoints").exists()
    assert cli.main(["train", "--dry-run", *tiny_args, "model.d_model=1000000", "model.mlp_dim=4000000"]) == 0
    assert "the run does not fit" in capsys.readouterr().out  # --dry-run prints the same estimate
