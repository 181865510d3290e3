"""Build an output directory beside its final place and rename it in, so a failure never leaves half of one."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from nsa_convert.errors import OutputError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _absolute(path: Path) -> Path:
    """The path with its parent's links resolved but not its own name: replacing a link replaces the link."""
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name


def _inside(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_output(target: Path, *, overwrite: bool = False, source: Path | None = None) -> None:
    """Raise OutputError now if `staged_output(target, ...)` would refuse it (to fail before any work)."""
    _check_target(_absolute(Path(target)), overwrite, source)


def _check_target(target: Path, overwrite: bool, source: Path | None) -> None:
    if not target.name:
        raise OutputError("is not a usable output directory", target)
    if os.path.lexists(target) and not overwrite:
        raise OutputError("already exists; pass --overwrite to replace it", target)
    if source is not None:
        source_real = Path(source).resolve()
        for candidate in (target, target.resolve()):
            if _inside(candidate, source_real):
                raise OutputError(f"lies inside the source {source_real}", target)
            if _inside(source_real, candidate):
                raise OutputError(
                    f"contains the source {source_real}, which replacing it would delete", target
                )
    if not target.parent.is_dir():
        raise OutputError(f"parent directory {target.parent} does not exist", target)
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise OutputError(f"parent directory {target.parent} is not writable", target)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory to disk, so the rename never publishes files whose data is still cached."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished directory into place; an existing target is moved aside first and deleted last."""
    if not os.path.lexists(target):
        os.rename(staging, target)
    else:
        aside = target.parent / f".{target.name}.nsa-old-{secrets.token_hex(4)}"
        os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _remove(aside)
    _fsync_dir(target.parent)


@contextmanager
def staged_output(target: Path, *, overwrite: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield an empty directory beside `target`; on success it becomes `target`, on any failure it vanishes.

    The checks come first so that a conversion fails before any work when its output could not be placed:
    `target` exists (without `overwrite`), lies inside `source` or contains it, or its parent is missing or
    read-only.  A full disk (ENOSPC, EDQUOT) is reported as OutputError; every other exception, Ctrl-C
    included, passes through unchanged.  An existing target is untouched unless the new one is complete.
    Once the new directory is complete and flushed, SIGINT and SIGTERM are ignored while it takes the
    target's place and the old one is deleted: the few renames are never cut in the middle.
    """
    target = _absolute(Path(target))
    _check_target(target, overwrite, source)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.nsa-tmp-", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"cannot create a directory beside it: {exc.strerror}", target) from exc
    try:
        yield staging
        _fsync_tree(staging)
    except BaseException as exc:
        _discard(staging, target, exc)
        raise
    # The output is complete: a signal now would leave the old target set aside (or half deleted) beside
    # the new one, so the swap runs with signals ignored and the conversion then ends normally.
    with _signals_held():
        try:
            _publish(staging, target)
        except BaseException as exc:
            _discard(staging, target, exc)
            raise


def _discard(staging: Path, target: Path, exc: BaseException) -> None:
    """Remove the staging directory (a second Ctrl-C does not cut that short); a full disk is OutputError."""
    with _signals_held():
        _remove(staging)
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        raise OutputError(f"disk full while writing ({exc.strerror}); nothing was written", target) from exc


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the block runs (main thread only: elsewhere signals are not set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextmanager
def install_sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the block runs, so a killed conversion still cleans up.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
