"""What every bad-input test checks (tests/test_bad_inputs_<domain>.py): the command line fails
with exit 1 and exactly one ``hfmi: error:`` line, no traceback, no "unexpected" error, no
warning on the way; a fresh ``--out`` is left empty or absent and a good folder unchanged."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest

from hfmi_kit.cli import main


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_with_one_line(argv: Sequence[str], capsys: pytest.CaptureFixture[str],
                        caplog: pytest.LogCaptureFixture | None = None) -> str:
    """Run ``hfmi argv`` in-process and return its one error line (asserting everything above)."""
    capsys.readouterr()
    level = caplog.at_level(logging.WARNING) if caplog is not None else None
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        if level is not None:
            with level:
                rc = main(list(argv))
        else:
            rc = main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("hfmi: error: ") and "unexpected" not in line, line
    assert "Traceback" not in err
    if caplog is not None:  # a command-line run prints logged warnings to stderr too: more lines
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    shown = [w for w in warned if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, [str(w.message) for w in shown]  # what Python would print (it hides deprecations)
    return line


def left_nothing(fresh: Path) -> None:
    """A fresh ``--out`` of a failed command is absent or empty."""
    assert not fresh.exists() or not any(fresh.iterdir()), sorted(fresh.rglob("*"))
