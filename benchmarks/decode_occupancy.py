"""Occupancy of the decode kernels on an H100, without a GPU: each kernel compiled for sm_90 at a benchmark shape.

    PYTHONPATH=PATH_TO_TRITON_3.6 python3 benchmarks/decode_occupancy.py paper-G16 16 [65536]

The host code of `kernels/decode.py` runs on meta tensors (132 multiprocessors, PDL on), its four launches are
recorded instead of run, and each is compiled with the specialisation a launch would get (pointers and
multiples of 16 aligned, integers equal to 1 constant). Prints registers, spilled stack, shared memory,
programs per multiprocessor (the tighter of the register and shared-memory limits) and waves. Registers
depend on the Triton version: the device's Triton 3.6 (`pip install --target DIR triton==3.6.0`, then
PYTHONPATH=DIR) reproduced Nsight Compute's registers, grids and waves exactly on the H100 (RESULTS.md).

With --ptx DIR, each launch's PTX is also written to DIR/NN_kernel.ptx without its debug line information:
a refactor that leaves the PTX of two trees identical (`diff -r`) needs no GPU timing.
"""

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from bench_decode import CONFIGS, PARAMS
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nsa_convert.kernels import decode as d
from nsa_convert.spec import num_compressed_blocks

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
TYPES = {
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.float16: "*fp16",
}
LAUNCH = {"num_warps", "num_stages", "launch_pdl", "maxnreg"}
LINE_INFO = re.compile(r"\s*(\.loc\b|\.file\b|//)")


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` appends the launch to `calls`."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, grid, args, kwargs))


def compile_call(fn, grid, args, kwargs, ptx: Path | None = None) -> None:
    """Compile one recorded launch for sm_90 and print its resources; write its PTX to the file `ptx`,
    when given."""
    names = fn.arg_names
    sig, constexprs, attrs = {}, {}, {}
    values = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH})
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                constexprs[name] = 1
            else:
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(name)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    options.setdefault("num_warps", 4)
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET, options=options)
    if ptx is not None:
        ptx.write_text(without_line_info(k.asm["ptx"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = k.metadata.shared
    threads = 32 * options["num_warps"]
    by_regs = 65536 // (((regs + 7) // 8 * 8) * threads)
    by_smem = (228 * 1024) // (shared + 1024)
    blocks = min(by_regs, by_smem, 64 // options["num_warps"], 32)
    programs = 1
    for g in grid:
        programs *= g
    print(
        f"{fn.__name__:20} grid {programs:6}  regs {regs:4}  stack {stack:5}  shared {shared / 1024:6.1f} KB  "
        f"blocks/SM {blocks} (regs {by_regs}, shared {by_smem})  waves {programs / (132 * blocks):.2f}"
    )


def without_line_info(ptx: str) -> str:
    """The PTX without what changes when only source lines move: .loc/.file directives, comments, the
    labels that mark inlined calls, and the debug sections."""
    ptx = re.sub(r"\.section\s+\.debug.*", "", ptx, flags=re.S)
    ptx = re.sub(r"\$L__(tmp|func_begin|func_end)\d+:?", "", ptx)
    return "\n".join(line for line in ptx.splitlines() if line.strip() and not LINE_INFO.match(line))


def compile_calls(calls: list[tuple], ptx_dir: Path | None) -> None:
    """Compile the recorded launches in order (PTX to ptx_dir/NN_kernel.ptx when given)."""
    if ptx_dir is not None:
        ptx_dir.mkdir(parents=True, exist_ok=True)
    for i, call in enumerate(calls, 1):
        compile_call(*call, ptx=None if ptx_dir is None else ptx_dir / f"{i:02d}_{call[0].__name__}.ptx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("batch", type=int)
    parser.add_argument("context", type=int, nargs="?", default=65536)
    parser.add_argument("--ptx", type=Path, help="also write each launch's PTX into this directory")
    args = parser.parse_args()
    name, batch, seq_len = args.config, args.batch, args.context
    hq, hkv, dim = CONFIGS[name]
    tc = num_compressed_blocks(seq_len, PARAMS.compress_block, PARAMS.compress_stride)
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(batch, 1, hq, dim, **meta)
    k, v = (torch.empty(batch, hkv, seq_len, dim, **meta).transpose(1, 2) for _ in range(2))
    kc, vc = (torch.empty(batch, hkv, tc, dim, **meta).transpose(1, 2) for _ in range(2))
    gates = torch.empty(batch, 1, hq, 3, **meta)
    lens = torch.empty(batch, dtype=torch.int32, device="meta")
    calls = []
    for kernel in ("_cmp_window_kernel", "_select_kernel", "_selected_kernel", "_combine_kernel"):
        setattr(d, kernel, Recorder(getattr(d, kernel), calls))
    d.multiprocessors = lambda device, stand_in: 132
    d._use_pdl = lambda device: True
    d.nsa_decode(q, k, v, kc, vc, gates, lens, PARAMS)
    print(f"{name} B={batch} T={seq_len}, Triton {triton.__version__}")
    compile_calls(calls, args.ptx)


if __name__ == "__main__":
    main()
