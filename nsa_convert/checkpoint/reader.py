"""Lazy, validating access to a checkpoint's weights: headers are checked up front, tensors load one at a time.

Everything a conversion needs to decide (names, shapes, dtypes, sizes) comes from the safetensors headers,
parsed here by hand so that a hostile or damaged file is refused with a clear message before any tensor is
touched.  Tensor data is read only on `get` / `iter_tensors`, one tensor at a time, with plain reads into
the tensor's own memory at the offsets the header gives: nothing is memory-mapped, so the process holds
exactly the tensors its caller keeps alive (a mapped shard would count its touched pages as resident).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from nsa_convert.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The limit the safetensors library itself enforces: a larger header is a damaged or hostile file.
MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; `nbytes` is its size on disk and once loaded."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: Path
    nbytes: int


@dataclass(frozen=True)
class StoredTensor:
    """A tensor left in its safetensors file: where its bytes lie, so that a copy need not load it.

    `file` is the shard, open for reading while `CheckpointReader.iter_stored` is on this tensor's shard.
    """

    info: TensorInfo
    file: Any
    offset: int

    def load(self) -> torch.Tensor:
        return _read_tensor(self.file, self.info, self.offset)


@dataclass(frozen=True)
class _Shard:
    path: Path
    relative: str
    size: int
    header: bytes  # the 8 length bytes and the JSON header, as on disk (for the fingerprint)
    names: tuple[str, ...]  # in data-offset order, so iteration reads the file front to back
    metadata: dict[str, str]
    offsets: dict[str, int]  # tensor name → where its data begins in the file (safetensors only)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(path: Path, relative: str) -> tuple[_Shard, dict[str, TensorInfo]]:
    """Read and check a safetensors header without touching the tensor data."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 8:
                raise CheckpointError(
                    f"not a safetensors file: only {size} bytes, shorter than the 8-byte header length", path
                )
            prefix = file.read(8)
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit", path
                )
            if 8 + length > size:
                raise CheckpointError(f"header length {length} is larger than the file ({size} bytes)", path)
            raw = file.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", path) from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"header is not valid JSON ({exc})", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", path)

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("header __metadata__ is not a string-to-string map", path)

    data_bytes = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"header entry '{name}' lacks dtype, shape or data_offsets", path)
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"tensor '{name}' has unsupported dtype {entry['dtype']!r}", path)
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"tensor '{name}' has an invalid shape {shape!r}", path)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"tensor '{name}' has invalid data_offsets {offsets!r}", path)
        begin, end = offsets
        if begin < 0 or end < begin:
            raise CheckpointError(f"tensor '{name}' has data_offsets {offsets} out of range", path)
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"tensor '{name}' spans {end - begin} bytes but {entry['dtype']}{shape} needs {nbytes}", path
            )
        infos[name] = TensorInfo(name, tuple(shape), dtype, path, nbytes)
        spans.append((begin, end, name))

    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"tensor '{name}' {problem} (data_offsets [{begin}, {end}])", path)
        position = end
    if position > data_bytes:
        raise CheckpointError(
            f"file is truncated: the header describes {position} bytes of tensor data but only {data_bytes} follow",
            path,
        )
    if position < data_bytes:
        raise CheckpointError(f"{data_bytes - position} unexpected bytes follow the last tensor", path)

    names = tuple(name for _, _, name in spans)
    offsets = {name: 8 + length + begin for begin, _, name in spans}
    return _Shard(path, relative, size, prefix + raw, names, metadata, offsets), infos


def _read_tensor(file: Any, info: TensorInfo, offset: int) -> torch.Tensor:
    """The tensor at `offset` of an open safetensors file, read straight into a new CPU tensor.

    safetensors data is little-endian, as is every host torch supports.
    """
    tensor = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes == 0:
        return tensor
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
    file.seek(offset)
    done = 0
    while done < info.nbytes:
        count = file.readinto(view[done:])
        if not count:
            raise CheckpointError(
                f"file is truncated: tensor '{info.name}' ends at byte {offset + info.nbytes}, the file at "
                f"{offset + done} (was it changed during the conversion?)",
                info.shard,
            )
        done += count
    return tensor


class CheckpointReader:
    """The weights of a Hugging Face model directory, validated at construction and loaded on demand.

    Weights are found in this order: `model.safetensors.index.json`, `model.safetensors`, every
    `*.safetensors` in the directory, and only with `allow_pickle` the pickle files `pytorch_model*.bin`
    (else `*.pt`), which are loaded with `weights_only=True` and memory-mapped.
    """

    def __init__(self, model_dir: Path, *, allow_pickle: bool = False) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError("model directory does not exist", self.model_dir)
        self._roots = self._allowed_roots()
        self._infos: dict[str, TensorInfo] = {}
        self._shards: list[_Shard] = []
        self._index_metadata: dict[str, Any] | None = None
        self._pickle = False

        index_path = self.model_dir / INDEX_NAME
        if index_path.exists():
            self._read_index(index_path)
        elif (self.model_dir / SINGLE_NAME).exists():
            self._read_safetensors([SINGLE_NAME])
        else:
            found = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
            if found:
                self._read_safetensors(found)
            else:
                self._read_pickles(allow_pickle)

    # -- discovery -------------------------------------------------------------------------------------------

    def _allowed_roots(self) -> list[Path]:
        """Where a shard may resolve to: the directory, and the blob store of a Hugging Face cache snapshot."""
        root = self.model_dir.resolve()
        roots = [root]
        blobs = root.parent.parent / "blobs"
        if root.parent.name == "snapshots" and blobs.is_dir():
            roots.append(blobs)
        return roots

    def _inside(self, path: Path) -> bool:
        resolved = path.resolve()
        return any(resolved.is_relative_to(root) for root in self._roots)

    def local_file(self, name: str) -> Path | None:
        """A file directly in the model directory (e.g. `tokenizer.json`), None if absent.

        Like a shard, it may be a link only within the directory (or into a Hugging Face cache's blobs).
        """
        path = self.model_dir / name
        if PurePosixPath(name).name != name or not os.path.lexists(path):
            return None
        if not self._inside(path):
            raise CheckpointError(f"is a link to {path.resolve()}, outside the model directory", path)
        return path if path.is_file() else None

    def _shard_path(self, relative: Any, origin: Path) -> Path:
        """A shard name as a path, refused if it could reach outside the model directory."""
        if not isinstance(relative, str) or not relative:
            raise CheckpointError(f"shard name {relative!r} is not a file name", origin)
        posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
        if posix.is_absolute() or windows.is_absolute() or windows.drive:
            raise CheckpointError(f"shard name '{relative}' is an absolute path", origin)
        if ".." in posix.parts or ".." in windows.parts:
            raise CheckpointError(f"shard name '{relative}' leaves the model directory", origin)
        path = self.model_dir / relative
        if not path.exists():
            raise CheckpointError(f"shard '{relative}' does not exist", origin)
        if not self._inside(path):
            raise CheckpointError(
                f"shard '{relative}' is a link to {path.resolve()}, outside the model directory", origin
            )
        if not path.resolve().is_file():
            raise CheckpointError(f"shard '{relative}' is not a regular file", origin)
        return path

    def _read_index(self, index_path: Path) -> None:
        try:
            index = json.loads(
                index_path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicate_keys
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"index is not valid JSON ({exc})", index_path) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("index has no weight_map", index_path)
        metadata = index.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise CheckpointError("index metadata is not a JSON object", index_path)
        self._index_metadata = metadata
        names = sorted(set(weight_map.values()), key=str)
        for name in names:
            self._shard_path(name, index_path)
        self._read_safetensors(names)

        held = {name: info.shard.relative_to(self.model_dir).as_posix() for name, info in self._infos.items()}
        indexed = {name: PurePosixPath(shard).as_posix() for name, shard in weight_map.items()}
        if held != indexed:
            problems = [f"'{n}' is not in any shard" for n in sorted(indexed.keys() - held.keys())]
            problems += [
                f"'{n}' in {held[n]} is not in the index" for n in sorted(held.keys() - indexed.keys())
            ]
            problems += [
                f"'{n}' is in {held[n]}, not {indexed[n]}"
                for n in sorted(held.keys() & indexed.keys())
                if held[n] != indexed[n]
            ]
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointError(
                f"weight_map disagrees with the shard headers: {'; '.join(problems[:3])}{more}", index_path
            )

    def _read_safetensors(self, relatives: list[str]) -> None:
        for relative in relatives:
            path = self._shard_path(relative, self.model_dir)
            shard, infos = _parse_header(path, PurePosixPath(relative).as_posix())
            for name, info in infos.items():
                if name in self._infos:
                    other = self._infos[name].shard.name
                    raise CheckpointError(f"tensor '{name}' is also in {other}", path)
                self._infos[name] = info
            self._shards.append(shard)

    def _read_pickles(self, allow_pickle: bool) -> None:
        relatives = sorted(p.name for p in self.model_dir.glob("pytorch_model*.bin"))
        relatives = relatives or sorted(p.name for p in self.model_dir.glob("*.pt"))
        if not relatives:
            raise CheckpointError(
                f"no weights found: expected {INDEX_NAME}, {SINGLE_NAME} or *.safetensors", self.model_dir
            )
        if not allow_pickle:
            raise CheckpointError(
                f"only pickle weights ({', '.join(relatives)}); pickle can run code when loaded: "
                "convert them to safetensors, or pass --allow-pickle if you trust their source",
                self.model_dir,
            )
        self._pickle = True
        for relative in relatives:
            path = self._shard_path(relative, self.model_dir)
            state = self._load_pickle(path)
            with zipfile.ZipFile(path) as archive:
                directory = [(i.filename, i.CRC, i.file_size) for i in archive.infolist()]
            names = []
            for name, tensor in state.items():
                if name in self._infos:
                    raise CheckpointError(f"tensor '{name}' is also in {self._infos[name].shard.name}", path)
                nbytes = tensor.numel() * tensor.element_size()
                self._infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, path, nbytes)
                names.append(name)
            header = json.dumps(directory).encode()
            self._shards.append(_Shard(path, relative, path.stat().st_size, header, tuple(names), {}, {}))

    @staticmethod
    def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
        """Memory-mapped, weights-only: tensors stay on disk until touched, and no arbitrary code runs."""
        try:
            state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load as weights only: {first_line}", path) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError("does not hold a flat name-to-tensor dict", path)
        return state

    # -- the public API --------------------------------------------------------------------------------------

    @property
    def shards(self) -> list[Path]:
        """The weight files, in the order `iter_tensors` reads them."""
        return [shard.path for shard in self._shards]

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data: what a full copy of the weights reads and writes."""
        return sum(info.nbytes for info in self._infos.values())

    @property
    def metadata(self) -> dict[str, Any]:
        """The index's `metadata`, or else the first shard's `__metadata__` (empty for pickle files)."""
        if self._index_metadata is not None:
            return dict(self._index_metadata)
        return dict(self._shards[0].metadata) if self._shards else {}

    def names(self) -> list[str]:
        """Every tensor name, in the order `iter_tensors` yields them."""
        return [name for shard in self._shards for name in shard.names]

    def meta(self, name: str) -> TensorInfo:
        """Shape, dtype, file and size of a tensor, from the header alone."""
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"no tensor named '{name}' in the checkpoint", self.model_dir) from None

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (on the CPU); nothing else in its shard is read."""
        info = self.meta(name)
        if self._pickle:
            return self._load_pickle(info.shard)[name]
        shard = next(shard for shard in self._shards if shard.path == info.shard)
        with self._open(shard) as file:
            return _read_tensor(file, info, shard.offsets[name])

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, shard after shard, each shard opened once and read front to back.

        The reader keeps no reference to a tensor it has yielded, so the caller decides how much is alive.
        """
        for name, item in self.iter_stored():
            yield name, item.load() if isinstance(item, StoredTensor) else item

    def iter_stored(self) -> Iterator[tuple[str, StoredTensor | torch.Tensor]]:
        """Like `iter_tensors`, but safetensors data stays where it is: a StoredTensor says where.

        Pickle files yield loaded tensors (their layout is not one to copy bytes from).
        """
        for shard in self._shards:
            if self._pickle:
                state = self._load_pickle(shard.path)
                for name in shard.names:
                    yield name, state.pop(name)
                continue
            with self._open(shard) as file:
                for name in shard.names:
                    yield name, StoredTensor(self._infos[name], file, shard.offsets[name])

    @staticmethod
    def _open(shard: _Shard) -> Any:
        try:
            file = shard.path.open("rb", buffering=0)
        except OSError as exc:
            raise CheckpointError(f"cannot read: {exc.strerror or exc}", shard.path) from None
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return file

    def fingerprint(self) -> str:
        """A sha256 that changes when the weights' layout changes, computed from headers only (no full read).

        It covers the shard names relative to the model directory, their sizes and their headers (for pickle
        files, the zip directory with each record's CRC), so moving the directory keeps it the same.
        """
        digest = hashlib.sha256()
        for shard in self._shards:
            digest.update(shard.relative.encode() + b"\0")
            digest.update(str(shard.size).encode() + b"\0")
            digest.update(len(shard.header).to_bytes(8, "little") + shard.header)
        return digest.hexdigest()
