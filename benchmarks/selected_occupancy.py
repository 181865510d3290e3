"""Resources of the selected-branch training kernels on an H100, without a GPU: compiled for sm_90 at 64k.

    PYTHONPATH=PATH_TO_TRITON_3.6 python3 benchmarks/selected_occupancy.py paper-G16 [65536]
    NSA_SLC_DQ=2,16 PYTHONPATH=... python3 benchmarks/selected_occupancy.py llama-G4

The host code of `selected_backward` and of the position-by-position `selected_forward` runs on meta
tensors with the launch parameters the GPU would get (the `NSA_SLC_*` overrides apply as on the GPU); its
launches are recorded and compiled as in `decode_occupancy.py`, which prints registers, spilled stack,
shared memory, programs per multiprocessor and waves. The selection's inversion needs data, so its outputs
are stand-ins of the right sizes (the grid of the dk/dv pass is its static upper bound).
"""

import argparse
from types import SimpleNamespace

import torch
import triton
from bench_attention import CONFIGS, PARAMS
from decode_occupancy import Recorder, compile_call

from nsa_convert.kernels import selected

KERNELS = ("selected_fwd_kernel", "selected_dq_kernel", "selected_dkdv_kernel", "selected_dkdv_reduce_kernel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("context", type=int, nargs="?", default=65536)
    args = parser.parse_args()
    _, hq, hkv, dim = CONFIGS[args.config]
    seq_len = args.context
    params = PARAMS.resolved(dim)
    half = dict(device="meta", dtype=torch.bfloat16)
    single = dict(device="meta", dtype=torch.float32)
    q, do = (torch.empty(seq_len, hq, dim, **half) for _ in range(2))
    k, v = (torch.empty(seq_len, hkv, dim, **half) for _ in range(2))
    gates = torch.empty(seq_len, hq, 3, **half)
    lse, delta = (torch.empty(seq_len, hq, 3, **single) for _ in range(2))
    dq, acc = (torch.empty(seq_len, hq, dim, **single) for _ in range(2))
    dk, dv = (torch.empty(seq_len, hkv, dim, **single) for _ in range(2))
    idx = torch.empty(seq_len, hkv, params.top_n, dtype=torch.int64, device="meta")
    cu = torch.empty(2, dtype=torch.int32, device="meta")

    def inversion(idx, cu, max_blocks, chunk, **_):
        cells, segments = idx.numel(), hkv * max_blocks
        sizes = (cells, cells, segments + 1, segments + triton.cdiv(cells, chunk), segments + 1)
        types = (torch.int32, torch.int64, torch.int64, torch.int32, torch.int64)  # as invert_selection's
        return tuple(torch.empty(n, dtype=t, device="meta") for n, t in zip(sizes, types, strict=True))

    calls = []
    for name in KERNELS:
        setattr(selected, name, Recorder(getattr(selected, name), calls))
    selected.invert_selection = inversion
    selected.BLOCKS_BELOW_GROUP = 0  # the position-by-position forward (the block one needs host offsets)
    # The config functions ask a tensor only its device (and shape): give them a CUDA one's answers.
    dkdv_config, dq_config, gather = selected._dkdv_config, selected._dq_config, selected._gather_consts
    selected._dkdv_config = lambda x, block: dkdv_config(_on_cuda(x), block)
    selected._dq_config = lambda x, block: dq_config(_on_cuda(x), block)
    selected._gather_consts = lambda x, *rest: gather(_on_cuda(x), *rest)
    selected.selected_forward(q, k, v, idx, gates, acc, lse, cu, seq_len, params, accumulate=True)
    selected.selected_backward(
        q, k, v, idx, gates, do, lse, dq, delta, dk, dv, cu, seq_len, params, accum_dq=True
    )
    print(f"{args.config} T={seq_len}")
    for call in calls:
        compile_call(*call)


def _on_cuda(x: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cuda"), shape=x.shape)


if __name__ == "__main__":
    main()
