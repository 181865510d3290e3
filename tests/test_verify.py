"""`nsa-convert verify`: converted outputs pass; tampered, incomplete or inconsistent ones are rejected."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nsa_convert
from nsa_convert.config import NSAConfig
from nsa_convert.errors import UsageError
from nsa_convert.verify import CHECKS, verify
from tests.models import make_checkpoint

SMALL = NSAConfig(window=64, block_size=16, top_n=4, compress_block=8, compress_stride=4)
INDEX = "model.safetensors.index.json"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsa_convert", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """(dense source, converted output): llama with GQA groups of 4, one shard."""
    root = tmp_path_factory.mktemp("llama")
    source = make_checkpoint(root / "dense", "llama-g4")
    nsa_convert.convert(source, root / "nsa", SMALL)
    return source, root / "nsa"


@pytest.fixture(scope="module")
def qwen3_independent(tmp_path_factory) -> tuple[Path, Path]:
    """qwen3 (q/k norms) with per-branch k/v copies in float16 NSA tensors, written as several shards."""
    root = tmp_path_factory.mktemp("qwen3")
    source = make_checkpoint(root / "dense", "qwen3-g1")
    config = NSAConfig(**(SMALL.to_dict() | {"branch_kv": "independent", "dtype": "float16"}))
    nsa_convert.convert(source, root / "nsa", config, max_shard_bytes=100_000)
    return source, root / "nsa"


def copy(output: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(output, tmp_path / output.name))


@pytest.mark.parametrize("converted", ["llama", "qwen3_independent"])
def test_cli_accepts_converted_outputs(request, converted):
    source, output = request.getfixturevalue(converted)
    result = run("verify", str(output), "--against", str(source), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "nsa-convert.verify/1" and report["ok"] and report["problems"] == []
    assert report["checks"] == dict.fromkeys(CHECKS, "ok")
    assert report["logits"]["seq_len"] == 64 and report["logits"]["relative_error"] <= 1e-3
    assert (len(report["shards"]) == 1) == (converted == "llama")


def test_cli_rejects_a_tampered_shard(llama, tmp_path):
    output = copy(llama[1], tmp_path)
    shard = output / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight: the header and the shapes still agree
    shard.write_bytes(bytes(data))
    result = run("verify", str(output))
    assert result.returncode == 1
    assert "verification failed (1 problem)" in result.stderr
    assert "shard 'model.safetensors' does not have the sha256 recorded" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_an_incomplete_output(qwen3_independent, tmp_path):
    output = copy(qwen3_independent[1], tmp_path)
    shards = sorted(output.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    result = run("verify", str(output))
    assert result.returncode == 1
    assert f"shard '{shards[-1].name}' is missing" in result.stderr and "Traceback" not in result.stderr


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite(output: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Re-save a one-shard output with `edit` applied and its index and hash updated: only the tensor checks can tell."""
    shard = output / "model.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((output / INDEX).read_text())
    index["weight_map"] = dict.fromkeys(sorted(tensors), "model.safetensors")
    index["metadata"]["shard_sha256"] = {"model.safetensors": _sha256(shard)}
    (output / INDEX).write_text(json.dumps(index))


GATE = "model.layers.1.self_attn.nsa.gate.weight"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(GATE), f"tensor '{GATE}' is missing"),
        (
            lambda t: t.update({"model.layers.0.self_attn.nsa.extra": torch.zeros(2)}),
            "unexpected tensor 'model.layers.0.self_attn.nsa.extra': no NSA module of config.json has it",
        ),
        (
            lambda t: t.update({GATE: t[GATE].half()}),
            f"tensor '{GATE}' is torch.float16, expected torch.float32 "
            "('model.layers.1.self_attn.q_proj.weight' is torch.float32)",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(63)}),
            "tensor 'model.norm.weight' has shape [63], config.json implies [64]",
        ),
        (lambda t: t.pop("model.embed_tokens.weight"), "tensor 'model.embed_tokens.weight' is missing"),
    ],
    ids=["missing-nsa", "extra-nsa", "nsa-dtype", "shape", "missing-original"],
)
def test_tensor_problems_are_found_even_with_consistent_hashes(llama, tmp_path, edit, message):
    output = copy(llama[1], tmp_path)
    rewrite(output, edit)
    report = verify(output)
    assert not report.ok and message in report.problems
    assert report.checks["shard_hashes"] == "ok" and report.checks["tensors"] == "failed"
    assert report.checks["load"] == "skipped"


def test_independent_copies_must_keep_their_dense_dtype(qwen3_independent, tmp_path):
    output = copy(qwen3_independent[1], tmp_path)
    name = "model.layers.0.self_attn.nsa.k_proj_cmp.weight"
    index = json.loads((output / INDEX).read_text())
    shard = output / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].half()
    save_file(tensors, shard, metadata={"format": "pt"})
    report = verify(output)
    assert any("does not have the sha256" in problem for problem in report.problems)
    assert (
        f"tensor '{name}' is torch.float16, expected torch.float32 "
        "(it is a copy of 'model.layers.0.self_attn.k_proj.weight')"
    ) in report.problems


def test_index_without_hashes_and_stray_shards(llama, tmp_path):
    output = copy(llama[1], tmp_path)
    index = json.loads((output / INDEX).read_text())
    del index["metadata"]["shard_sha256"]
    (output / INDEX).write_text(json.dumps(index))
    shutil.copy(output / "model.safetensors", output / "model-old.safetensors")
    assert verify(output).problems == [
        f"{INDEX} records no shard_sha256: not written by nsa-convert, or edited",
        f"'model-old.safetensors' is not in {INDEX}",
    ]


def test_a_dense_directory_is_not_a_converted_one(llama):
    report = verify(llama[0])
    assert report.checks["nsa_section"] == "failed"
    assert report.problems == ["no 'nsa' section: not a checkpoint converted by nsa-convert"]


def test_logits_of_another_model_do_not_match(llama, tmp_path):
    other = make_checkpoint(tmp_path / "other", "llama-g4", seed=1, max_shard_size="200KB")
    report = verify(llama[1], against=other)
    assert report.checks["tensors"] == "ok" and report.checks["logits"] == "failed"
    assert report.problems[0].startswith("logits differ from the dense model's: relative error")
    assert any("differ from those this checkpoint was converted from" in note for note in report.notes)


def test_seq_len_beyond_the_exact_range_is_refused(llama):
    with pytest.raises(UsageError, match="min\\(window, top_n \\* block_size\\) = 64"):
        verify(llama[1], against=llama[0], seq_len=65)
