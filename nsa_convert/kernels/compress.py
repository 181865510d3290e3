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

from nsa_convert.kernels.banded import n_visible

ROWS = 16
"""(sequence, block, head) rows per program: the smallest tile the matrix units take."""
TILE = 8192
"""Elements of a weight tile (head dim × hidden units at a time): 16 KB in bf16, 32 KB in float32."""


@triton.jit
def _compress_kernel(
    X, POS, W1, B1, W2, B2, OUT, PADS,
    sx_b, sx_h, sx_t, so_b, so_h, so_t, sw1, sw2,
    end, first, n_new, n_rows,
    HEADS: tl.constexpr, MAX_NEW: tl.constexpr, SPAN: tl.constexpr, STRIDE: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, HIDDEN: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Rows r = (b·MAX_NEW + j)·HEADS + h: candidate j of sequence b, the j-th last block it may complete.

    The hidden layer goes BH units at a time (fc1's columns of those units for each token, then their
    share of fc2), so the weight tiles a program holds stay small whatever the head and hidden sizes.
    """
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    h = (r % HEADS).to(tl.int64)
    j = r // HEADS % MAX_NEW
    b = (r // (HEADS * MAX_NEW)).to(tl.int64)
    pad = tl.load(PADS + b, mask=r < n_rows, other=0)
    length = end - pad
    # Blocks complete in L tokens: those the token at L − 1 sees.
    block = n_visible(length - 1, STRIDE, SPAN) - MAX_NEW + j
    ok = (r < n_rows) & (block >= n_visible(length - n_new - 1, STRIDE, SPAN))
    start = tl.where(ok, pad + block * STRIDE - first, 0).to(tl.int64)
    d = tl.arange(0, BD)
    hid = tl.arange(0, BH)
    x_at = X + b[:, None] * sx_b + h[:, None] * sx_h + d[None, :]
    x_ok = ok[:, None] & (d[None, :] < D)
    pos_at = POS + d
    out = tl.zeros([BR, BD], tl.float32)
    for t in range(SPAN):
        out += tl.load(x_at + (start + t)[:, None] * sx_t, mask=x_ok, other=0.0).to(tl.float32)
        out += tl.load(pos_at + t * D, mask=d < D, other=0.0).to(tl.float32)[None, :]
    out = out / SPAN + tl.load(B2 + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    for h0 in range(0, HIDDEN, BH):
        unit = h0 + hid
        w1_ok = (d[:, None] < D) & (unit[None, :] < HIDDEN)
        acc = tl.zeros([BR, BH], tl.float32)
        for t in range(SPAN):
            x = tl.load(x_at + (start + t)[:, None] * sx_t, mask=x_ok, other=0.0).to(tl.float32)
            x += tl.load(pos_at + t * D, mask=d < D, other=0.0).to(tl.float32)[None, :]
            w1 = tl.load(W1 + unit[None, :] * sw1 + (t * D + d)[:, None], mask=w1_ok, other=0.0)
            acc = tl.dot(x.to(w1.dtype), w1, acc, input_precision=PRECISION)
        acc += tl.load(B1 + unit, mask=unit < HIDDEN, other=0.0).to(tl.float32)[None, :]
        act = acc * tl.sigmoid(acc)
        w2_ok = (unit[:, None] < HIDDEN) & (d[None, :] < D)
        w2 = tl.load(W2 + d[None, :] * sw2 + unit[:, None], mask=w2_ok, other=0.0)
        out = tl.dot(act.to(w2.dtype), w2, out, input_precision=PRECISION)
    tl.store(
        OUT + b[:, None] * so_b + h[:, None] * so_h + block.to(tl.int64)[:, None] * so_t + d[None, :],
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
    shapes = (pos.shape, w1.shape[1], b1.shape, w2.shape, b2.shape, out.shape[-1])
    if shapes != ((span, dim), span * dim, (hidden,), (dim, hidden), (dim,), dim):
        raise ValueError(f"φ's weights do not fit blocks of {span} tokens of dimension {dim}: {shapes}")
    max_new = triton.cdiv(n_new, stride)
    rows = batch * max_new * heads
    bd = max(16, triton.next_power_of_2(dim))
    _compress_kernel[(triton.cdiv(rows, ROWS),)](
        x, pos, w1, b1, w2, b2, out, pads,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        w1.stride(0), w2.stride(0),
        end, first, n_new, rows,
        HEADS=heads, MAX_NEW=max_new, SPAN=span, STRIDE=stride, D=dim, BD=bd, HIDDEN=hidden,
        BH=max(16, min(triton.next_power_of_2(hidden), TILE // bd)), BR=ROWS,
        PRECISION="ieee" if w1.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip
