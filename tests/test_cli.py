"""The real command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nsa_convert

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsa_convert", *args], capture_output=True, text=True, timeout=300
    )


def test_convert_example_model_with_json_report(tmp_path):
    out = tmp_path / "nsa"
    result = run(str(EXAMPLE), str(out), "--window", "64", "--block-size", "16", "--top-n", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["converted_sites"] == 4 and report["dense_sites"] == 0
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    model = nsa_convert.load(out)
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (1, 100))
    assert torch.isfinite(model(ids, use_cache=False).logits).all()


def test_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "nsa"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(str(EXAMPLE), str(out))
    assert result.returncode == 6
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_output(tmp_path):
    out = tmp_path / "nsa"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run(str(EXAMPLE), str(out), "--overwrite").returncode == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compress-stride", "5"], "must divide"),
        (["--branch-kv", "sideways"], "branch_kv"),
        (["--top-n", "2"], "top_n"),
        (["--max-shard-size", "lots"], "max-shard-size"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, args, message):
    result = run(str(EXAMPLE), str(tmp_path / "nsa"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "nsa").exists()


def test_missing_config_exits_3(tmp_path):
    result = run(str(tmp_path), str(tmp_path.parent / "out-missing"))
    assert result.returncode == 3
    assert "config.json" in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = run(str(tmp_path), str(tmp_path.parent / "out-debug"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
