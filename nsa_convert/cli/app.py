"""The typer application and the shared error handling of every command."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape

from nsa_convert.checkpoint import install_sigterm_as_interrupt
from nsa_convert.config import NSAConfig
from nsa_convert.errors import NSAConvertError, UsageError, one_line

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Convert dense GQA models into NSA models."
)
stderr = Console(stderr=True)


@app.callback()
def root() -> None:
    """Convert dense GQA models into Native Sparse Attention models (see README.md)."""


INTERRUPTED_EXIT = 130
UNEXPECTED_EXIT = 1
# Exceptions that carry the command line's own control flow (exit codes, usage errors), never bugs.
_CLI_FLOW = (typer.Exit, click.exceptions.Exit, click.ClickException, click.exceptions.Abort)


def fail(message: str, code: int) -> None:
    """Print `error: message` as one line (file names and tensor names are shown as they are) and exit."""
    text = escape(" ".join(message.split()))
    stderr.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_command(body: Callable[[], Any], *, debug: bool) -> Any:
    """Run a command body: user errors become one line and an exit code, tracebacks only with --debug.

    An exception that is not an NSAConvertError is a bug or an environment failure: it is still one line
    (exit 1) naming its type, and --debug shows where it came from.
    """
    try:
        with install_sigterm_as_interrupt():
            return body()
    except NSAConvertError as err:
        if debug:
            raise
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        stderr.print("interrupted: nothing was written")
        raise typer.Exit(INTERRUPTED_EXIT) from None
    except _CLI_FLOW:
        raise
    except Exception as err:
        if debug:
            raise
        fail(
            f"unexpected {type(err).__name__}: {one_line(err)} (--debug shows the traceback)", UNEXPECTED_EXIT
        )


def nsa_config(**options: Any) -> NSAConfig:
    """NSAConfig from command-line options; an invalid combination is a usage error (exit 2)."""
    try:
        return NSAConfig(**options)
    except ValueError as err:
        raise UsageError(str(err)) from None


def emit_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


from nsa_convert.cli import batch, convert, inspect, verify  # noqa: E402,F401  (register the commands)
