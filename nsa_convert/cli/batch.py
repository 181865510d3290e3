"""`nsa-convert batch MANIFEST`: convert every model a manifest lists, skipping up-to-date outputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.text import Text

from nsa_convert.batch import (
    FAILED,
    SKIPPED,
    UP_TO_DATE,
    BatchEntry,
    BatchEvent,
    BatchReport,
    EntryFinished,
    EntryResult,
    EntryStarted,
    ShardProgress,
    load_manifest,
    run_batch,
)
from nsa_convert.cli.app import INTERRUPTED_EXIT, app, emit_json, run_command, stderr

_STYLES = {FAILED: "red", SKIPPED: "yellow", UP_TO_DATE: "dim"}


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return os.path.relpath(path) if Path.cwd() in path.parents else str(path)
    except ValueError:
        return str(path)


def _megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.1f} MB"


def _result_line(result: EntryResult, count: int) -> str:
    head = f"[{result.index + 1}/{count}] {_shown(result.source)} -> {_shown(result.output)}: {result.status}"
    if result.status == FAILED:
        return f"{head}: {result.error}"
    if result.status == SKIPPED:
        return f"{head} ({result.reason})"
    sizes = f"{_megabytes(result.source_bytes)} -> {_megabytes(result.output_bytes)}"
    return f"{head} in {result.seconds:.1f} s ({sizes}; {result.reason})"


class _PlainView:
    """One line per event on stderr, for logs: entry started, shard started, entry finished."""

    def __init__(self, entries: list[BatchEntry]) -> None:
        self.entries = entries
        self.shard: dict[int, int] = {}

    def _print(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def __call__(self, event: BatchEvent) -> None:
        count = len(self.entries)
        if isinstance(event, EntryStarted):
            entry = self.entries[event.index]
            self._print(
                f"[{event.index + 1}/{count}] {_shown(entry.source)} -> {_shown(entry.output)}: "
                f"{event.action} ({event.reason})"
            )
        elif isinstance(event, ShardProgress):
            if self.shard.get(event.index) != event.shard_number:
                self.shard[event.index] = event.shard_number
                self._print(
                    f"[{event.index + 1}/{count}] reading shard {event.shard_number}/{event.shard_count} "
                    f"{event.shard}"
                )
        elif isinstance(event, EntryFinished):
            self._print(_result_line(event.result, count))


class _RichView:
    """An overall bar over entries and one bar per running conversion, showing the shard being read."""

    def __init__(self, progress: Progress, entries: list[BatchEntry]) -> None:
        self.progress = progress
        self.entries = entries
        self.overall = progress.add_task("entries", total=len(entries), bytes=False)
        self.tasks: dict[int, TaskID] = {}

    def __call__(self, event: BatchEvent) -> None:
        if isinstance(event, EntryStarted):
            name = self.entries[event.index].source.name
            self.tasks[event.index] = self.progress.add_task(
                f"{name}: {event.action}", total=None, bytes=True
            )
        elif isinstance(event, ShardProgress) and event.index in self.tasks:
            name = self.entries[event.index].source.name
            self.progress.update(
                self.tasks[event.index],
                completed=event.done,
                total=event.total,
                description=f"{name}: shard {event.shard_number}/{event.shard_count}",
            )
        elif isinstance(event, EntryFinished):
            result = event.result
            task = self.tasks.pop(result.index, None)
            if task is not None:
                self.progress.remove_task(task)
            style = _STYLES.get(result.status, "green")
            self.progress.console.print(Text(_result_line(result, len(self.entries)), style=style))
            self.progress.advance(self.overall)


class _SizeColumn(DownloadColumn):
    """Bytes for conversion bars, a plain count for the overall bar."""

    def render(self, task):
        if task.fields.get("bytes"):
            return super().render(task)
        return MofNCompleteColumn().render(task)


def _run(entries: list[BatchEntry], manifest: Path, jobs: int, keep_going: bool, rich: bool) -> BatchReport:
    if not rich:
        return run_batch(
            entries, jobs=jobs, keep_going=keep_going, on_event=_PlainView(entries), manifest=manifest
        )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), _SizeColumn(), console=stderr, transient=True
    ) as progress:
        return run_batch(
            entries,
            jobs=jobs,
            keep_going=keep_going,
            on_event=_RichView(progress, entries),
            manifest=manifest,
        )


@app.command()
def batch(
    manifest: Path = typer.Argument(..., help="TOML or YAML manifest (schema in README)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Conversions run in parallel processes."),
    keep_going: bool = typer.Option(
        False, "--keep-going", help="Convert the other entries after one fails (exit 1 at the end)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON report on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Convert every model MANIFEST lists; outputs already up to date are skipped, stale ones rebuilt."""

    def body() -> BatchReport:
        entries = load_manifest(manifest)
        try:
            return _run(entries, manifest, jobs, keep_going, rich=stderr.is_terminal and not json_output)
        except KeyboardInterrupt:
            stderr.print("interrupted: finished outputs are kept, the ones being written were discarded")
            raise typer.Exit(INTERRUPTED_EXIT) from None

    report = run_command(body, debug=debug)
    if debug:
        for result in report.entries:
            if result.traceback:
                stderr.print(result.traceback, highlight=False, markup=False)
    if json_output:
        emit_json(report.to_dict())
    else:
        counts = ", ".join(f"{n} {status}" for status, n in report.counts().items() if n)
        stderr.print(f"batch: {counts} in {report.seconds:.1f} s", highlight=False)
    if report.exit_code:
        raise typer.Exit(report.exit_code)
