"""Convert a checkpoint with Llama-3-8B shapes and compare with a plain copy of the same shards.

    python benchmarks/bench_convert.py [--workdir DIR] [--layers 32] [--keep]

Writes a random bf16 checkpoint (Llama-3-8B: hidden 4096, 32 layers, 32 query / 8 KV heads, MLP 14336,
vocab 128256; about 16 GB) sharded as the hub shards it (`model-0000i-of-00004.safetensors` of at most
5 GB, in state-dict order, with `model.safetensors.index.json`), one tensor at a time so that this
script never holds more than one tensor.  Then, in one run:

1. copies the shards with `shutil.copyfile` (timed, then the copies are fsync'ed, timed apart);
2. times `nsa_convert.plan` (import + capture on the meta device + passes) in a child process;
3. runs `python -m nsa_convert SRC OUT` in a child process: wall time, and its peak RSS from wait4;
4. copies the shards again (the page cache differs after the conversion; both copies are reported);
5. checks a few tensors of the output against the source, and deletes everything it wrote.

Targets (the issue): peak RSS of the conversion <= 2 GB + the largest tensor, and conversion
throughput (source bytes / wall time) >= 50% of the faster plain copy's.  Needs free disk for the
source, one copy and the output (about 2.1x the checkpoint: ~35 GB at 32 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

HUB_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"
GB = 1e9

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "dtype": "bfloat16",
}


def llama_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order save_pretrained writes them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    q = config["num_attention_heads"] * config["head_dim"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return [*shapes, ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def nbytes(shape: tuple[int, ...]) -> int:
    return 2 * int(torch.Size(shape).numel())  # bf16


def write_checkpoint(directory: Path, config: dict, seed: int = 0) -> list[Path]:
    """Hub-style bf16 shards, each written header first and then tensor by tensor (one in memory)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = llama_tensors(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        if shards[-1] and size + nbytes(shape) > HUB_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    generator = torch.Generator().manual_seed(seed)
    weight_map, paths = {}, []
    for number, members in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in members:
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes(shape)],
            }
            offset += nbytes(shape)
            weight_map[name] = file_name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (directory / file_name).open("wb") as file:
            file.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in members:
                scale = 1.0 if "norm" in name else 0.02
                tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, scale, generator=generator)
                file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor
        paths.append(directory / file_name)
    total = sum(nbytes(shape) for _, shape in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def fsync_files(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def timed_copy(shards: list[Path], target: Path) -> tuple[float, float]:
    """Seconds to copy the shards with shutil.copyfile, and then to fsync the copies."""
    os.sync()
    target.mkdir()
    start = time.perf_counter()
    copies = []
    for shard in shards:
        shutil.copyfile(shard, target / shard.name)
        copies.append(target / shard.name)
    copied = time.perf_counter() - start
    fsync_files(copies)
    synced = time.perf_counter() - start - copied
    shutil.rmtree(target)
    return copied, synced


PLAN_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import nsa_convert.api as api
imported = time.perf_counter()
plan = api.plan(sys.argv[1])
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "plan_s": done - imported, "sites": len(plan.sites)}))
"""


def time_plan(source: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PLAN_SCRIPT, str(source)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


# Linux carries the peak RSS of the process that forks into the ru_maxrss of the child it execs (this
# script's peak is a generated tensor or more), so the conversion is started by a bare interpreter.
LAUNCHER = """
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss * 1024} {usage.ru_utime} {usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_conversion(source: Path, out: Path, extra: list[str]) -> tuple[float, int, tuple[float, float], dict]:
    """Wall seconds, peak RSS in bytes and (user, system) CPU seconds of exactly the converting process, and
    its JSON report."""
    os.sync()
    command = [sys.executable, "-m", "nsa_convert", str(source), str(out), "--json", *extra]
    with tempfile.NamedTemporaryFile() as peak:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-S", "-c", LAUNCHER, peak.name, *command], capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"conversion failed ({result.returncode}): {result.stderr[-2000:]}")
        rss, user, system = Path(peak.name).read_text().split()
        return wall, int(rss), (float(user), float(system)), json.loads(result.stdout)


def spot_check(source: Path, out: Path, names: list[str]) -> None:
    source_index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    out_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name in names:
        with (
            safe_open(source / source_index[name], "pt") as a,
            safe_open(out / out_index[name], "pt") as b,
        ):
            if not torch.equal(a.get_tensor(name), b.get_tensor(name)):
                raise SystemExit(f"output tensor {name} differs from the source")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where to write (default: a temp dir in /tmp)."
    )
    parser.add_argument("--layers", type=int, default=32, help="Decoder layers (32 is Llama-3-8B).")
    parser.add_argument("--keep", action="store_true", help="Keep the files (default: delete everything).")
    parser.add_argument("convert_args", nargs="*", help="Extra options for nsa-convert (after --).")
    args = parser.parse_args()

    config = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    tensors = llama_tensors(config)
    total = sum(nbytes(shape) for _, shape in tensors)
    largest = max(nbytes(shape) for _, shape in tensors)
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < 2.2 * total:
        raise SystemExit(f"{base}: {free / GB:.1f} GB free, need about {2.2 * total / GB:.1f} GB")

    start_load = os.getloadavg()[0]  # other processes on the machine skew every timing: report them
    root = Path(tempfile.mkdtemp(prefix="nsa-bench-", dir=base))
    try:
        print(
            f"checkpoint: {args.layers} layers, {len(tensors)} tensors, {total / GB:.2f} GB bf16, "
            f"largest tensor {largest / GB:.2f} GB, in {root}",
            flush=True,
        )
        start = time.perf_counter()
        shards = write_checkpoint(root / "src", config)
        print(f"wrote {len(shards)} shards in {time.perf_counter() - start:.1f} s", flush=True)
        shard_bytes = sum(p.stat().st_size for p in shards)

        copy1, sync1 = timed_copy(shards, root / "copy")
        print(
            f"copy 1: {copy1:.1f} s ({shard_bytes / copy1 / GB:.2f} GB/s), fsync after it {sync1:.1f} s",
            flush=True,
        )
        plan = time_plan(root / "src")
        print(
            f"plan (child): import {plan['import_s']:.1f} s, capture + passes {plan['plan_s']:.1f} s, "
            f"{plan['sites']} sites",
            flush=True,
        )
        wall, rss, (user, system), report = run_conversion(root / "src", root / "out", args.convert_args)
        print(
            f"conversion: {wall:.1f} s ({total / wall / GB:.2f} GB/s), peak RSS {rss / GB:.2f} GB, "
            f"CPU {user:.1f} s user + {system:.1f} s system, {len(report['shards'])} output shards",
            flush=True,
        )
        spot_check(
            root / "src",
            root / "out",
            [
                "model.embed_tokens.weight",
                f"model.layers.{args.layers - 1}.mlp.down_proj.weight",
                "lm_head.weight",
            ],
        )
        shutil.rmtree(root / "out")
        copy2, sync2 = timed_copy(shards, root / "copy")
        print(
            f"copy 2: {copy2:.1f} s ({shard_bytes / copy2 / GB:.2f} GB/s), fsync after it {sync2:.1f} s",
            flush=True,
        )

        best_copy = min(copy1, copy2)
        ratio = (total / wall) / (shard_bytes / best_copy)
        rss_limit = 2 * 2**30 + largest
        summary = {
            "checkpoint_gb": round(total / GB, 3),
            "largest_tensor_gb": round(largest / GB, 3),
            "copy_s": [round(copy1, 1), round(copy2, 1)],
            "copy_fsync_s": [round(sync1, 1), round(sync2, 1)],
            "copy_gbps": round(shard_bytes / best_copy / GB, 3),
            "import_s": round(plan["import_s"], 1),
            "capture_s": round(plan["plan_s"], 1),
            "convert_s": round(wall, 1),
            "convert_gbps": round(total / wall / GB, 3),
            "convert_cpu_s": {"user": round(user, 1), "system": round(system, 1)},
            "throughput_ratio": round(ratio, 3),
            "peak_rss_gb": round(rss / GB, 3),
            "peak_rss_limit_gb": round(rss_limit / GB, 3),
            "rss_target_met": rss <= rss_limit,
            "throughput_target_met": ratio >= 0.5,
            "load_average_1min": [round(start_load, 2), round(os.getloadavg()[0], 2)],
        }
        print(json.dumps(summary, indent=2))
        print(
            f"targets: peak RSS {rss / GB:.2f} <= {rss_limit / GB:.2f} GB: {summary['rss_target_met']}; "
            f"throughput {ratio:.0%} of the copy >= 50%: {summary['throughput_target_met']}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
