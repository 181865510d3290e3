"""Triton incremental compression for decoding: φ on the blocks the newest tokens complete, in one launch.

Eager φ on gathered blocks costs a dozen launches and, to build its indices, host-to-device copies that
wait for the GPU.  Here the indices come from the cache's device-side left padding, so a decode step
never syncs: each row of a program is one (sequence, candidate block, KV head); a sequence completes at
most cdiv(n, d) blocks in n new tokens, and candidates that complete nothing write nothing.  A program
streams the block's l tokens once, folding each into fc1 (one matrix product per token against that
token's columns of fc1's weight) and into the block mean, then applies the activation and fc2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16
"""(sequence, block, head) rows per program: the smallest tile the matrix units take."""


@triton.jit
def _num_blocks(length, SPAN: tl.constexpr, STRIDE: tl.constexpr):
    return tl.where(length >= SPAN, (length - SPAN) // STRIDE + 1, 0)


@triton.jit
def _compress_kernel(
    X, POS, W1, B1, W2, B2, OUT, PADS,
    sx_b, sx_h, sx_t, so_b, so_h, so_t, sw1, sw2,
    end, first, n_new, n_rows,
    HEADS: tl.constexpr, MAX_NEW: tl.constexpr, SPAN: tl.constexpr, STRIDE: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, HIDDEN: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Rows r = (b·MAX_NEW + j)·HEADS + h: candidate j of sequence b, the j-th last block it may complete."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    h = r % HEADS
    j = r // HEADS % MAX_NEW
    b = r // (HEADS * MAX_NEW)
    pad = tl.load(PADS + b, mask=r < n_rows, other=0)
    length = end - pad
    block = _num_blocks(length, SPAN, STRIDE) - MAX_NEW + j
    ok = (r < n_rows) & (block >= 0) & (block >= _num_blocks(length - n_new, SPAN, STRIDE))
    start = tl.where(ok, pad + block * STRIDE - first, 0)
    d = tl.arange(0, BD)
    hid = tl.arange(0, BH)
    x_at = X + b.to(tl.int64)[:, None] * sx_b + h[:, None] * sx_h + d[None, :]
    x_ok = ok[:, None] & (d[None, :] < D)
    w1_ok = (d[:, None] < D) & (hid[None, :] < HIDDEN)
    total = tl.zeros([BR, BD], tl.float32)
    acc = tl.zeros([BR, BH], tl.float32)
    for t in range(SPAN):
        x = tl.load(x_at + (start + t).to(tl.int64)[:, None] * sx_t, mask=x_ok, other=0.0).to(tl.float32)
        x += tl.load(POS + t * D + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        total += x
        w1 = tl.load(W1 + hid[None, :] * sw1 + (t * D + d)[:, None], mask=w1_ok, other=0.0)
        acc = tl.dot(x.to(w1.dtype), w1, acc, input_precision=PRECISION)
    acc += tl.load(B1 + hid, mask=hid < HIDDEN, other=0.0).to(tl.float32)[None, :]
    act = acc * tl.sigmoid(acc)
    w2 = tl.load(
        W2 + d[None, :] * sw2 + hid[:, None], mask=(hid[:, None] < HIDDEN) & (d[None, :] < D), other=0.0
    )
    out = tl.dot(act.to(w2.dtype), w2, input_precision=PRECISION)
    out += tl.load(B2 + d, mask=d < D, other=0.0).to(tl.float32)[None, :] + total / SPAN
    tl.store(
        OUT
        + b.to(tl.int64)[:, None] * so_b
        + h[:, None] * so_h
        + block.to(tl.int64)[:, None] * so_t
        + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=x_ok,
    )


def compress_new_blocks(
    x: torch.Tensor,
    first: int,
    pads: torch.Tensor,
    end: int,
    n_new: int,
    stride: int,
    weights: tuple[torch.Tensor, ...],
    out: torch.Tensor,
) -> None:
    """Write φ of every block the last n_new tokens complete into out, in place.

    x [B, H, S, D]: raw tokens first … first + S − 1 of the batch's timeline (token p of sequence b at raw
    position pads[b] + p); pads (B,) int32 on x's device; end: raw positions held, the new tokens
    included; stride: d; out [B, H, capacity, D]: compressed keys or values, block i of sequence b at
    [b, :, i].  weights: φ's (pos [l, D], fc1 weight [hidden, l·D] and bias, fc2 weight [D, hidden] and
    bias), φ(block) = mean(block + pos) + fc2(silu(fc1(flatten(block + pos)))) as in `BlockCompressor`.
    """
    pos, w1, b1, w2, b2 = (w.detach().contiguous() for w in weights)
    batch, heads, _, dim = x.shape
    span, hidden = pos.shape[0], w1.shape[0]
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("compress_new_blocks needs a unit stride in the last dimension")
    max_new = triton.cdiv(n_new, stride)
    rows = batch * max_new * heads
    _compress_kernel[(triton.cdiv(rows, ROWS),)](
        x, pos, w1, b1, w2, b2, out, pads,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        w1.stride(0), w2.stride(0),
        end, first, n_new, rows,
        HEADS=heads, MAX_NEW=max_new, SPAN=span, STRIDE=stride, D=dim, BD=max(16, triton.next_power_of_2(dim)),
        HIDDEN=hidden, BH=max(16, triton.next_power_of_2(hidden)), BR=ROWS,
        PRECISION="ieee" if w1.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip
