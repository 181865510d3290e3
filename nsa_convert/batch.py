"""Convert many checkpoints from one manifest, skipping the outputs that are already up to date.

A manifest (TOML or YAML; schema in README, "Batch conversion and verification") lists sources and outputs
with per-entry options.  Loading it reads no weights and imports no model code, so a bad manifest fails at
once.  An output is up to date when its `nsa` section records the source's fingerprint, the same NSAConfig
and this converter version; a stale one is rebuilt through `convert`'s staged overwrite, so a failed rebuild
leaves the previous output in place.  Each conversion runs in its own worker process with `jobs > 1`.
"""

from __future__ import annotations

import concurrent.futures as cf
import difflib
import glob
import json
import multiprocessing
import os
import queue
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from nsa_convert import __version__
from nsa_convert.config import NSAConfig, parse_size
from nsa_convert.errors import NSAConvertError, OutputError, UsageError

if TYPE_CHECKING:
    from nsa_convert.checkpoint import CheckpointReader

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SCHEMA = "nsa-convert.batch/1"
MANIFEST_SUFFIXES = (".toml", ".yaml", ".yml")
NSA_OPTIONS = tuple(f.name for f in fields(NSAConfig))
OPTIONS = (*NSA_OPTIONS, "max_shard_size", "allow_pickle", "trust_remote_code")
ENTRY_KEYS = ("source", "output", *OPTIONS)
TOP_LEVEL_KEYS = ("defaults", "models")
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Accepted value types per option (ints everywhere else); bool is never taken for a number.
_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "branch_kv": (str,),
    "dtype": (str,),
    "gate_cmp_logit": (int, float),
    "compress_hidden": (int, type(None)),
    "max_shard_size": (str, int),
    "allow_pickle": (bool,),
    "trust_remote_code": (bool,),
}
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}
_GLOB_CHARS = re.compile(r"[*?\[]")

# Entry statuses.  The first three are successes; "skipped" entries were not run because another failed.
CONVERTED, REBUILT, UP_TO_DATE, FAILED, SKIPPED = "converted", "rebuilt", "up-to-date", "failed", "skipped"
STATUSES = (CONVERTED, REBUILT, UP_TO_DATE, FAILED, SKIPPED)


class ManifestError(UsageError):
    """The manifest cannot be read or describes a batch that cannot run (exit 2, before any conversion)."""


@dataclass(frozen=True)
class BatchEntry:
    """One conversion of the batch: a source directory, its output and the options for it."""

    source: Path
    output: Path
    config: NSAConfig
    max_shard_bytes: int
    allow_pickle: bool = False
    trust_remote_code: bool = False
    origin: str = ""  # where in the manifest it comes from, e.g. "models[1]"


@dataclass
class EntryResult:
    """What happened to one entry; sizes are of the weight files, in bytes (None when unknown)."""

    index: int
    source: Path
    output: Path
    status: str = FAILED
    reason: str | None = None
    seconds: float = 0.0
    source_bytes: int | None = None
    output_bytes: int | None = None
    error: str | None = None
    exit_code: int | None = None
    traceback: str | None = None  # for unexpected errors only, shown by the CLI's --debug

    @property
    def ok(self) -> bool:
        return self.status in (CONVERTED, REBUILT, UP_TO_DATE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "source_bytes": self.source_bytes,
            "output_bytes": self.output_bytes,
            "error": self.error,
            "exit_code": self.exit_code,
        }


@dataclass
class BatchReport:
    """Every entry's result, in manifest order."""

    manifest: Path | None
    entries: list[EntryResult]
    seconds: float
    jobs: int
    keep_going: bool

    @property
    def exit_code(self) -> int:
        """0 when every entry was converted or already up to date, else 1."""
        return 0 if all(result.ok for result in self.entries) else 1

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.entries) for status in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "manifest": None if self.manifest is None else str(self.manifest),
            "converter_version": __version__,
            "jobs": self.jobs,
            "keep_going": self.keep_going,
            "seconds": round(self.seconds, 3),
            "counts": {status.replace("-", "_"): n for status, n in self.counts().items()},
            "exit_code": self.exit_code,
            "entries": [result.to_dict() for result in self.entries],
        }


# -- events, for progress displays --------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryStarted:
    """A conversion began: `action` is "convert" (no output yet) or "rebuild" (stale output)."""

    index: int
    action: str
    reason: str


@dataclass(frozen=True)
class ShardProgress:
    """Bytes of the source read so far, and the source shard being read (1-based number)."""

    index: int
    shard: str
    shard_number: int
    shard_count: int
    done: int
    total: int


@dataclass(frozen=True)
class EntryFinished:
    result: EntryResult


BatchEvent = EntryStarted | ShardProgress | EntryFinished
EventCallback = Callable[[BatchEvent], None]


# -- the manifest -------------------------------------------------------------------------------------------


def _read_manifest_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ManifestError(f"a manifest is a {', '.join(MANIFEST_SUFFIXES)} file", path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError("manifest not found", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot read the manifest ({err})", path) from None
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ManifestError(f"not valid TOML ({err})", path) from None
    try:
        import yaml
    except ImportError:
        raise ManifestError("YAML manifests need PyYAML (pip install pyyaml)", path) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ManifestError(f"not valid YAML ({' '.join(str(err).split())})", path) from None


def _unknown_key(key: Any, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key).replace("-", "_"), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
    return f"unknown key '{key}'{hint}"


def _check_options(table: Any, where: str, allowed: tuple[str, ...], path: Path) -> dict[str, Any]:
    """The table's keys are known and each option value has an accepted type."""
    if not isinstance(table, dict):
        raise ManifestError(f"{where} must be a table, got {type(table).__name__}", path)
    for key, value in table.items():
        if key not in allowed:
            raise ManifestError(f"{where}: {_unknown_key(key, allowed)}", path)
        if key not in OPTIONS:
            continue
        types = _OPTION_TYPES.get(key, (int,))
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ManifestError(f"{where}: {key} must be {expected}, got {value!r}", path)
    return table


def _options_to_entry_fields(options: dict[str, Any], where: str, path: Path) -> dict[str, Any]:
    try:
        config = NSAConfig(**{key: options[key] for key in NSA_OPTIONS if key in options})
        shard_bytes = parse_size(options.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
    except ValueError as err:
        raise ManifestError(f"{where}: {err}", path) from None
    return {
        "config": config,
        "max_shard_bytes": shard_bytes,
        "allow_pickle": options.get("allow_pickle", False),
        "trust_remote_code": options.get("trust_remote_code", False),
    }


def _required_path(entry: dict[str, Any], key: str, where: str, path: Path) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: '{key}' must be a non-empty path", path)
    return value


def _resolve(base: Path, text: str) -> Path:
    """A manifest path: relative to the manifest's directory, `~` expanded, `..` folded (links kept)."""
    return Path(os.path.abspath(base / os.path.expanduser(text)))


def _expand_source(base: Path, source: str, output: str, where: str, path: Path) -> list[tuple[Path, Path]]:
    """(source, output) pairs of one entry: one for a plain path, one per matched directory for a glob."""
    if _GLOB_CHARS.search(source):
        if "{name}" not in output:
            raise ManifestError(
                f"{where}: source '{source}' is a glob, so output must contain {{name}}", path
            )
        pattern = str(_resolve(base, source))
        matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if os.path.isdir(m))
        if not matches:
            raise ManifestError(f"{where}: source '{source}' matches no directory", path)
    else:
        matches = [_resolve(base, source)]
        if not matches[0].is_dir():
            raise ManifestError(f"{where}: source '{source}' is not a directory ({matches[0]})", path)
    return [(match, _resolve(base, output.replace("{name}", match.name))) for match in matches]


def load_manifest(path: str | Path) -> list[BatchEntry]:
    """The entries of a manifest, checked and expanded (globs matched, paths resolved), in manifest order.

    Raises ManifestError for anything that would make the batch fail as a whole: an unreadable file, an
    unknown key, a bad option value, a source that is missing or a glob matching nothing, two entries
    writing the same output.
    """
    path = Path(path)
    data = _read_manifest_file(path)
    if not isinstance(data, dict):
        raise ManifestError("the manifest must be a table with a 'models' list", path)
    _check_options(data, "the manifest", TOP_LEVEL_KEYS, path)
    defaults = _check_options(data.get("defaults", {}), "defaults", OPTIONS, path)
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ManifestError("'models' must be a non-empty list of entries", path)

    base = Path(os.path.abspath(path.parent))
    entries: list[BatchEntry] = []
    outputs: dict[Path, str] = {}
    for number, raw in enumerate(models):
        where = f"models[{number}]"
        _check_options(raw, where, ENTRY_KEYS, path)
        source = _required_path(raw, "source", where, path)
        output = _required_path(raw, "output", where, path)
        options = defaults | {key: value for key, value in raw.items() if key in OPTIONS}
        settings = _options_to_entry_fields(options, where, path)
        for source_dir, output_dir in _expand_source(base, source, output, where, path):
            if output_dir in outputs:
                raise ManifestError(
                    f"{where}: output {output_dir} is also written by {outputs[output_dir]}", path
                )
            outputs[output_dir] = where
            entries.append(BatchEntry(source_dir, output_dir, origin=where, **settings))
    return entries


# -- one entry ----------------------------------------------------------------------------------------------


def _shard_bytes(model_dir: Path) -> int:
    from nsa_convert.checkpoint import CheckpointReader

    return sum(shard.stat().st_size for shard in CheckpointReader(model_dir).shards)


def output_state(entry: BatchEntry, fingerprint: str) -> tuple[str, str]:
    """("missing" | "stale" | "up-to-date", why) for the entry's output, given its source's fingerprint.

    An existing directory that nsa-convert did not write is never replaced: OutputError.
    """
    from nsa_convert.checkpoint import CheckpointReader

    output = entry.output
    if not os.path.lexists(output):
        return "missing", "no output yet"
    try:
        section = json.loads((output / "config.json").read_text(encoding="utf-8")).get("nsa")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        section = None
    if not isinstance(section, dict) or section.get("converter") != "nsa-convert":
        raise OutputError(
            "exists and is not an nsa-convert output; batch replaces only its own outputs", output
        )
    if section.get("source_fingerprint") != fingerprint:
        return "stale", "the source's weights changed"
    if section.get("config") != entry.config.to_dict():
        return "stale", "the options changed"
    if section.get("version") != __version__:
        return "stale", f"converted by nsa-convert {section.get('version')}, this is {__version__}"
    try:
        CheckpointReader(output)
    except NSAConvertError as err:
        return "stale", f"the output's weights are damaged ({err.message})"
    return "up-to-date", "same source, options and converter version"


class _ShardTracker:
    """Turns convert's per-tensor callback into ShardProgress events: at each new shard and every 1%."""

    def __init__(self, index: int, reader: CheckpointReader, emit: EventCallback) -> None:
        self.index, self.emit = index, emit
        numbers = {shard: number for number, shard in enumerate(reader.shards, start=1)}
        self.count = len(numbers)
        self.shard_of = {
            name: (numbers[reader.meta(name).shard], reader.meta(name).shard.name) for name in reader.names()
        }
        self.current, self.reported = 0, 0

    def __call__(self, name: str, done: int, total: int) -> None:
        number, shard = self.shard_of.get(name, (self.current, ""))
        if number != self.current or done == total or done - self.reported >= total / 100:
            self.current, self.reported = number, done
            self.emit(ShardProgress(self.index, shard, number, self.count, done, total))


def run_entry(index: int, entry: BatchEntry, emit: EventCallback | None = None) -> EntryResult:
    """Convert (or rebuild, or skip as up to date) one entry; its errors are returned, never raised."""
    from nsa_convert.checkpoint import CheckpointReader

    emit = emit or (lambda event: None)
    start = time.perf_counter()
    result = EntryResult(index, entry.source, entry.output)
    try:
        reader = CheckpointReader(entry.source, allow_pickle=entry.allow_pickle)
        result.source_bytes = sum(shard.stat().st_size for shard in reader.shards)
        state, result.reason = output_state(entry, reader.fingerprint())
        if state == "up-to-date":
            result.status = UP_TO_DATE
            result.output_bytes = _shard_bytes(entry.output)
        else:
            from nsa_convert.api import convert

            emit(EntryStarted(index, "rebuild" if state == "stale" else "convert", result.reason))
            try:
                entry.output.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputError(
                    f"cannot create its parent directory ({err.strerror})", entry.output
                ) from None
            report = convert(
                entry.source,
                entry.output,
                entry.config,
                overwrite=state == "stale",
                allow_pickle=entry.allow_pickle,
                trust_remote_code=entry.trust_remote_code,
                max_shard_bytes=entry.max_shard_bytes,
                progress=_ShardTracker(index, reader, emit),
            )
            result.status = REBUILT if state == "stale" else CONVERTED
            result.output_bytes = report.bytes_written
    except NSAConvertError as err:
        result.error, result.exit_code = str(err), err.exit_code
    except Exception as err:  # one entry's surprise (a transformers bug, say) must not take the batch down
        result.error, result.exit_code = f"unexpected {type(err).__name__}: {err}", 1
        result.traceback = traceback.format_exc()
    result.seconds = time.perf_counter() - start
    return result


# -- the batch ----------------------------------------------------------------------------------------------

_worker_events: Any = None
_worker_busy = False
_worker_stopping = False


def _on_worker_sigterm(signum: int, frame: FrameType | None) -> None:
    """In a worker: interrupt the running conversion (its staged output vanishes) and refuse queued ones."""
    global _worker_stopping
    _worker_stopping = True
    if not _worker_busy:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def _init_worker(events: Any) -> None:
    """Workers leave Ctrl-C to the parent, which stops them with SIGTERM; progress goes through `events`."""
    global _worker_events
    _worker_events = events
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_worker_sigterm)


def _run_in_worker(index: int, entry: BatchEntry) -> EntryResult:
    global _worker_busy
    if _worker_stopping:
        raise KeyboardInterrupt
    _worker_busy = True
    try:
        return run_entry(index, entry, _worker_events.put)
    finally:
        _worker_busy = False


def _skipped(index: int, entry: BatchEntry) -> EntryResult:
    return EntryResult(
        index,
        entry.source,
        entry.output,
        SKIPPED,
        reason="not run: an earlier entry failed (see --keep-going)",
    )


def _run_serial(entries: list[BatchEntry], keep_going: bool, emit: EventCallback) -> list[EntryResult]:
    results = []
    for index, entry in enumerate(entries):
        result = run_entry(index, entry, emit)
        results.append(result)
        emit(EntryFinished(result))
        if not result.ok and not keep_going:
            break
    return results


def _drain(events: Any, emit: EventCallback, finished: set[int]) -> None:
    """Forward queued worker events; progress that arrives after its entry's result is dropped."""
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return
        if event.index not in finished:
            emit(event)


def _run_pool(
    entries: list[BatchEntry], jobs: int, keep_going: bool, emit: EventCallback
) -> list[EntryResult]:
    """Entries on a spawn process pool; events are forwarded from this thread, so `emit` needs no lock."""
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    existing = set(multiprocessing.active_children())
    results: list[EntryResult] = []
    finished: set[int] = set()
    pool = cf.ProcessPoolExecutor(
        max_workers=min(jobs, len(entries)), mp_context=context, initializer=_init_worker, initargs=(events,)
    )
    try:
        futures = {pool.submit(_run_in_worker, index, entry): index for index, entry in enumerate(entries)}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
            _drain(events, emit, finished)
            for future in done:
                if future.cancelled():
                    continue
                index = futures[future]
                try:
                    result = future.result()
                except BrokenProcessPool:
                    entry = entries[index]
                    result = EntryResult(
                        index,
                        entry.source,
                        entry.output,
                        error="its worker process died (out of memory?)",
                        exit_code=1,
                    )
                finished.add(index)
                results.append(result)
                emit(EntryFinished(result))
                if not result.ok and not keep_going:
                    for other in pending:
                        other.cancel()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for child in set(multiprocessing.active_children()) - existing:
            if child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        events.close()
    return results


def run_batch(
    entries: list[BatchEntry],
    *,
    jobs: int = 1,
    keep_going: bool = False,
    on_event: EventCallback | None = None,
    manifest: Path | None = None,
) -> BatchReport:
    """Run every entry, `jobs` at a time in worker processes (jobs=1: in this process).

    Without `keep_going` the first failure stops the batch: entries not yet started are reported as
    skipped, those already running finish.  Interrupting (Ctrl-C, SIGTERM) stops the workers, whose
    staged outputs vanish, and re-raises KeyboardInterrupt.
    """
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}")
    start = time.perf_counter()
    emit = on_event or (lambda event: None)
    if jobs == 1 or len(entries) == 1:
        results = _run_serial(entries, keep_going, emit)
    else:
        results = _run_pool(entries, jobs, keep_going, emit)
    by_index = {result.index: result for result in results}
    ordered = [by_index.get(index) or _skipped(index, entry) for index, entry in enumerate(entries)]
    return BatchReport(manifest, ordered, time.perf_counter() - start, jobs, keep_going)
