"""Resources of the training kernels on an H100, without a GPU: each launch compiled for sm_90 at 64k.

    PYTHONPATH=PATH_TO_TRITON_3.6 python3 benchmarks/training_occupancy.py paper-G16 [65536]
    NSA_SLC_DQ=2,16 PYTHONPATH=... python3 benchmarks/training_occupancy.py llama-G4

The launches of one forward and backward, branch by branch as `bench_attention.branch_steps` makes them
(the banded kernels of the compressed and window branches, the position-by-position selected forward and
the selected backward; the selection's launches are skipped, their parameters are chosen inline from the
device), run on meta tensors with the launch parameters the GPU would
get (the `NSA_SLC_*` and `NSA_BANDED_*` overrides apply as on the GPU). They are recorded and compiled as in
`decode_occupancy.py`, which prints registers, spilled stack, shared memory, programs per multiprocessor
and waves (with --ptx DIR, also the PTX, as there). The selection's inversion needs data, so its outputs
are stand-ins of the right sizes (the grid of the selected dk/dv pass is its static upper bound). (Named
`selected_occupancy.py`, selected kernels only, until the sixth session of 2026-12-07.)
"""

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from bench_attention import CONFIGS, PARAMS, branch_steps
from decode_occupancy import Recorder, compile_calls

from nsa_convert.kernels import banded, selected, selection

KERNELS = {
    banded: ("banded_fwd_kernel", "banded_bwd_dq_kernel", "banded_bwd_dkdv_kernel"),
    selected: (
        "selected_fwd_kernel",
        "selected_dq_kernel",
        "selected_dkdv_kernel",
        "selected_dkdv_reduce_kernel",
    ),
}
H100_SMS = 132


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("context", type=int, nargs="?", default=65536)
    parser.add_argument("--ptx", type=Path, help="also write each launch's PTX into this directory")
    args = parser.parse_args()
    hkv = CONFIGS[args.config][2]

    def inversion(idx, cu, max_blocks, chunk, **_):
        cells, segments = idx.numel(), hkv * max_blocks
        sizes = (cells, cells, segments + 1, segments + triton.cdiv(cells, chunk), segments + 1)
        types = (torch.int32, torch.int64, torch.int64, torch.int32, torch.int64)  # as invert_selection's
        return tuple(torch.empty(n, dtype=t, device="meta") for n, t in zip(sizes, types, strict=True))

    calls = []
    for module, names in KERNELS.items():
        for name in names:
            setattr(module, name, Recorder(getattr(module, name), calls))
    for name in ("select_scores_kernel", "select_topn_kernel"):
        setattr(selection, name, Recorder(getattr(selection, name), []))
    selected.invert_selection = inversion
    selected.BLOCKS_BELOW_GROUP = 0  # the position-by-position forward (the block one needs host offsets)
    # The config functions ask a tensor or device string only whether it is CUDA: give them a GPU's answers.
    dkdv_config, dq_config, gather = selected._dkdv_config, selected._dq_config, selected._gather_consts
    selected._dkdv_config = lambda x, block: dkdv_config(_on_cuda(x), block)
    selected._dq_config = lambda x, block: dq_config(_on_cuda(x), block)
    selected._gather_consts = lambda x, *rest: gather(_on_cuda(x), *rest)
    for name in ("_fwd_config", "_dq_config", "_dkdv_config"):
        config = getattr(banded, name)
        setattr(banded, name, lambda dk, dv, _, *rest, config=config: config(dk, dv, "cuda", *rest))
    splits = banded._dkdv_splits
    banded._dkdv_splits = lambda x, n, window: splits(_on_cuda(x), n, window)
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(multi_processor_count=H100_SMS)
    steps, _ = branch_steps(*CONFIGS[args.config], args.context, PARAMS, dev="meta")
    for step in steps.values():
        step()
    print(f"{args.config} T={args.context} (launches in the order of bench_attention's breakdown)")
    compile_calls(calls, args.ptx)


def _on_cuda(x: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cuda"), shape=x.shape)


if __name__ == "__main__":
    main()
