"""The masked gather loads of kernels/tiles.py under the interpreter, against torch indexing.

Every attention kernel reads its K/V tiles and q/dO rows through these helpers, so their contract (which
element lands where, and that masked rows and padded columns read as zero) is pinned down on its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_convert.kernels.tiles import load_cols, load_pairs, load_rows

ROWS, COLS, WIDTH = 16, 32, 24
"""Tile rows, padded columns, and the columns that exist (WIDTH < COLS: the padding must read as zero)."""


@triton.jit
def _tiles_kernel(X, INDEX, HEAD, OK, ROWS_OUT, COLS_OUT, PAIRS_OUT, stride_t, stride_h,
                  R: tl.constexpr, C: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """Load one tile with each helper and store it whole, padding included."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    index = tl.load(INDEX + r).to(tl.int64)
    head = tl.load(HEAD + r)
    ok = tl.load(OK + r) != 0
    rows = load_rows(X, index, ok, stride_t, c, WIDTH)
    tl.store(ROWS_OUT + r[:, None] * C + c[None, :], rows)
    cols = load_cols(X, index, ok, stride_t, c, WIDTH)
    tl.store(COLS_OUT + c[:, None] * R + r[None, :], cols)
    pairs = load_pairs(X, index, head, ok, stride_t, stride_h, c, WIDTH)
    tl.store(PAIRS_OUT + r[:, None] * C + c[None, :], pairs)


def _expected(
    x: torch.Tensor, index: torch.Tensor, head: torch.Tensor | None, ok: torch.Tensor
) -> torch.Tensor:
    """[ROWS, COLS]: x[index, head, :WIDTH] (head 0 when None), zero in masked rows and padded columns."""
    picked = x[index, 0 if head is None else head, :WIDTH]
    out = torch.zeros(ROWS, COLS, dtype=x.dtype)
    out[:, :WIDTH] = torch.where(ok[:, None], picked, 0.0)
    return out


def test_tile_loads_gather_rows_and_zero_what_is_masked():
    """Random, repeated and unordered rows and heads; a random half of the rows masked."""
    tokens, heads = 40, 3
    x = torch.randn(tokens, heads, WIDTH)
    index = torch.randint(0, tokens, (ROWS,))
    head = torch.randint(0, heads, (ROWS,), dtype=torch.int32)
    ok = torch.rand(ROWS) < 0.5
    ok[0], ok[1] = True, False
    rows_out = torch.full((ROWS, COLS), float("nan"))
    cols_out = torch.full((COLS, ROWS), float("nan"))
    pairs_out = torch.full((ROWS, COLS), float("nan"))
    _tiles_kernel[(1,)](
        x, index, head, ok.to(torch.int32), rows_out, cols_out, pairs_out, x.stride(0), x.stride(1),
        R=ROWS, C=COLS, WIDTH=WIDTH,
    )  # fmt: skip
    assert torch.equal(rows_out, _expected(x, index, None, ok))
    assert torch.equal(cols_out, _expected(x, index, None, ok).T)
    assert torch.equal(pairs_out, _expected(x, index, head.long(), ok))
