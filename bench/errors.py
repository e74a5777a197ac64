"""Errors a user can act on. Each names the file, row or key at fault and what was expected."""
from __future__ import annotations

from pathlib import Path


class BenchError(Exception):
    """Base class: the CLI prints these as one clear message instead of a traceback."""


class DataError(BenchError):
    """Bad or missing dataset input."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 hint: str | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}" + (f", line {line}" if line is not None else "") + ": "
        text = where + message
        if hint:
            text += f" ({hint})"
        super().__init__(text)
        self.path = None if path is None else Path(path)
        self.line = line


SYNTH_HINT = "to try the harness without the real data, run `python -m bench data synth --root DIR`"


class MissingDataError(DataError):
    """A dataset root or one of its official files does not exist."""

    def __init__(self, path: str | Path, expected: str) -> None:
        super().__init__(f"not found; expected {expected}", path=path, hint=SYNTH_HINT)


class CapabilityError(BenchError):
    """A method lacks a capability that a task requires."""


class CheckpointError(BenchError):
    """A checkpoint is missing, unreadable or does not cover the model's keys."""
