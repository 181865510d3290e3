"""Peak memory of a conversion does not grow with the size of the checkpoint.

By design: the reader reads one tensor at a time into its own memory (nothing is memory-mapped), and the
writer streams each tensor into its shard as it arrives (the header is written first, from the declared
shapes), so the process holds the imported libraries, the captured graph and one tensor.  The test converts
two checkpoints that differ only in how much data they hold — the same tiny model plus 8 MB tensors that the
model does not use (they are copied like any other) — and compares the peak RSS of the two conversions,
each measured by wait4 on its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.models import make_checkpoint

MB = 2**20
EXTRA_TENSOR = (2048, 1024)  # float32: 8 MB, the largest tensor in either checkpoint
SOURCE_SHARD = 100 * MB


def with_extra_data(model_dir: Path, megabytes: int) -> int:
    """Add `megabytes` of unused 8 MB tensors in hub-style shards to a single-file checkpoint; returns its size."""
    index = {"metadata": {}, "weight_map": {}}
    with safe_open(model_dir / "model.safetensors", "pt") as file:
        index["weight_map"] = dict.fromkeys(file.keys(), "model.safetensors")
    base = torch.randn(EXTRA_TENSOR)
    per_shard = SOURCE_SHARD // (base.numel() * 4)
    count = megabytes * MB // (base.numel() * 4)
    for first in range(0, count, per_shard):
        name = f"extra-{first // per_shard + 1:05d}.safetensors"
        shard = {f"extra.{i}": base + i for i in range(first, min(first + per_shard, count))}
        save_file(shard, model_dir / name, metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(shard, name))
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


# Linux carries the peak RSS of the process that forks into the ru_maxrss of the child it execs, so the
# child is started by a bare interpreter (about 10 MB) rather than by this one (torch and the test suite).
LAUNCHER = """
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_of_conversion(source: Path, out: Path) -> int:
    """Bytes: ru_maxrss of exactly the converting process."""
    with tempfile.NamedTemporaryFile() as peak:
        result = subprocess.run(
            [
                sys.executable,
                "-S",
                "-c",
                LAUNCHER,
                peak.name,
                sys.executable,
                "-m",
                "nsa_convert",
                str(source),
                str(out),
                "--json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return int(Path(peak.name).read_text())


def test_peak_memory_does_not_grow_with_checkpoint_size(tmp_path):
    peaks, sizes = {}, {}
    for megabytes in (200, 1000):
        source = make_checkpoint(tmp_path / f"model-{megabytes}", "llama-g4")
        sizes[megabytes] = with_extra_data(source, megabytes)
        out = tmp_path / f"out-{megabytes}"
        peaks[megabytes] = peak_rss_of_conversion(source, out)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] >= megabytes * MB
        assert len(set(index["weight_map"].values())) == 1  # one output shard of 1 GB: never buffered
        for directory in (source, out):
            for path in directory.iterdir():
                path.unlink()

    growth = peaks[1000] - peaks[200]
    report = f"peak RSS {peaks[200] / MB:.0f} MB → {peaks[1000] / MB:.0f} MB for {sizes[200] / MB:.0f} → {sizes[1000] / MB:.0f} MB"
    assert growth < 0.1 * (sizes[1000] - sizes[200]), report
    assert peaks[1000] < sizes[1000], report  # the process never held the checkpoint it converted
