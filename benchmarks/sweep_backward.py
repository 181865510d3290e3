"""A/B sweep of the backward's launch configs in one process: the selected branch's (`NSA_SLC_DQ`,
`NSA_SLC_DKDV`) and the banded branches' (`NSA_BANDED_DQ`, `NSA_BANDED_DKDV`).

    python3 benchmarks/sweep_backward.py [--seqlen 65536] [--configs paper-G16 llama-G4] \\
        [--slc-dq 2,16 2,32] [--slc-dkdv 32,4,2,1024,16] [--banded-dq 64,32,4,2] \\
        [--banded-dkdv 64,64,8,2 32,32,4,2] [--json PATH]

Each config builds `bench_attention.branch_steps`' random inputs once and runs the forward steps, so the
backward sees real lse, selections and gates. Every variant (one override; "default" is none) runs each
backward step it changes (`slc bwd` for the selected overrides, `cmp bwd` and `win bwd` for the banded ones)
once on zeroed gradients, to compare them with the default's (other tiles change the float32 summation
order, and through bf16-rounded products, up to about 1e-3 of the largest value; anything near 1 is a
bug), and is timed (median of `triton.testing.do_bench`). The overrides are read at each launch, so one
process can time them all; `training_occupancy.py` gives their registers offline. (Named
`sweep_selected.py`, selected overrides only, until the seventh session of 2026-12-08.)
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from bench_attention import CONFIGS, PARAMS, _bench, branch_steps

from nsa_convert.kernels import buffers

FORWARD = ("cmp fwd", "select", "slc fwd", "win fwd")
STEPS = {
    # backward step: (its gradients, its gate column, the gradients it adds to)
    "cmp bwd": (("dq", "dkc", "dvc"), 0, ()),
    "slc bwd": (("dq", "dk", "dv"), 1, ("dq",)),
    "win bwd": (("dq", "dk", "dv"), 2, ("dq", "dk", "dv")),
}
OVERRIDES = {
    "NSA_SLC_DQ": ("slc bwd",),
    "NSA_SLC_DKDV": ("slc bwd",),
    "NSA_BANDED_DQ": ("cmp bwd", "win bwd"),
    "NSA_BANDED_DKDV": ("cmp bwd", "win bwd"),
}


def variants(values: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(environment variable, value) pairs: the default first, then each override on its own."""
    return [("", "")] + [(name, x) for name, xs in values.items() for x in xs if x]


def run_variant(step, outputs: dict, name: str, value: str, step_name: str) -> tuple[dict, float]:
    """Gradients of one backward step from zeroed accumulators, and its median milliseconds, under one
    override (set only while it runs)."""
    grads, column, accumulated = STEPS[step_name]
    if name:
        os.environ[name] = value
    try:
        for g in accumulated:
            outputs[g].zero_()
        step()
        result = {g: outputs[g].clone() for g in grads}
        result["dg"] = outputs["dg"][..., column].clone()  # the other columns are not written here
        return result, _bench(step)
    finally:
        os.environ.pop(name, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=65536)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--slc-dq", nargs="*", default=[])
    ap.add_argument("--slc-dkdv", nargs="*", default=[])
    ap.add_argument("--banded-dq", nargs="*", default=[])
    ap.add_argument("--banded-dkdv", nargs="*", default=[])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    values = {name: getattr(args, name[4:].lower()) for name in OVERRIDES}
    buffers.POISON = False
    for name in OVERRIDES:  # "default" must mean the kernels' own settings, not the shell's
        os.environ.pop(name, None)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | T={args.seqlen}")
    print("| config | step | override | ms | vs default | max |Δ| / max |ref| of each gradient |")
    print("|---|---|---|---|---|---|")
    records = []
    for config in args.configs:
        steps, outputs = branch_steps(*CONFIGS[config], args.seqlen, PARAMS)
        for name in FORWARD:
            steps[name]()
        defaults: dict[str, tuple[dict, float]] = {}
        for name, value in variants(values):
            for step_name in OVERRIDES.get(name, tuple(STEPS)):
                grads, ms = run_variant(steps[step_name], outputs, name, value, step_name)
                ref, base = defaults.setdefault(step_name, (grads, ms))
                errors = {g: ((grads[g] - ref[g]).abs().max() / ref[g].abs().max()).item() for g in grads}
                label = f"{name}={value}" if name else "default"
                print(
                    f"| {config} | {step_name} | {label} | {ms:.2f} | {base / ms:.2f}× | "
                    f"{', '.join(f'{g} {e:.1e}' for g, e in errors.items())} |",
                    flush=True,
                )
                records.append(dict(config=config, step=step_name, override=label, ms=ms, errors=errors))
        del steps, outputs, defaults, grads, ref
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(device=torch.cuda.get_device_name(), seqlen=args.seqlen, rows=records), f, indent=1
            )


if __name__ == "__main__":
    main()
