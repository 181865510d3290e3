"""A/B sweep of the decode kernels: a baseline file of `kernels/decode.py` against variants of the current one.

    git show REV:nsa_convert/kernels/decode.py > /tmp/decode_base.py
    python3 benchmarks/sweep_decode.py --baseline /tmp/decode_base.py --variants "" "WAVES=3" "BC=64,SLOTS=1" \\
        "PDL=0" [--context 65536] [--cases paper-G16:16 llama-G4:16 paper-G16:1 llama-G4:1] [--json PATH]

A variant sets module constants of `nsa_convert.kernels.decode` (`NAME=INT`, comma-separated; "" is the
current file as it is) and `PDL=0` turns programmatic dependent launch off. Each case builds its inputs once
(`bench_decode.decode_inputs`: rotated copies, so no step finds its cache in L2). It then times the baseline
and every variant in the same process, each captured in a CUDA graph (`bench_decode.graph_ms`), twice. Every
output is checked against the baseline's: constants that change the summation order move it by about 1e-3
in bf16, anything larger is a bug. Variants that change code rather than constants need their own file as
the baseline, or the other way round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from types import ModuleType

import torch
from bench_decode import CONFIGS, PARAMS, decode_inputs, graph_ms

from nsa_convert.kernels import decode


def load_baseline(path: str) -> ModuleType:
    """The baseline decode kernels, imported from a file under a name of their own."""
    spec = importlib.util.spec_from_file_location("decode_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_variant(text: str) -> dict[str, int]:
    """'WAVES=3,BC=64' → {'WAVES': 3, 'BC': 64}; names must be the decode module's integer constants or PDL."""
    variant = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name != "PDL" and not isinstance(getattr(decode, name, None), int):
            raise SystemExit(
                f"variant {text!r}: {name} is not an integer constant of nsa_convert.kernels.decode"
            )
        variant[name] = int(value)
    return variant


def apply(variant: dict[str, int], defaults: dict[str, int], use_pdl) -> None:
    """Set the decode module's constants to defaults updated by variant (PDL through `_use_pdl`)."""
    for name, value in {**defaults, **variant}.items():
        if name != "PDL":
            setattr(decode, name, value)
    decode._use_pdl = use_pdl if variant.get("PDL", 1) else (lambda device: False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a copy of kernels/decode.py to compare against")
    parser.add_argument("--variants", nargs="+", default=[""])
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument(
        "--cases", nargs="+", default=["paper-G16:16", "llama-G4:16", "paper-G16:1", "llama-G4:1"]
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    baseline = load_baseline(args.baseline)
    variants = [parse_variant(text) for text in args.variants]
    defaults = {name: getattr(decode, name) for v in variants for name in v if name != "PDL"}
    use_pdl = decode._use_pdl
    torch.manual_seed(0)
    rows = []
    for case in args.cases:
        name, _, batch = case.partition(":")
        if name not in CONFIGS or not batch.isdigit():
            raise SystemExit(f"case {case!r}: expected CONFIG:BATCH with CONFIG one of {', '.join(CONFIGS)}")
        sets = decode_inputs(name, int(batch), args.context)
        views = [(s[0], *(x.transpose(1, 2) for x in s[1:5]), *s[5:]) for s in sets]
        expected = baseline.nsa_decode(*views[0], PARAMS)[0].float()
        for label, module, variant in [("baseline", baseline, {})] + [
            (text or "current", decode, v) for text, v in zip(args.variants, variants, strict=True)
        ]:
            if module is decode:
                apply(variant, defaults, use_pdl)
            out = module.nsa_decode(*views[0], PARAMS)[0].float()
            error = ((out - expected).norm() / expected.norm()).item()
            calls = [lambda v=v, step=module.nsa_decode: step(*v, PARAMS) for v in views]
            us = [1000 * graph_ms(calls) for _ in range(2)]
            rows.append({"case": case, "variant": label, "us": us, "error": error})
            print(f"{case:14} {label:24} {us[0]:8.2f} {us[1]:8.2f} µs   error {error:.1e}", flush=True)
        del sets, views
        torch.cuda.empty_cache()
    apply({}, defaults, use_pdl)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "context": args.context, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
