"""A/B sweep of the selected backward's launch configs (`NSA_SLC_DQ`, `NSA_SLC_DKDV`) in one process.

    python3 benchmarks/sweep_selected.py [--seqlen 65536] [--configs paper-G16 llama-G4] \\
        [--dq "" 2,16 2,32] [--dkdv 32,4,2,1024,16 64,8,2,1024,32] [--json PATH]

Each config builds `bench_attention.branch_steps`' random inputs once and runs the forward steps, so the
selected backward sees real lse, selections and gates. Every variant (one override; "" is the default for
both) then runs `slc bwd` once on zeroed dq, to compare dq, the gate gradients, dk and dv with the
default's (other key tiles change the float32 summation order: about 1e-6 of the largest value; anything
near 1 is a bug), and is timed (median of `triton.testing.do_bench`). The overrides are read at each
launch, so one process can time them all; `training_occupancy.py` gives their registers offline.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from bench_attention import CONFIGS, PARAMS, _bench, branch_steps

from nsa_convert.kernels import buffers

FORWARD = ("cmp fwd", "select", "slc fwd", "win fwd")
GRADIENTS = ("dq", "dg", "dk", "dv")
OVERRIDES = ("NSA_SLC_DQ", "NSA_SLC_DKDV")


def variants(dq: list[str], dkdv: list[str]) -> list[tuple[str, str]]:
    """(environment variable, value) pairs: the default first, then each override on its own."""
    return [("", "")] + [("NSA_SLC_DQ", x) for x in dq if x] + [("NSA_SLC_DKDV", x) for x in dkdv if x]


def run_variant(step, outputs: dict, name: str, value: str) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of one `slc bwd` launch from zeroed dq, and its median milliseconds, under one override
    (set only while it runs)."""
    if name:
        os.environ[name] = value
    try:
        outputs["dq"].zero_()
        step()
        grads = {g: outputs[g].clone() for g in GRADIENTS}
        grads["dg"] = grads["dg"][
            ..., 1
        ]  # the selected branch's gate column; the others are not written here
        return grads, _bench(step)
    finally:
        os.environ.pop(name, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=65536)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--dq", nargs="*", default=["2,16", "2,32", "4,32"])
    ap.add_argument("--dkdv", nargs="*", default=["64,8,2,1024,32", "32,4,2,1024,16", "32,4,2,1024,32"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    buffers.POISON = False
    for name in OVERRIDES:  # "default" must mean the kernels' own settings, not the shell's
        os.environ.pop(name, None)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | T={args.seqlen}")
    print("| config | override | slc bwd ms | vs default | max |Δ| / max |ref| (dq, dg, dk, dv) |")
    print("|---|---|---|---|---|")
    records = []
    for config in args.configs:
        steps, outputs = branch_steps(*CONFIGS[config], args.seqlen, PARAMS)
        for name in FORWARD:
            steps[name]()
        ref, base = None, None
        for name, value in variants(args.dq, args.dkdv):
            grads, ms = run_variant(steps["slc bwd"], outputs, name, value)
            if ref is None:
                ref, base = grads, ms
            errors = [((grads[g] - ref[g]).abs().max() / ref[g].abs().max()).item() for g in GRADIENTS]
            label = f"{name}={value}" if name else "default"
            print(
                f"| {config} | {label} | {ms:.2f} | {base / ms:.2f}× | {', '.join(f'{e:.1e}' for e in errors)} |",
                flush=True,
            )
            records.append(
                dict(config=config, override=label, ms=ms, errors=dict(zip(GRADIENTS, errors, strict=True)))
            )
        del steps, outputs, ref, grads
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(device=torch.cuda.get_device_name(), seqlen=args.seqlen, rows=records), f, indent=1
            )


if __name__ == "__main__":
    main()
