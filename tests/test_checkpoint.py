"""Checkpoint I/O: the reader refuses damaged or unsafe weights, the writer shards, staging never leaves half."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nsa_convert.checkpoint import (
    CheckpointReader,
    ShardWriter,
    StoredTensor,
    TensorSpec,
    install_sigterm_as_interrupt,
    staged_output,
)
from nsa_convert.checkpoint import staging as staging_module
from nsa_convert.checkpoint import writer as writer_module
from nsa_convert.errors import CheckpointError, OutputError

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.uint8,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, rng: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=rng) > 0.5
    if dtype in (torch.int64, torch.uint8):
        return torch.randint(1, 200, shape, generator=rng).to(dtype)
    return (torch.randn(shape, generator=rng) + 3).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality that also works for float8 and bool."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def random_state(rng: torch.Generator, count: int = 12) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i}.w": random_tensor((4 + i, 6), DTYPES[i % len(DTYPES)], rng) for i in range(count)
    }


def write_sharded(model_dir: Path, state: dict[str, torch.Tensor], shards: int = 3) -> None:
    """A hub-style sharded checkpoint written with the safetensors library directly (not with our writer)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for number in range(shards):
        part = names[number::shards]
        file = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, model_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def raw_safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def write_all(out: Path, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
    """Declare the tensors to a ShardWriter, add them in that order and finalize."""
    writer = ShardWriter(out, [TensorSpec.of(n, t) for n, t in tensors.items()], **kwargs)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    return writer.finalize()


def reader_error(model_dir: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(model_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- round trip --------------------------------------------------------------------------------------------


def test_round_trip_through_writer_keeps_every_tensor_and_writes_a_verifiable_index(tmp_path, rng):
    state = random_state(rng)
    write_sharded(tmp_path / "src", state)
    reader = CheckpointReader(tmp_path / "src")
    assert sorted(reader.names()) == sorted(state)
    assert len(reader.shards) == 3
    assert reader.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert reader.metadata == {"total_size": 0}
    for name, tensor in state.items():
        info = reader.meta(name)
        assert (info.shape, info.dtype, info.nbytes) == (tuple(tensor.shape), tensor.dtype, tensor.nbytes)
        assert same(reader.get(name), tensor)

    out = tmp_path / "out"
    out.mkdir()
    shard_limit = reader.total_bytes // 3
    reported = []
    specs = [TensorSpec(n, reader.meta(n).shape, reader.meta(n).dtype) for n in reader.names()]
    writer = ShardWriter(out, specs, max_shard_bytes=shard_limit, on_shard=lambda p, n: reported.append(n))
    for name, tensor in reader.iter_tensors():
        writer.add(name, tensor)
    index = writer.finalize({"source": "test"})

    files = sorted(p.name for p in out.iterdir())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) >= 3
    assert files == sorted([*shard_files, "model.safetensors.index.json"])
    assert shard_files[0] == f"model-00001-of-{len(shard_files):05d}.safetensors"
    assert reported == [(out / f).stat().st_size for f in shard_files]
    assert json.loads((out / "model.safetensors.index.json").read_text()) == index
    assert index["metadata"]["source"] == "test"
    assert index["metadata"]["total_size"] == reader.total_bytes
    for file in shard_files:
        assert (
            index["metadata"]["shard_sha256"][file] == hashlib.sha256((out / file).read_bytes()).hexdigest()
        )
        loaded = load_file(out / file)
        assert sum(t.nbytes for t in loaded.values()) <= shard_limit
        for name, tensor in loaded.items():
            assert index["weight_map"][name] == file
            assert same(tensor, state[name])

    again = CheckpointReader(out)
    assert sorted(again.names()) == sorted(state)
    assert all(same(again.get(name), state[name]) for name in state)


def test_single_shard_is_named_model_safetensors_and_still_gets_an_index(tmp_path, rng):
    index = write_all(tmp_path, {"a": random_tensor((3, 5), torch.bfloat16, rng)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.safetensors.index.json"]
    assert index["weight_map"] == {"a": "model.safetensors"}
    assert load_file(tmp_path / "model.safetensors", device="cpu")["a"].dtype == torch.bfloat16
    assert CheckpointReader(tmp_path).names() == ["a"]


def test_no_tensors_still_make_a_loadable_checkpoint(tmp_path):
    index = write_all(tmp_path, {})
    assert index["weight_map"] == {} and index["metadata"]["total_size"] == 0
    assert load_file(tmp_path / "model.safetensors") == {}


def test_writer_writes_views_shared_storage_and_empty_tensors(tmp_path, rng):
    base = random_tensor((4, 6), torch.float32, rng)
    tensors = {
        "tied.a": base,
        "tied.b": base,  # the same tensor under a second name, as tied embeddings are
        "row": base[1],  # overlaps the bytes of tied.a
        "transposed": base.t(),  # not contiguous
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "scalar": torch.tensor(7, dtype=torch.int64),
    }
    write_all(tmp_path, tensors)
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(same(loaded[name], tensor.contiguous()) for name, tensor in tensors.items())
    reader = CheckpointReader(tmp_path)
    assert all(same(reader.get(name), tensor.contiguous()) for name, tensor in tensors.items())


def test_writer_holds_the_caller_to_its_declaration(tmp_path, rng):
    a, b = random_tensor((2,), torch.float32, rng), random_tensor((3,), torch.float32, rng)
    with pytest.raises(ValueError, match="declared twice"):
        ShardWriter(tmp_path, [TensorSpec.of("a", a), TensorSpec.of("a", a)]).add("a", a)
    writer = ShardWriter(tmp_path, [TensorSpec.of("a", a), TensorSpec.of("b", b)])
    with pytest.raises(ValueError, match="expected tensor 'a' next, got 'b'"):
        writer.add("b", b)
    with pytest.raises(ValueError, match=r"declared torch\.float32"):
        writer.add("a", a.double())
    writer.add("a", a)
    with pytest.raises(ValueError, match="'b' is next"):
        writer.finalize()
    writer.add("b", b)
    with pytest.raises(ValueError, match="not declared"):
        writer.add("c", b)
    with pytest.raises(ValueError, match="total_size"):
        writer.finalize({"total_size": 1})
    assert writer.finalize()["weight_map"] == {"a": "model.safetensors", "b": "model.safetensors"}


def test_writer_reads_the_declaration_one_shard_ahead(tmp_path, rng):
    """The end of the declaration may be computed while the first shards are written."""
    tensors = {f"t{i}": random_tensor((10,), torch.float32, rng) for i in range(6)}  # 40 bytes each
    declared = []

    def specs():
        for name, tensor in tensors.items():
            declared.append(name)
            yield TensorSpec.of(name, tensor)

    writer = ShardWriter(tmp_path, specs(), max_shard_bytes=80)
    writer.add("t0", tensors["t0"])
    assert declared == ["t0", "t1", "t2"]  # the first shard's two members, and the one that did not fit
    writer.add("t1", tensors["t1"])
    writer.add("t2", tensors["t2"])
    assert declared == ["t0", "t1", "t2", "t3", "t4"]
    for name in ("t3", "t4", "t5"):
        writer.add(name, tensors[name])
    index = writer.finalize()
    assert index["weight_map"]["t5"] == "model-00003-of-00003.safetensors"
    assert index["metadata"]["total_size"] == 6 * 40


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "through-a-buffer"])
def test_stored_tensors_are_copied_file_to_file(tmp_path, rng, monkeypatch, kernel_copy):
    state = random_state(rng)
    write_sharded(tmp_path / "src", state)
    reader = CheckpointReader(tmp_path / "src")
    if not kernel_copy:

        def unsupported(*args):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    specs = [TensorSpec(n, reader.meta(n).shape, reader.meta(n).dtype) for n in reader.names()]
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, specs, max_shard_bytes=reader.total_bytes // 2)
    for name, stored in reader.iter_stored():
        assert isinstance(stored, StoredTensor) and same(stored.load(), state[name])
        writer.add(name, stored)
    index = writer.finalize()
    for file, sha in index["metadata"]["shard_sha256"].items():
        assert hashlib.sha256((out / file).read_bytes()).hexdigest() == sha
    again = CheckpointReader(out)
    assert sorted(again.names()) == sorted(state)
    assert all(same(again.get(name), tensor) for name, tensor in state.items())


def test_a_source_truncated_during_the_copy_is_a_checkpoint_error(tmp_path, rng):
    save_file({"a": random_tensor((64,), torch.float32, rng)}, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    ((name, stored),) = list(reader.iter_stored())
    writer = ShardWriter(tmp_path, [TensorSpec.of(name, stored)])
    with (tmp_path / "model.safetensors").open("rb") as file:
        os.truncate(tmp_path / "model.safetensors", stored.offset + 10)
        with pytest.raises(CheckpointError, match="file is truncated: tensor 'a'"):
            writer.add(name, StoredTensor(stored.info, file, stored.offset))


def test_writer_gives_an_oversized_tensor_its_own_shard(tmp_path, rng):
    index = write_all(
        tmp_path,
        {
            "small": random_tensor((4,), torch.float32, rng),
            "big": random_tensor((100,), torch.float32, rng),
            "small2": random_tensor((4,), torch.float32, rng),
        },
        max_shard_bytes=64,
    )
    assert index["weight_map"] == {
        "big": "model-00002-of-00003.safetensors",
        "small": "model-00001-of-00003.safetensors",
        "small2": "model-00003-of-00003.safetensors",
    }


def test_writer_keeps_no_tensor_it_was_given(tmp_path, rng):
    """Streaming: a tensor's bytes are written (or copied into the file's small buffer) when `add` returns.

    The tensor's memory belongs to a numpy array, so a weak reference to the array shows when the last
    tensor using that memory is gone.
    """
    tensors = {
        "first": random_tensor((16,), torch.float32, rng),
        "second": random_tensor((4,), torch.int64, rng),
    }
    writer = ShardWriter(tmp_path, [TensorSpec.of(n, t) for n, t in tensors.items()])
    memory = tensors["first"].numpy().copy()
    alive = weakref.ref(memory)
    writer.add("first", torch.from_numpy(memory))
    del memory
    assert alive() is None
    writer.add("second", tensors["second"])
    writer.finalize()
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(same(loaded[name], tensor) for name, tensor in tensors.items())


def test_writer_io_failures_are_oserror_with_errno(tmp_path, rng):
    out = tmp_path / "gone"
    out.mkdir()
    tensor = random_tensor((2,), torch.float32, rng)
    writer = ShardWriter(out, [TensorSpec.of("a", tensor)])
    out.rmdir()
    with pytest.raises(OSError) as info:
        writer.add("a", tensor)
    assert info.value.errno == errno.ENOENT


# -- reader: iteration and fingerprint ---------------------------------------------------------------------


def test_iter_tensors_keeps_no_reference_to_what_it_yielded(tmp_path, rng):
    """Stronger than 'one shard at a time': once the caller drops a tensor, nothing in the reader holds it."""
    write_sharded(tmp_path / "src", random_state(rng))
    reader = CheckpointReader(tmp_path / "src")
    seen, order = [], []
    for name, tensor in reader.iter_tensors():
        assert all(ref() is None for ref in seen)
        seen.append(weakref.ref(tensor))
        order.append(name)
        del tensor
    assert order == reader.names()
    assert [reader.meta(n).shard for n in order] == sorted(reader.meta(n).shard for n in order)


def test_fingerprint_is_stable_moves_with_the_directory_and_sees_changes(tmp_path, rng):
    state = random_state(rng)
    write_sharded(tmp_path / "a", state)
    fingerprint = CheckpointReader(tmp_path / "a").fingerprint()
    assert CheckpointReader(tmp_path / "a").fingerprint() == fingerprint
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert CheckpointReader(tmp_path / "b").fingerprint() == fingerprint
    first = "model.layers.0.w"
    state[first] = random_tensor((5, 6), state[first].dtype, rng)  # a different shape changes the header
    write_sharded(tmp_path / "b", state)
    assert CheckpointReader(tmp_path / "b").fingerprint() != fingerprint


def test_directory_of_unindexed_safetensors_files_is_read(tmp_path, rng):
    save_file({"a": random_tensor((2, 2), torch.float16, rng)}, tmp_path / "one.safetensors")
    save_file({"b": random_tensor((3,), torch.int64, rng)}, tmp_path / "two.safetensors")
    reader = CheckpointReader(tmp_path)
    assert reader.names() == ["a", "b"]
    assert [p.name for p in reader.shards] == ["one.safetensors", "two.safetensors"]


def test_hugging_face_cache_links_into_blobs_are_allowed(tmp_path, rng):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    tensor = random_tensor((4,), torch.float32, rng)
    save_file({"w": tensor}, repo / "blobs" / "deadbeef")
    (snapshot / "model.safetensors").symlink_to("../../blobs/deadbeef")
    assert same(CheckpointReader(snapshot).get("w"), tensor)


def test_local_files_may_link_within_the_directory_or_its_cache_blobs_only(tmp_path, rng):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({"w": random_tensor((4,), torch.float32, rng)}, snapshot / "model.safetensors")
    (repo / "blobs" / "cafe").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/cafe")
    (tmp_path / "secret").write_text("secret")
    (snapshot / "vocab.txt").symlink_to(tmp_path / "secret")
    reader = CheckpointReader(snapshot)
    assert reader.local_file("tokenizer.json") == snapshot / "tokenizer.json"
    assert reader.local_file("merges.txt") is None
    with pytest.raises(CheckpointError, match="outside the model directory") as info:
        reader.local_file("vocab.txt")
    assert info.value.path == snapshot / "vocab.txt"


# -- reader: rejections ------------------------------------------------------------------------------------


def test_rejects_a_file_shorter_than_the_length_prefix(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02\x03")
    assert "shorter than the 8-byte header length" in reader_error(tmp_path)


def test_rejects_a_header_length_over_100mb(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(raw_safetensors({}, length=200_000_000))
    assert "exceeds the 100000000-byte limit" in reader_error(tmp_path)


def test_rejects_a_header_length_beyond_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(raw_safetensors({}, length=5000))
    assert "larger than the file" in reader_error(tmp_path)


def test_rejects_a_header_that_is_not_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(raw_safetensors(b"{not json"))
    assert "not valid JSON" in reader_error(tmp_path)


def test_rejects_a_truncated_file(tmp_path, rng):
    save_file({"a": random_tensor((64,), torch.float32, rng)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    assert "truncated" in reader_error(tmp_path)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}, "needs 8"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "out of range"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "out of range"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}, "gap"),
        ({"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2]}, "lacks dtype, shape or data_offsets"),
    ],
)
def test_rejects_inconsistent_header_entries(tmp_path, entry, expected):
    (tmp_path / "model.safetensors").write_bytes(raw_safetensors({"a": entry}, os.urandom(16)))
    assert expected in reader_error(tmp_path)


def test_rejects_overlapping_tensors_and_trailing_bytes(tmp_path):
    overlapping = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    (tmp_path / "model.safetensors").write_bytes(raw_safetensors(overlapping, os.urandom(12)))
    assert "overlaps" in reader_error(tmp_path)
    trailing = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    (tmp_path / "model.safetensors").write_bytes(raw_safetensors(trailing, os.urandom(12)))
    assert "4 unexpected bytes" in reader_error(tmp_path)


def test_rejects_duplicate_keys_within_one_header(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = f'{{"a": {entry}, "a": {entry}}}'.encode()
    (tmp_path / "model.safetensors").write_bytes(raw_safetensors(header, os.urandom(4)))
    assert "duplicate key 'a'" in reader_error(tmp_path)


def test_rejects_a_tensor_name_in_two_shards(tmp_path, rng):
    save_file({"a": random_tensor((2,), torch.float32, rng)}, tmp_path / "one.safetensors")
    save_file({"a": random_tensor((2,), torch.float32, rng)}, tmp_path / "two.safetensors")
    message = reader_error(tmp_path)
    assert "two.safetensors" in message and "'a' is also in one.safetensors" in message


def test_rejects_an_index_naming_a_missing_shard(tmp_path, rng):
    write_sharded(tmp_path, random_state(rng))
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    message = reader_error(tmp_path)
    assert (
        "model.safetensors.index.json" in message
        and "'model-00002-of-00003.safetensors' does not exist" in message
    )


def test_rejects_an_index_that_disagrees_with_the_headers(tmp_path, rng):
    write_sharded(tmp_path, random_state(rng))
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.w"] = "model-00002-of-00003.safetensors"
    index["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    message = reader_error(tmp_path)
    assert "weight_map disagrees" in message
    assert "'ghost' is not in any shard" in message and "'model.layers.0.w' is in model-00001" in message


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd"])
def test_rejects_index_names_that_leave_the_directory(tmp_path, rng, shard):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"a": random_tensor((2,), torch.float32, rng)}, tmp_path / "outside.safetensors")
    index = {"weight_map": {"a": shard}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    message = reader_error(model_dir)
    assert "absolute path" in message or "leaves the model directory" in message


def test_rejects_a_symlink_out_of_the_directory(tmp_path, rng):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"a": random_tensor((2,), torch.float32, rng)}, tmp_path / "outside.safetensors")
    (model_dir / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    assert "outside the model directory" in reader_error(model_dir)


def test_rejects_a_directory_without_weights(tmp_path):
    assert "no weights found" in reader_error(tmp_path)


# -- reader: pickle weights --------------------------------------------------------------------------------


def test_pickle_only_needs_the_flag(tmp_path, rng):
    state = random_state(rng, count=4)
    torch.save(dict(list(state.items())[:2]), tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(dict(list(state.items())[2:]), tmp_path / "pytorch_model-00002-of-00002.bin")
    assert "--allow-pickle" in reader_error(tmp_path)

    reader = CheckpointReader(tmp_path, allow_pickle=True)
    assert reader.names() == list(state)
    assert reader.meta("model.layers.2.w").shard.name == "pytorch_model-00002-of-00002.bin"
    assert all(same(reader.get(name), tensor) for name, tensor in state.items())
    assert len(reader.fingerprint()) == 64

    refs = {}
    for name, tensor in reader.iter_tensors():
        assert same(tensor, state[name])
        refs[name] = weakref.ref(tensor)
        del tensor
        if name == "model.layers.2.w":  # the second file is open: nothing of the first is held
            assert refs["model.layers.0.w"]() is None and refs["model.layers.1.w"]() is None


class _NotATensor:
    pass


def test_pickle_with_code_is_refused_even_with_the_flag(tmp_path):
    torch.save({"a": _NotATensor()}, tmp_path / "pytorch_model.bin")
    assert "cannot load as weights only" in reader_error(tmp_path, allow_pickle=True)


# -- staged output -----------------------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".nsa-" in p.name)


def test_staged_output_appears_only_on_success(tmp_path, rng):
    target = tmp_path / "out"
    with staged_output(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.nsa-tmp-")
        assert not target.exists()
        write_all(staging, {"a": random_tensor((3,), torch.float32, rng)})
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "model.safetensors.index.json"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_staged_output_failure_leaves_nothing_and_keeps_the_old_target(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(error)), staged_output(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        raise error
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_staged_output_overwrite_replaces_and_refuses_without_it(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"), staged_output(target):
        pass
    with staged_output(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_staged_output_refuses_targets_inside_or_around_the_source(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    for target, overwrite in [(source / "nsa", False), (source, True), (tmp_path, True)]:
        with pytest.raises(OutputError) as info, staged_output(target, overwrite=overwrite, source=source):
            pass
        assert "source" in str(info.value)
    (tmp_path / "link").symlink_to(source)
    with (
        pytest.raises(OutputError, match="inside the source"),
        staged_output(tmp_path / "link" / "x", source=source),
    ):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model"]


def test_staged_output_refuses_a_missing_parent(tmp_path):
    with pytest.raises(OutputError, match="does not exist"), staged_output(tmp_path / "no" / "out"):
        pass


class FillingDisk:
    """A disk that fills after `room` bytes: the write or copy that crosses it fails with ENOSPC, as the kernel's do.

    It replaces the writer's two ways of putting bytes in a file.
    """

    def __init__(self, monkeypatch, room: int) -> None:
        self.room = room
        write, copy = writer_module._write_all, writer_module._copy_range

        def write_some(fd: int, data) -> None:
            allowed = self._take(len(data))
            write(fd, data[:allowed])
            if allowed < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def copy_some(source: int, offset: int, target: int, nbytes: int) -> int:
            allowed = self._take(nbytes)
            copy(source, offset, target, allowed)
            if allowed < nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return nbytes

        monkeypatch.setattr(writer_module, "_write_all", write_some)
        monkeypatch.setattr(writer_module, "_copy_range", copy_some)

    def _take(self, nbytes: int) -> int:
        allowed = min(nbytes, self.room)
        self.room -= allowed
        return allowed


@pytest.mark.parametrize("room", [0, 100, 5000])  # in the header, in the first tensor, in the second shard
def test_disk_full_becomes_output_error_and_leaves_nothing(tmp_path, rng, monkeypatch, room):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    tensors = {f"t{i}": random_tensor((1000,), torch.float32, rng) for i in range(3)}
    FillingDisk(monkeypatch, room)
    with (
        pytest.raises(OutputError, match="disk full while writing") as info,
        staged_output(target, overwrite=True) as staging,
    ):
        write_all(staging, tensors, max_shard_bytes=4000)
    assert info.value.exit_code == 6 and info.value.path == target
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_sigterm_becomes_keyboard_interrupt_and_cleans_up(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    with (
        pytest.raises(KeyboardInterrupt),
        install_sigterm_as_interrupt(),
        staged_output(tmp_path / "out") as staging,
    ):
        (staging / "partial").write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; without it the test fails on a missing KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) == previous
    assert list(tmp_path.iterdir()) == []


def test_signals_during_the_final_swap_are_ignored(tmp_path, monkeypatch):
    """Once the new output is complete, a Ctrl-C or SIGTERM cannot cut the swap with the old one short."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    publish = staging_module._publish

    def interrupted_publish(staging: Path, target: Path) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        publish(staging, target)

    monkeypatch.setattr(staging_module, "_publish", interrupted_publish)
    with install_sigterm_as_interrupt(), staged_output(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []
