"""Write tensors into hub-style safetensors shards, streaming: the writer holds no tensor data.

The caller declares the tensors it will write (name, shape, dtype, in order) — a conversion knows them from
the source headers before reading any data.  That fixes each shard's members and each tensor's byte
offsets, so a shard's header is written as soon as its first tensor arrives, and every tensor is appended
to the file (and to the shard's sha256) the moment it is added: memory stays at the one tensor the caller
holds, whatever the shard size.  A tensor still in a source file (a `StoredTensor`) is copied file to file
by the kernel while a second thread hashes it, so the bytes of an unchanged tensor never pass through
Python.  The declaration is consumed lazily, one shard at a time: the end of it may be computed while the
first shards are written.  Shards are written under temporary names and named
`model-0000i-of-0000n.safetensors` at `finalize`; the index records every shard's sha256.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nsa_convert.checkpoint.reader import INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME, StoredTensor
from nsa_convert.errors import CheckpointError

ShardCallback = Callable[[Path, int], None]
_RESERVED_METADATA = ("total_size", "shard_sha256")
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_PARALLEL_HASH_BYTES = 1 << 20  # below this, hashing on the writing thread is cheaper than a hand-off
_CHUNK = 16 << 20  # the buffer for hashing stored tensors, and for copying them where the kernel cannot
# copy_file_range errors that mean "not here" (an old kernel, another file system): copy through a buffer.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the writer is told to expect: what its header entry says."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor | StoredTensor) -> TensorSpec:
        if isinstance(tensor, StoredTensor):
            return cls(name, tensor.info.shape, tensor.info.dtype)
        return cls(name, tuple(tensor.shape), tensor.dtype)


def _header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length and the JSON header of a shard holding `specs` in that order (data 8-aligned)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the padding the safetensors library writes
    return struct.pack("<Q", len(raw)) + raw


# The two ways bytes reach a shard file.  Everything the writer writes goes through them.


def _write_all(fd: int, data: memoryview) -> None:
    """Write all of `data` at the file's position."""
    while data:
        data = data[os.write(fd, data) :]


def _copy_range(source: int, offset: int, target: int, nbytes: int) -> int:
    """Copy `nbytes` from `offset` of `source` to the position of `target`; returns how many there were.

    The kernel copies (copy_file_range) where it can; elsewhere the bytes go through a buffer.
    """
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                copied = os.copy_file_range(source, target, nbytes - done, offset + done)
                if copied == 0:
                    return done
                done += copied
            return done
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    buffer = memoryview(bytearray(min(_CHUNK, nbytes - done)))
    while done < nbytes:
        count = os.preadv(source, [buffer[: nbytes - done]], offset + done)
        if count == 0:
            return done
        _write_all(target, buffer[:count])
        done += count
    return done


def _hash_range(sha: Any, source: int, offset: int, nbytes: int) -> None:
    """sha.update with `nbytes` of `source` from `offset` (read again: the copy never left the kernel)."""
    buffer = memoryview(bytearray(min(_CHUNK, nbytes)))
    end = offset + nbytes
    while offset < end:
        count = os.preadv(source, [buffer[: end - offset]], offset)
        if count == 0:
            return  # a short copy is reported by the copying thread
        sha.update(buffer[:count])
        offset += count


class _OpenShard:
    """A shard being written: its file, positioned after the header, and the running sha256 of its bytes.

    Large writes and copies are hashed on the second thread while the first writes them (both release
    the GIL), so the sha256 costs no time while the disk is the bottleneck; each call returns when both
    are done, so the hash sees the bytes in file order.
    """

    def __init__(self, path: Path, header: bytes, hasher: ThreadPoolExecutor) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.sha = hashlib.sha256()
        self.hasher = hasher
        self.write(memoryview(header))

    def write(self, data: memoryview) -> None:
        if len(data) < _PARALLEL_HASH_BYTES:
            _write_all(self.fd, data)
            self.sha.update(data)
            return
        hashed = self.hasher.submit(self.sha.update, data)
        try:
            _write_all(self.fd, data)
        finally:
            hashed.result()

    def copy(self, stored: StoredTensor) -> None:
        source, nbytes = stored.file.fileno(), stored.info.nbytes
        hashed = self.hasher.submit(_hash_range, self.sha, source, stored.offset, nbytes)
        try:
            copied = _copy_range(source, stored.offset, self.fd, nbytes)
        finally:
            hashed.result()
        if copied < nbytes:
            raise CheckpointError(
                f"file is truncated: tensor '{stored.info.name}' ends at byte {stored.offset + nbytes}, "
                f"the file at {stored.offset + copied} (was it changed during the conversion?)",
                stored.info.shard,
            )

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class ShardWriter:
    """Streams the declared tensors into shards of at most `max_shard_bytes` of data.

    `specs` lists every tensor that will be added, in the order it will be added; shards are filled in
    that order (a tensor larger than the limit gets a shard to itself).  It is read one shard ahead of
    the writing, so a generator may compute its end while the first shards are written.  `add` writes
    the tensor's bytes at once and keeps no reference to it.  `on_shard(path, nbytes)` is called when a
    shard is complete on disk, with its temporary path.
    """

    def __init__(
        self,
        out_dir: Path,
        specs: Iterable[TensorSpec],
        *,
        max_shard_bytes: int = 5 * 2**30,
        on_shard: ShardCallback | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.on_shard = on_shard
        self._specs: Iterator[TensorSpec] = iter(specs)
        self._lookahead: TensorSpec | None = None
        self._declared: set[str] = set()
        self._total_size = 0
        self._members: list[TensorSpec] = []  # the shard being written
        self._added = 0  # how many of its members were added
        self._open: _OpenShard | None = None
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._written: list[tuple[Path, list[str], str]] = []  # temporary path, tensor names, sha256
        self._finalized = False

    def _peek(self) -> TensorSpec | None:
        """The next declared tensor, checked, without taking it."""
        if self._lookahead is None:
            spec = next(self._specs, None)
            if spec is not None:
                if spec.name in self._declared:
                    raise ValueError(f"tensor '{spec.name}' is declared twice")
                if spec.dtype not in _DTYPE_NAMES:
                    raise ValueError(f"tensor '{spec.name}': safetensors cannot store {spec.dtype}")
                self._declared.add(spec.name)
                self._total_size += spec.nbytes
            self._lookahead = spec
        return self._lookahead

    def _next_members(self) -> list[TensorSpec]:
        """The declared tensors of the next shard (empty when every declared tensor was written)."""
        members, size = [], 0
        while (spec := self._peek()) is not None and not (
            members and size + spec.nbytes > self.max_shard_bytes
        ):
            members.append(spec)
            size += spec.nbytes
            self._lookahead = None
        return members

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        """Write the next declared tensor (a StoredTensor is copied from its file); it must match its spec."""
        if self._finalized:
            raise RuntimeError("ShardWriter.add after finalize")
        if self._added == len(self._members):  # the previous shard is complete (or none was begun)
            self._members, self._added = self._next_members(), 0
            if not self._members:
                raise ValueError(f"tensor '{name}' was not declared (every declared tensor was added)")
        spec = self._members[self._added]
        got = TensorSpec.of(name, tensor)
        if name != spec.name:
            raise ValueError(f"expected tensor '{spec.name}' next, got '{name}'")
        if got != spec:
            raise ValueError(
                f"tensor '{name}' is {got.dtype}{list(got.shape)}, declared {spec.dtype}{list(spec.shape)}"
            )
        try:
            if self._open is None:
                self._start_shard()
            if isinstance(tensor, StoredTensor):
                self._open.copy(tensor)
            elif spec.nbytes:
                data = tensor.detach().to("cpu").contiguous()
                self._open.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()).cast("B"))
                del data
            self._added += 1
            if self._added == len(self._members):
                self._finish_shard()
        except BaseException:
            self._abandon()
            raise

    def _start_shard(self) -> None:
        path = self.out_dir / f".shard-{len(self._written) + 1:05d}.safetensors.partial"
        self._open = _OpenShard(path, _header(self._members), self._hasher)

    def _finish_shard(self) -> None:
        done, self._open = self._open, None
        done.close()
        self._written.append((done.path, [spec.name for spec in self._members], done.sha.hexdigest()))
        if self.on_shard is not None:
            self.on_shard(done.path, done.path.stat().st_size)

    def _abandon(self) -> None:
        """Close the shard being written after a failure (its file is the caller's to remove)."""
        self._hasher.shutdown(wait=False)
        if self._open is not None:
            with contextlib.suppress(OSError):
                self._open.close()
            self._open = None

    def finalize(self, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Give the shards their hub names and write the index; returns the index."""
        if self._finalized:
            raise RuntimeError("ShardWriter.finalize called twice")
        extra = dict(extra_metadata or {})
        clash = [key for key in _RESERVED_METADATA if key in extra]
        if clash:
            raise ValueError(f"extra_metadata may not set {', '.join(clash)}: the writer computes them")
        pending = self._members[self._added] if self._added < len(self._members) else self._peek()
        if pending is not None:
            raise ValueError(f"not every declared tensor was added: '{pending.name}' is next")
        if not self._written:  # nothing declared: one empty shard, as the safetensors library writes
            self._members = []
            self._start_shard()
            self._finish_shard()
        self._finalized = True
        self._hasher.shutdown()

        count = len(self._written)
        weight_map: dict[str, str] = {}
        hashes: dict[str, str] = {}
        for number, (path, names, sha) in enumerate(self._written, start=1):
            final = SINGLE_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / final)
            hashes[final] = sha
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": self._total_size, "shard_sha256": hashes, **extra},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return index
