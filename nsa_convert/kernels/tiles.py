"""Masked loads of gathered tiles: the load shapes the attention kernels here have in common.

A tile gathers `index.shape[0]` cache rows (token positions, compressed entries, selected keys) of one
head, each `stride` elements apart, and the first WIDTH of the `cols` columns; rows where `ok` is false
and padded columns read as zeros, so they add nothing to a matrix product. `load_rows` gives the tile as
stored ([rows, cols]: the operand of p·V, or of dsᵀ·K); `load_cols` its transpose ([cols, rows]: the Kᵀ
of q·Kᵀ or the Vᵀ of dO·Vᵀ), loaded transposed rather than transposed in registers. `load_pairs` gathers
the query-side rows (q, dO) of (token, query head) pairs, the flattened rows of a group-centric program.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(base, index, ok, stride, cols, WIDTH: tl.constexpr):
    """[len(index), len(cols)]: element (i, c) at base + index[i]·stride + cols[c]."""
    return tl.load(
        base + index[:, None] * stride + cols[None, :],
        mask=ok[:, None] & (cols[None, :] < WIDTH),
        other=0.0,
    )


@triton.jit
def load_cols(base, index, ok, stride, cols, WIDTH: tl.constexpr):
    """[len(cols), len(index)]: element (c, i) at base + index[i]·stride + cols[c]."""
    return tl.load(
        base + index[None, :] * stride + cols[:, None],
        mask=ok[None, :] & (cols[:, None] < WIDTH),
        other=0.0,
    )


@triton.jit
def load_pairs(base, tok, head, ok, stride_t, stride_h, cols, WIDTH: tl.constexpr):
    """[len(tok), len(cols)]: element (i, c) at base + tok[i]·stride_t + head[i]·stride_h + cols[c]."""
    return tl.load(
        base + tok[:, None] * stride_t + head[:, None] * stride_h + cols[None, :],
        mask=ok[:, None] & (cols[None, :] < WIDTH),
        other=0.0,
    )
