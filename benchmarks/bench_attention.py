"""NSA (Triton backend) against dense attention at long context: one table per run.

    python3 benchmarks/bench_attention.py [--seqlens 8192 16384 32768 65536] [--breakdown 65536]

Rows: T × config (paper-G16: B=1, Hq=64, Hkv=4, D=128; llama-G4: B=1, Hq=32, Hkv=8, D=128). Columns:
forward and forward+backward milliseconds (median of triton.testing.do_bench) for NSA at the paper's
defaults (l=32, d=16, l'=64, n=16, w=512; the compression MLP, gate sigmoid and all three branches
included), torch SDPA through cuDNN and through flash, FlexAttention with a 512-token sliding window,
and the ratio cuDNN / NSA. `--breakdown T` adds per-branch times and achieved TFLOP/s at that length.
"""

from __future__ import annotations

import argparse
import os
import subprocess

import torch
import torch.nn.functional as F
import triton
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa_convert.kernels import buffers, nsa_backward, nsa_forward
from nsa_convert.kernels.banded import FINAL, STORE_ACC, banded_backward, banded_forward
from nsa_convert.kernels.selected import selected_backward, selected_forward
from nsa_convert.kernels.selection import select_launch
from nsa_convert.spec import SparsityParams, num_compressed_blocks

CONFIGS = {"paper-G16": (1, 64, 4, 128), "llama-G4": (1, 32, 8, 128)}
PARAMS = SparsityParams()


class NSAFunction(torch.autograd.Function):
    """The Triton forward/backward as one autograd node (the project's custom op does the same)."""

    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, gates, params):
        out, lse, idx = nsa_forward(q, k, v, k_cmp, v_cmp, gates, params)
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, out, lse, idx)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, k_cmp, v_cmp, gates, out, lse, idx = ctx.saved_tensors
        grads = nsa_backward(grad_out, q, k, v, k_cmp, v_cmp, gates, None, None, out, lse, idx, ctx.params)
        return (*grads[:6], None)


class Compressor(nn.Module):
    """Stand-in for nsa_convert.nn's φ: block mean + residual MLP on the flattened block (same shapes)."""

    def __init__(self, dim: int, block: int, stride: int):
        super().__init__()
        self.block, self.stride = block, stride
        self.fc1 = nn.Linear(block * dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        blocks = x.unfold(1, self.block, self.stride).transpose(-1, -2)  # [B, Tc, H, l, D]
        return blocks.mean(-2) + self.fc2(F.silu(self.fc1(blocks.flatten(-2))))


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _fwd_bwd(fn, inputs):
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def bench_nsa(b, hq, hkv, d, t, params):
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(b, t, h, d, device=dev, dtype=dt, requires_grad=True) for h in (hq, hkv, hkv))
    gate_logits = torch.randn(b, t, hq, 3, device=dev, dtype=dt, requires_grad=True)
    ck = Compressor(d, params.compress_block, params.compress_stride).to(dev, dt)
    cv = Compressor(d, params.compress_block, params.compress_stride).to(dev, dt)
    p = params.resolved(d)

    def fwd():
        return NSAFunction.apply(q, k, v, ck(k), cv(v), torch.sigmoid(gate_logits), p)

    with torch.no_grad():
        f = _bench(fwd)
    fb = _bench(_fwd_bwd(fwd, [q, k, v, gate_logits, *ck.parameters(), *cv.parameters()]))
    return f, fb


def bench_sdpa(b, hq, hkv, d, t, backend):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, hq, t, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(b, hkv, t, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))

    def fwd():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        with torch.no_grad():
            f = _bench(fwd)
        fb = _bench(_fwd_bwd(fwd, [q, k, v]))
    except RuntimeError as err:
        print(f"# SDPA {backend} failed at T={t}: {str(err).splitlines()[0]}")
        return float("nan"), float("nan")
    return f, fb


_flex = None


def bench_flex(b, hq, hkv, d, t, window):
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex is None:
        # one compile per shape and grad mode: 2 configs × 4 lengths × 2 exceed dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = 64
        _flex = torch.compile(flex_attention, dynamic=False)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, hq, t, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(b, hkv, t, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))

    def sliding(b_, h_, qi, ki):
        return (qi >= ki) & (qi - ki < window)

    mask = create_block_mask(sliding, None, None, t, t, device=dev)

    def fwd():
        return _flex(q, k, v, block_mask=mask, enable_gqa=True)

    with torch.no_grad():
        f = _bench(fwd)
    return f, _bench(_fwd_bwd(fwd, [q, k, v]))


def _pairs(t, params):
    """Visible (query, key) pairs per query head, per branch: compressed, selected, window."""
    pos = torch.arange(t, dtype=torch.float64)
    nvis = torch.where(
        pos + 1 >= params.compress_block, (pos + 1 - params.compress_block) // params.compress_stride + 1, 0
    )
    slc = torch.minimum(pos + 1, torch.tensor(float(params.top_n * params.block_size)))
    win = torch.minimum(pos + 1, torch.tensor(float(params.window)))
    return nvis.sum().item(), slc.sum().item(), win.sum().item()


def branch_steps(b, hq, hkv, d, t, params, dev="cuda", dt=torch.bfloat16):
    """The kernel launches of one NSA forward + backward, branch by branch, on random inputs: (steps, outputs).
    Run in order, each step's inputs are the earlier steps' outputs (lse, selections)."""
    from nsa_convert.kernels.nsa import _batch_cu, _pack

    p = params.resolved(d)
    tc = num_compressed_blocks(t, p.compress_block, p.compress_stride)
    q = _pack(torch.randn(b, t, hq, d, device=dev, dtype=dt))
    k, v = (_pack(torch.randn(b, t, hkv, d, device=dev, dtype=dt)) for _ in range(2))
    kc, vc = (_pack(torch.randn(b, tc, hkv, d, device=dev, dtype=dt)) for _ in range(2))
    gates = _pack(torch.rand(b, t, hq, 3, device=dev, dtype=dt))
    do = torch.randn_like(q)
    cu, cu_c = _batch_cu(b, t, dev), _batch_cu(b, tc, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    acc, lse = torch.empty(b * t, hq, d, **f32), torch.empty(b * t, hq, 3, **f32)
    out = torch.empty_like(q)
    idx = torch.empty(b * t, hkv, p.top_n, dtype=torch.int64, device=dev)
    dq, dg = torch.empty(b * t, hq, d, **f32), torch.empty(b * t, hq, 3, **f32)
    dkc, dvc = torch.empty(b * tc, hkv, d, **f32), torch.empty(b * tc, hkv, d, **f32)
    dk, dv = torch.empty(b * t, hkv, d, **f32), torch.empty(b * t, hkv, d, **f32)
    cmp = dict(stride=p.compress_stride, span=p.compress_block, window=0, branch=0, scale=p.scale)
    win = dict(stride=1, span=1, window=p.window, branch=2, scale=p.scale)
    steps = {
        "cmp fwd": lambda: banded_forward(
            q, kc, vc, gates, acc, None, lse, cu, cu_c, t, mode=STORE_ACC, **cmp
        ),
        "select": lambda: select_launch(q, kc, lse[..., 0], idx, cu, cu_c, t, p),
        "slc fwd": lambda: selected_forward(q, k, v, idx, gates, acc, lse, cu, t, p, accumulate=True),
        "win fwd": lambda: banded_forward(q, k, v, gates, acc, out, lse, cu, cu, t, mode=FINAL, **win),
        "cmp bwd": lambda: banded_backward(
            q,
            kc,
            vc,
            gates,
            do,
            lse,
            dq,
            dg,
            dkc,
            dvc,
            cu,
            cu_c,
            t,
            tc,
            accum_dq=False,
            accum_dkv=False,
            **cmp,
        ),
        "slc bwd": lambda: selected_backward(
            q, k, v, idx, gates, do, lse, dq, dg, dk, dv, cu, t, p, accum_dq=True
        ),
        "win bwd": lambda: banded_backward(
            q, k, v, gates, do, lse, dq, dg, dk, dv, cu, cu, t, t, accum_dq=True, accum_dkv=True, **win
        ),
    }
    return steps, dict(dq=dq, dg=dg, dk=dk, dv=dv, dkc=dkc, dvc=dvc, out=out, lse=lse, idx=idx)


def breakdown(b, hq, hkv, d, t, params, matmul_tflops):
    """Per-branch milliseconds and TFLOP/s (4·D flops per visible pair forward, 10·D backward)."""
    steps, _ = branch_steps(b, hq, hkv, d, t, params)
    p = params.resolved(d)
    n_cmp, n_slc, n_win = _pairs(t, p)
    pairs = {"cmp": n_cmp, "select": n_cmp / 2, "slc": n_slc, "win": n_win}
    rows = []
    for name, fn in steps.items():
        fn()
        ms = _bench(fn)
        branch, kind = name.split()[0], "fwd" if name.endswith("fwd") or name == "select" else "bwd"
        flops = b * hq * pairs[branch] * d * (4 if kind == "fwd" else 10)
        rows.append((name, ms, flops / ms / 1e9))
    print(
        f"\nPer-branch breakdown, T={t}, B={b} Hq={hq} Hkv={hkv} D={d} (matmul {matmul_tflops:.0f} TFLOP/s)"
    )
    print("| step | ms | TFLOP/s | % of matmul |")
    print("|---|---|---|---|")
    for name, ms, tf in rows:
        print(f"| {name} | {ms:.2f} | {tf:.0f} | {100 * tf / matmul_tflops:.0f}% |")


def matmul_rate() -> float:
    a, b_ = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = _bench(lambda: a @ b_)
    return 2 * 8192**3 / ms / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--breakdown", type=int, nargs="*", default=[])
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    buffers.POISON = False
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = os.environ.get("NSA_BENCH_COMMIT", git.stdout.strip())  # the device's tree copy has no .git
    rate = matmul_rate()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"# commit {commit or '?'} | bf16 matmul 8192³: {rate:.0f} TFLOP/s")
    header = "| config | T | NSA fwd | NSA f+b | cuDNN fwd | cuDNN f+b | flash fwd | flash f+b | flex-w512 fwd | flex-w512 f+b | cuDNN/NSA fwd | cuDNN/NSA f+b |"
    lines = [header, "|" + "---|" * 12]
    for t in args.seqlens:
        for name in args.configs:
            cfg = CONFIGS[name]
            nf, nfb = bench_nsa(*cfg, t, PARAMS)
            cf, cfb = bench_sdpa(*cfg, t, SDPBackend.CUDNN_ATTENTION)
            ff, ffb = bench_sdpa(*cfg, t, SDPBackend.FLASH_ATTENTION)
            xf, xfb = (float("nan"),) * 2 if args.no_flex else bench_flex(*cfg, t, PARAMS.window)
            lines.append(
                f"| {name} | {t // 1024}k | {nf:.2f} | {nfb:.2f} | {cf:.2f} | {cfb:.2f} | {ff:.2f} | {ffb:.2f} "
                f"| {xf:.2f} | {xfb:.2f} | {cf / nf:.2f}× | {cfb / nfb:.2f}× |"
            )
            print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    for t in args.breakdown:
        for name in args.configs:
            breakdown(*CONFIGS[name], t, PARAMS, rate)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
