"""`nsa-convert`: a thin shell over nsa_convert.convert / load.

`nsa-convert MODEL_DIR OUT_DIR [options]` is short for `nsa-convert convert MODEL_DIR OUT_DIR`.
Errors print one line `error: <file>: <problem>` and exit with the code documented in README.md.
"""

from __future__ import annotations

import sys

from nsa_convert.cli.app import app

COMMANDS = {
    "convert",
    "inspect",
    "batch",
    "verify",
    "--help",
    "-h",
    "--version",
    "--install-completion",
    "--show-completion",
}


def main(argv: list[str] | None = None) -> None:
    """Console entry point; routes `nsa-convert SRC OUT` to the convert command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and args[0] not in app_command_names():
        args.insert(0, "convert")
    app(args=args, prog_name="nsa-convert")


def app_command_names() -> set[str]:
    return {command.name or command.callback.__name__ for command in app.registered_commands}


__all__ = ["app", "main"]
