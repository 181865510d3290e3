"""Write tensors into hub-style safetensors shards, streaming: the writer holds no tensor data at all.

The caller declares up front every tensor it will write (name, shape, dtype, in order) — a conversion
knows them all from the source headers before reading any data.  That fixes each shard's members and each
tensor's byte offsets, so a shard's header is written as soon as its first tensor arrives and every tensor
is appended to the file (and to the shard's sha256) the moment it is added: memory stays at the one tensor
the caller holds, whatever the shard size.  Shards are written under temporary names and named
`model-0000i-of-0000n.safetensors` at `finalize`; the index records every shard's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from nsa_convert.checkpoint.reader import INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME

ShardCallback = Callable[[Path, int], None]
_RESERVED_METADATA = ("total_size", "shard_sha256")
_PARALLEL_HASH_BYTES = 1 << 20
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


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
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
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


class _OpenShard:
    """A shard being written: its file, positioned after the header, and the running sha256 of its bytes.

    Large writes are hashed on a second thread while the first writes them (both release the GIL), so
    the sha256 costs no time when the disk is the bottleneck; `write` returns when both are done.
    """

    def __init__(self, path: Path, file: BinaryIO, header: bytes, hasher: ThreadPoolExecutor) -> None:
        self.path = path
        self.file = file
        self.sha = hashlib.sha256()
        self.hasher = hasher
        self.write(header)

    def write(self, data: Any) -> None:
        if len(data) < _PARALLEL_HASH_BYTES:
            self.file.write(data)
            self.sha.update(data)
            return
        hashed = self.hasher.submit(self.sha.update, data)
        try:
            self.file.write(data)
        finally:
            hashed.result()


class ShardWriter:
    """Streams the declared tensors into shards of at most `max_shard_bytes` of data.

    `specs` lists every tensor that will be added, in the order it will be added; shards are filled in
    that order (a tensor larger than the limit gets a shard to itself).  `add` writes the tensor's bytes at
    once and keeps no reference to it.  `on_shard(path, nbytes)` is called when a shard is complete on
    disk, with its temporary path.
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
        self.on_shard = on_shard
        self._groups: list[list[TensorSpec]] = [[]]  # the members of each shard, in order
        names: set[str] = set()
        size = 0
        for spec in specs:
            if spec.name in names:
                raise ValueError(f"tensor '{spec.name}' is declared twice")
            if spec.dtype not in _DTYPE_NAMES:
                raise ValueError(f"tensor '{spec.name}': safetensors cannot store {spec.dtype}")
            names.add(spec.name)
            if self._groups[-1] and size + spec.nbytes > max_shard_bytes:
                self._groups.append([])
                size = 0
            self._groups[-1].append(spec)
            size += spec.nbytes
        self._total_size = sum(spec.nbytes for group in self._groups for spec in group)
        self._position = (0, 0)  # (shard, member) of the next tensor
        self._open: _OpenShard | None = None
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._written: list[tuple[Path, list[str], str]] = []  # temporary path, tensor names, sha256
        self._finalized = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor; its name, shape and dtype must be the declared ones."""
        if self._finalized:
            raise RuntimeError("ShardWriter.add after finalize")
        shard, member = self._position
        if shard == len(self._groups) or not self._groups[shard]:
            raise ValueError(f"tensor '{name}' was not declared (every declared tensor was added)")
        spec = self._groups[shard][member]
        if name != spec.name:
            raise ValueError(f"expected tensor '{spec.name}' next, got '{name}'")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor '{name}' is {tensor.dtype}{list(tensor.shape)}, "
                f"declared {spec.dtype}{list(spec.shape)}"
            )
        try:
            if self._open is None:
                self._start_shard(shard)
            if spec.nbytes:
                data = tensor.detach().to("cpu").contiguous()
                self._open.write(data.reshape(-1).view(torch.uint8).numpy().data)
                del data
            if member + 1 == len(self._groups[shard]):
                self._finish_shard()
                self._position = (shard + 1, 0)
            else:
                self._position = (shard, member + 1)
        except BaseException:
            self._abandon()
            raise

    def _open_file(self, path: Path) -> BinaryIO:
        return path.open("xb")

    def _start_shard(self, shard: int) -> None:
        path = self.out_dir / f".shard-{shard + 1:05d}.safetensors.partial"
        self._open = _OpenShard(path, self._open_file(path), _header(self._groups[shard]), self._hasher)

    def _finish_shard(self) -> None:
        done, self._open = self._open, None
        done.file.close()
        shard = len(self._written)
        self._written.append((done.path, [spec.name for spec in self._groups[shard]], done.sha.hexdigest()))
        if self.on_shard is not None:
            self.on_shard(done.path, done.path.stat().st_size)

    def _abandon(self) -> None:
        """Close the shard being written after a failure (its file is the caller's to remove)."""
        self._hasher.shutdown(wait=False)
        if self._open is not None:
            with contextlib.suppress(OSError):  # flushing a failed write fails again; the file closes anyway
                self._open.file.close()
            self._open = None

    def finalize(self, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Give the shards their hub names and write the index; returns the index."""
        if self._finalized:
            raise RuntimeError("ShardWriter.finalize called twice")
        extra = dict(extra_metadata or {})
        clash = [key for key in _RESERVED_METADATA if key in extra]
        if clash:
            raise ValueError(f"extra_metadata may not set {', '.join(clash)}: the writer computes them")
        shard, member = self._position
        if shard < len(self._groups) and self._groups[shard]:
            missing = self._groups[shard][member].name
            raise ValueError(f"not every declared tensor was added: '{missing}' is next")
        if not self._written:  # nothing declared: one empty shard, as the safetensors library writes
            self._start_shard(0)
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
