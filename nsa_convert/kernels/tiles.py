"""Masked loads of gathered key/value tiles, the one load shape every attention kernel here repeats.

A tile gathers `index.shape[0]` cache rows (token positions, compressed entries, selected keys) of one
head, each `stride` elements apart, and the first WIDTH of the `cols` columns; rows where `ok` is false
and padded columns read as zeros, so they add nothing to a matrix product. `load_rows` gives the tile as
stored ([rows, cols]: the operand of p·V, or of dsᵀ·K); `load_cols` its transpose ([cols, rows]: the Kᵀ of
q·Kᵀ), loaded transposed rather than transposed in registers.
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
