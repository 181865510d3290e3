"""Errors a user can act on.  Each carries the file it concerns and the CLI exit code documented in README."""

from __future__ import annotations

from pathlib import Path

MESSAGE_LIMIT = 300


def one_line(error: BaseException | str, limit: int = MESSAGE_LIMIT) -> str:
    """An exception's text (or its type's name) on one line, cut to `limit` characters, for a user message."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class NSAConvertError(Exception):
    """Base class: printed by the CLI as one line, `path: message`, without a traceback."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else Path(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


class UsageError(NSAConvertError):
    """Bad options or arguments (exit 2)."""

    exit_code = 2


class ConfigError(NSAConvertError):
    """config.json is missing, malformed, or describes a model transformers cannot build (exit 3)."""

    exit_code = 3


class CheckpointError(NSAConvertError):
    """Weights are missing, corrupt, unsafe, or disagree with the config (exit 4)."""

    exit_code = 4


class UnsupportedModelError(NSAConvertError):
    """The model has no attention site NSA can take (exit 5)."""

    exit_code = 5


class OutputError(NSAConvertError):
    """OUT_DIR cannot be written: it exists, lies inside the source, or the disk filled (exit 6)."""

    exit_code = 6
