"""Write tensors into hub-style safetensors shards, holding at most one shard's worth in memory.

Shards are written under temporary names as they fill, and named `model-0000i-of-0000n.safetensors` only at
`finalize`, once their count is known; the index records every shard's sha256 so a copy can be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from nsa_convert.checkpoint.reader import INDEX_NAME, SINGLE_NAME

ShardCallback = Callable[[Path, int], None]
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_RESERVED_METADATA = ("total_size", "shard_sha256")
_HASH_CHUNK = 1 << 20


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, with its I/O failures turned back into OSError so that a full disk is recognised as such.

    The safetensors library reports them as SafetensorError("... (os error 28) ..."); the errno is in the text.
    """
    try:
        save_file(tensors, os.fspath(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        match = _OS_ERROR.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), os.fspath(path)) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Collects tensors into shards of at most `max_shard_bytes` (a larger tensor gets a shard to itself).

    A tensor handed to `add` is kept by reference until its shard is written: do not modify it in place.
    `on_shard(path, nbytes)` is called after each shard reaches the disk, with its temporary path.
    """

    def __init__(
        self, out_dir: Path, *, max_shard_bytes: int = 5 * 2**30, on_shard: ShardCallback | None = None
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.on_shard = on_shard
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._spans: dict[int, list[tuple[int, int]]] = {}  # storage address → byte spans queued from it
        self._names: set[str] = set()
        self._written: list[tuple[Path, list[str], str]] = []  # temporary path, tensor names, sha256
        self._total_size = 0
        self._finalized = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor; writes the current shard first if this one would not fit in it."""
        if self._finalized:
            raise RuntimeError("ShardWriter.add after finalize")
        if name in self._names:
            raise ValueError(f"tensor '{name}' was already added")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._overlaps_buffer(tensor):
            tensor = tensor.clone()
        self._names.add(name)
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        self._total_size += nbytes

    def _overlaps_buffer(self, tensor: torch.Tensor) -> bool:
        """Whether the tensor shares bytes with one already queued (safetensors refuses to save those).

        Also records its byte span, so the check costs one lookup per tensor sharing its storage.
        """
        if tensor.numel() == 0:
            return False
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        spans = self._spans.setdefault(tensor.untyped_storage().data_ptr(), [])
        if any(begin < other_end and other_begin < end for other_begin, other_end in spans):
            return True
        spans.append((begin, end))
        return False

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._written) + 1:05d}.safetensors.partial"
        _save_shard(self._buffer, path)
        self._written.append((path, list(self._buffer), _sha256(path)))
        self._buffer = {}
        self._buffer_bytes = 0
        self._spans = {}
        if self.on_shard is not None:
            self.on_shard(path, path.stat().st_size)

    def finalize(self, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write what is queued, give the shards their hub names and write the index; returns the index."""
        if self._finalized:
            raise RuntimeError("ShardWriter.finalize called twice")
        extra = dict(extra_metadata or {})
        clash = [key for key in _RESERVED_METADATA if key in extra]
        if clash:
            raise ValueError(f"extra_metadata may not set {', '.join(clash)}: the writer computes them")
        if self._buffer or not self._written:
            self._flush()
        self._finalized = True

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
