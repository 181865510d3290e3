"""Pure-PyTorch NSA: the readable, device-agnostic implementation every kernel is checked against.

It follows `shared/NSA_SPEC.md` literally, vectorised over batch and heads and chunked over queries, so
that a step never holds more than `MAX_CHUNK_SCORES` attention scores instead of a T × T matrix per head.
Half-precision inputs are computed in float32 (float64 inputs stay float64); outputs come back in q's
dtype, log-sum-exps (natural log, of the scaled scores) in float32.

`nsa_decode` is the decoding path: the last n tokens of each sequence against a KV cache (sequences of
different lengths, right-aligned in it), the same outputs as the full-sequence computation at those rows.

Shapes: q (B, T, Hq, Dk), k (B, T, Hkv, Dk), v (B, T, Hkv, Dv), k_cmp (B, Tc, Hkv, Dk),
v_cmp (B, Tc, Hkv, Dv) with Tc = spec.num_compressed_blocks(T, l, d), gates (B, T, Hq, 3) ordered
(cmp, slc, win), indices (B, T, Hkv, top_n).  Every function takes `params` with its scale resolved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nsa_convert.spec import SparsityParams, num_selection_blocks, num_visible_compressed

MAX_CHUNK_SCORES = 1 << 24
"""Upper bound on the score elements (batch × query heads × queries × keys) one chunk materialises."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(params: SparsityParams) -> float:
    if params.scale is None:
        raise ValueError("params.scale must be resolved first: use params.resolved(head_dim)")
    return params.scale


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, T, Hq, D) → (B, T, Hkv, G, D) in the compute dtype: query head hq belongs to KV head hq // G."""
    batch, seq_len, num_q_heads, dim = q.shape
    return q.to(_compute_dtype(q.dtype)).reshape(
        batch, seq_len, num_kv_heads, num_q_heads // num_kv_heads, dim
    )


def _query_chunks(seq_len: int, rows: int, keys: int, cap: int | None = None) -> Iterator[tuple[int, int]]:
    """Query ranges [t0, t1) whose rows × queries × keys scores fit in MAX_CHUNK_SCORES (at least one query)."""
    size = max(1, MAX_CHUNK_SCORES // max(1, rows * keys))
    if cap is not None:
        size = min(size, cap)
    for start in range(0, seq_len, size):
        yield start, min(seq_len, start + size)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · K q for q (B, C, Hkv, G, Dk) and k (B, K, Hkv, Dk): (B, Hkv, G, C, K), through a matmul."""
    return torch.einsum("bchgd,bkhd->bhgck", q, k.to(q.dtype)) * scale


def _exact_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Like `_scores`, but every (query, key) dot product is summed in the same order.

    A matmul may round a column differently depending on where it falls in its tiling, which would let
    identical keys score differently and break exact ties in block selection; this costs Dk times the
    memory, so only selection uses it.
    """
    products = q.permute(0, 2, 3, 1, 4).unsqueeze(-2) * k.to(q.dtype).permute(0, 2, 1, 3)[:, :, None, None]
    return products.sum(dim=-1) * scale


def _softmax(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights of `scores` (B, Hkv, G, C, K) over the keys `mask` allows, and their log-sum-exp.

    mask is broadcastable to the scores.  Returns p like the scores and lse (B, C, Hkv, G).  A row
    without keys gets p = 0 and lse = -inf (its maximum is replaced by 0, so no -inf − -inf appears).
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, 1.0)
    lse = torch.where(nonempty, row_max + torch.log(safe_total), float("-inf"))
    return weights / safe_total, lse.squeeze(-1).permute(0, 3, 1, 2)


class _Chunk(NamedTuple):
    """Queries start … stop − 1 attend to keys key_start … key_stop − 1 where `mask` allows.

    mask is broadcastable to (B, Hkv, G, stop − start, key_stop − key_start).
    """

    start: int
    stop: int
    key_start: int
    key_stop: int
    mask: torch.Tensor | None


def _compressed_chunks(
    seq_len: int, rows: int, num_cmp: int, params: SparsityParams, device: torch.device
) -> Iterator[_Chunk]:
    """Compression branch: query t sees compressed block i iff i·d + l − 1 ≤ t."""
    length, stride = params.compress_block, params.compress_stride
    for start, stop in _query_chunks(seq_len, rows, num_cmp):
        visible = num_visible_compressed(stop - 1, length, stride)
        t = torch.arange(start, stop, device=device)[:, None]
        block_end = torch.arange(visible, device=device) * stride + length - 1
        yield _Chunk(start, stop, 0, visible, block_end <= t)


def _selected_chunks(indices: torch.Tensor, rows: int, params: SparsityParams) -> Iterator[_Chunk]:
    """Selection branch: query t sees the tokens s ≤ t of the blocks indices[b, t, h] lists (-1 = none)."""
    seq_len, device = indices.shape[1], indices.device
    for start, stop in _query_chunks(seq_len, rows, seq_len):
        blocks = num_selection_blocks(stop, params.block_size)
        chosen = indices[:, start:stop]
        block_mask = torch.zeros(*chosen.shape[:-1], blocks + 1, dtype=torch.bool, device=device)
        block_mask.scatter_(-1, torch.where(chosen < 0, blocks, chosen), True)
        s = torch.arange(stop, device=device)
        t = torch.arange(start, stop, device=device)[:, None]
        mask = block_mask[..., s // params.block_size] & (s <= t)[None, :, None, :]
        yield _Chunk(start, stop, 0, stop, mask.permute(0, 2, 1, 3).unsqueeze(2))


def _window_chunks(seq_len: int, rows: int, params: SparsityParams, device: torch.device) -> Iterator[_Chunk]:
    """Sliding-window branch: query t sees keys max(0, t − w + 1) … t."""
    w = params.window
    for start, stop in _query_chunks(seq_len, rows, min(seq_len, 2 * w), cap=w):
        key_start = max(0, start - w + 1)
        s = torch.arange(key_start, stop, device=device)
        t = torch.arange(start, stop, device=device)[:, None]
        yield _Chunk(start, stop, key_start, stop, (s <= t) & (s > t - w))


def _branch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Iterable[_Chunk], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One branch on grouped queries q (B, T, Hkv, G, Dk): o (B, T, Hq, Dv) and lse (B, T, Hq), in q's dtype.

    Rows without keys get o = 0 and lse = -inf.
    """
    outs, lses = [], []
    for c in chunks:
        q_chunk = q[:, c.start : c.stop]
        if c.key_stop == c.key_start:
            outs.append(q_chunk.new_zeros(*q_chunk.shape[:-1], v.shape[-1]))
            lses.append(q_chunk.new_full(q_chunk.shape[:-1], float("-inf")))
            continue
        keys = slice(c.key_start, c.key_stop)
        p, lse = _softmax(_scores(q_chunk, k[:, keys], scale), c.mask)
        outs.append(torch.einsum("bhgck,bkhe->bchge", p, v[:, keys].to(q.dtype)))
        lses.append(lse)
    return torch.cat(outs, dim=1).flatten(2, 3), torch.cat(lses, dim=1).flatten(2, 3)


def _branch_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunks: Iterable[_Chunk],
    scale: float,
    grad_out: torch.Tensor,
    gate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ grad_out · gate · o_branch, recomputing the branch's softmax chunk by chunk.

    q (B, T, Hkv, G, Dk), grad_out (B, T, Hkv, G, Dv) and gate (B, T, Hkv, G, 1) in the compute dtype.
    Returns dq like q, dk (B, Tk, Hkv, Dk), dv (B, Tk, Hkv, Dv) and dgate (B, T, Hkv, G), all in q's dtype.
    Written out by hand (dS = P ∘ (dP − rowsum(dO ∘ O))) because custom-op kernels run below autograd.
    """
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, dtype=q.dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=q.dtype, device=q.device)
    dgate = q.new_zeros(q.shape[:-1])
    for c in chunks:
        if c.key_stop == c.key_start:
            continue
        rows, keys = slice(c.start, c.stop), slice(c.key_start, c.key_stop)
        k_chunk, v_chunk = k[:, keys].to(q.dtype), v[:, keys].to(q.dtype)
        p, _ = _softmax(_scores(q[:, rows], k_chunk, scale), c.mask)
        o = torch.einsum("bhgck,bkhe->bchge", p, v_chunk)
        dgate[:, rows] = (grad_out[:, rows] * o).sum(dim=-1)
        d_o = gate[:, rows] * grad_out[:, rows]
        dv[:, keys] += torch.einsum("bhgck,bchge->bkhe", p, d_o)
        d_p = torch.einsum("bchge,bkhe->bhgck", d_o, v_chunk)
        delta = (d_o * o).sum(dim=-1).permute(0, 2, 3, 1).unsqueeze(-1)
        d_s = p * (d_p - delta) * scale
        dq[:, rows] = torch.einsum("bhgck,bkhd->bchgd", d_s, k_chunk)
        dk[:, keys] += torch.einsum("bhgck,bchgd->bkhd", d_s, q[:, rows])
    return dq, dk, dv, dgate


def _rows(q: torch.Tensor) -> int:
    """Score rows per query position of grouped queries (B, T, Hkv, G, D): B · Hkv · G."""
    return q.shape[0] * q.shape[2] * q.shape[3]


def compressed_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, params: SparsityParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compression branch: query t attends to the compressed blocks i with i·d + l − 1 ≤ t.

    q (B, T, Hq, Dk); k_cmp (B, Tc, Hkv, Dk); v_cmp (B, Tc, Hkv, Dv).
    Returns o (B, T, Hq, Dv) in q's dtype (0 where no block is visible) and lse (B, T, Hq) float32
    (-inf there).
    """
    grouped = _grouped(q, k_cmp.shape[2])
    chunks = _compressed_chunks(q.shape[1], _rows(grouped), k_cmp.shape[1], params, q.device)
    o, lse = _branch_forward(grouped, k_cmp, v_cmp, chunks, _scale(params))
    return o.to(q.dtype), lse.float()


def _importance_terms(
    num_blocks: int, visible: int, params: SparsityParams, device: torch.device
) -> torch.Tensor:
    """Compressed index of every term of eq. 9, per selection block: LongTensor (num_blocks, l'/d · l/d).

    Indices outside 0 … visible − 1 point at `visible` (a zero column).  Summing the gathered terms in
    this fixed order, rather than through a matrix product, makes blocks that see the same sequence of
    probabilities tie exactly, so ties to the lower index behave the same on every device.
    """
    per_block = params.block_size // params.compress_stride
    per_cmp = params.compress_block // params.compress_stride
    j = torch.arange(num_blocks, device=device)[:, None, None]
    m = torch.arange(per_block, device=device)[None, :, None]
    n = torch.arange(per_cmp, device=device)[None, None, :]
    index = (per_block * (j + 1) - 1 - m - n).reshape(num_blocks, -1)
    return torch.where((index >= 0) & (index < visible), index, visible)


def block_importance(shared: torch.Tensor, num_blocks: int, params: SparsityParams) -> torch.Tensor:
    """Eq. 9: the importance (..., num_blocks) of each selection block, from the compressed-attention
    probabilities summed over a query group, shared (..., visible) (0 beyond what a query sees)."""
    terms = _importance_terms(num_blocks, shared.shape[-1], params, shared.device)
    return F.pad(shared, (0, 1))[..., terms].sum(dim=-1)


def _select_chunk(
    q: torch.Tensor, k_cmp: torch.Tensor, chunk: _Chunk, params: SparsityParams
) -> torch.Tensor:
    """Selected blocks (B, C, Hkv, top_n) for the queries of one compression-branch chunk of grouped q."""
    block = params.block_size
    blocks = num_selection_blocks(chunk.stop, block)
    q_chunk = q[:, chunk.start : chunk.stop]
    batch, size, num_kv_heads = q_chunk.shape[:3]
    if chunk.key_stop == 0:
        importance = q.new_zeros(batch, num_kv_heads, size, blocks)
    else:
        p_cmp, _ = _softmax(_exact_scores(q_chunk, k_cmp[:, : chunk.key_stop], _scale(params)), chunk.mask)
        importance = block_importance(p_cmp.sum(dim=2), blocks, params)
    current = (torch.arange(chunk.start, chunk.stop, device=q.device) // block)[:, None]
    return _top_blocks(importance, current, params.top_n).permute(0, 2, 1, 3)


def _top_blocks(importance: torch.Tensor, current: torch.Tensor, top_n: int) -> torch.Tensor:
    """The selected set from block importance (..., blocks): blocks 0, current − 1 and current forced, blocks
    after current excluded, the rest by importance (ties to the lower index); sorted ascending, −1 padded.

    current (each query's ⌊t / l'⌋, negative for a padding query, which selects nothing) broadcasts
    against importance[..., :1].
    """
    blocks = importance.shape[-1]
    j = torch.arange(blocks, device=importance.device)
    forced = (j == 0) | (j == current) | (j == current - 1)
    ranked = importance.masked_fill(forced, float("inf")).masked_fill(j > current, float("-inf"))
    top = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :top_n]
    top = torch.sort(torch.where(top <= current, top, blocks), dim=-1).values
    top = torch.where(top == blocks, -1, top)
    return F.pad(top, (0, top_n - top.shape[-1]), value=-1)


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, params: SparsityParams) -> torch.Tensor:
    """Selection blocks per (b, t, kv head): forced 0, current, previous; the rest by eq. 9/10 importance.

    q (B, T, Hq, Dk); k_cmp (B, Tc, Hkv, Dk).  Returns LongTensor (B, T, Hkv, top_n), sorted ascending and
    padded with -1; ties in importance go to the lower block index.
    """
    grouped = _grouped(q.detach(), k_cmp.shape[2])
    keys = k_cmp.shape[1] * k_cmp.shape[3]
    chunks = _compressed_chunks(q.shape[1], _rows(grouped), keys, params, q.device)
    return torch.cat([_select_chunk(grouped, k_cmp.detach(), c, params) for c in chunks], dim=1)


def selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, params: SparsityParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection branch: query t attends to the tokens s ≤ t of its KV group's selected blocks.

    q (B, T, Hq, Dk); k (B, T, Hkv, Dk); v (B, T, Hkv, Dv); indices (B, T, Hkv, top_n), -1 = unused slot.
    Returns o (B, T, Hq, Dv) in q's dtype and lse (B, T, Hq) float32.
    """
    grouped = _grouped(q, k.shape[2])
    o, lse = _branch_forward(grouped, k, v, _selected_chunks(indices, _rows(grouped), params), _scale(params))
    return o.to(q.dtype), lse.float()


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: SparsityParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window branch: query t attends to keys max(0, t − w + 1) … t.

    q (B, T, Hq, Dk); k (B, T, Hkv, Dk); v (B, T, Hkv, Dv).
    Returns o (B, T, Hq, Dv) in q's dtype and lse (B, T, Hq) float32.
    """
    grouped = _grouped(q, k.shape[2])
    chunks = _window_chunks(q.shape[1], _rows(grouped), params, q.device)
    o, lse = _branch_forward(grouped, k, v, chunks, _scale(params))
    return o.to(q.dtype), lse.float()


def _branches(
    grouped: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    k_win: torch.Tensor | None,
    v_win: torch.Tensor | None,
    indices: torch.Tensor,
    params: SparsityParams,
) -> list[tuple[torch.Tensor, torch.Tensor, Iterator[_Chunk]]]:
    """(keys, values, chunks) of the three branches, ordered (cmp, slc, win), for grouped queries."""
    seq_len, rows, device = grouped.shape[1], _rows(grouped), grouped.device
    return [
        (k_cmp, v_cmp, _compressed_chunks(seq_len, rows, k_cmp.shape[1], params, device)),
        (k, v, _selected_chunks(indices, rows, params)),
        (
            k if k_win is None else k_win,
            v if v_win is None else v_win,
            _window_chunks(seq_len, rows, params, device),
        ),
    ]


def nsa_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    params: SparsityParams,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NSA output o = Σ gate · branch, with the branches' lse and the selected blocks.

    q (B, T, Hq, Dk); k (B, T, Hkv, Dk); v (B, T, Hkv, Dv); k_cmp (B, Tc, Hkv, Dk); v_cmp (B, Tc, Hkv, Dv);
    gates (B, T, Hq, 3) ordered (cmp, slc, win); k_win/v_win (like k/v), when given, replace k/v in the
    window branch only.  Returns out (B, T, Hq, Dv) in q's dtype, lse (B, T, Hq, 3) float32 ordered
    (cmp, slc, win) and indices (B, T, Hkv, top_n) int64.
    """
    indices = select_blocks(q, k_cmp, params)
    grouped = _grouped(q, k.shape[2])
    branches = _branches(grouped, k, v, k_cmp, v_cmp, k_win, v_win, indices, params)
    results = [
        _branch_forward(grouped, keys, values, chunks, _scale(params)) for keys, values, chunks in branches
    ]
    g = gates.to(grouped.dtype)
    out = sum(g[..., i : i + 1] * o for i, (o, _) in enumerate(results))
    lse = torch.stack([branch_lse for _, branch_lse in results], dim=-1)
    return out.to(q.dtype), lse.float(), indices


def nsa_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    k_win: torch.Tensor | None,
    v_win: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    params: SparsityParams,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of nsa_forward's out for the given (fixed, non-differentiable) `indices`.

    Arguments are nsa_forward's inputs and outputs plus grad_out (B, T, Hq, Dv).  out and lse are accepted
    so that the signature matches the kernels'; this reference recomputes each branch's softmax instead.
    Returns (dq, dk, dv, dk_cmp, dv_cmp, dgates, dk_win, dv_win), each like its input; dk_win and dv_win
    are None when k_win/v_win are, and the window branch's gradients then land in dk/dv.
    """
    grouped = _grouped(q, k.shape[2])
    grad = grad_out.to(grouped.dtype).reshape(*grouped.shape[:-1], -1)
    gate = gates.to(grouped.dtype).reshape(*grouped.shape[:-1], 3)
    branches = _branches(grouped, k, v, k_cmp, v_cmp, k_win, v_win, indices, params)
    (dq_cmp, dk_cmp, dv_cmp, dg_cmp), (dq_slc, dk_slc, dv_slc, dg_slc), (dq_win, dk_win, dv_win, dg_win) = (
        _branch_backward(grouped, keys, values, chunks, _scale(params), grad, gate[..., i : i + 1])
        for i, (keys, values, chunks) in enumerate(branches)
    )
    dq = (dq_cmp + dq_slc + dq_win).flatten(2, 3)
    dgates = torch.stack([dg_cmp, dg_slc, dg_win], dim=-1).flatten(2, 3)
    dk = dk_slc if k_win is not None else dk_slc + dk_win
    dv = dv_slc if v_win is not None else dv_slc + dv_win
    return (
        dq.to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        dk_cmp.to(k_cmp.dtype),
        dv_cmp.to(v_cmp.dtype),
        dgates.to(gates.dtype),
        None if k_win is None else dk_win.to(k_win.dtype),
        None if v_win is None else dv_win.to(v_win.dtype),
    )


def _decode_select(
    grouped: torch.Tensor,
    k_cmp: torch.Tensor,
    cmp_mask: torch.Tensor,
    positions: torch.Tensor,
    num_blocks: int,
    params: SparsityParams,
) -> torch.Tensor:
    """Selected blocks (B, n, Hkv, top_n) of grouped decode queries, computed as `select_blocks` does."""
    batch, n, num_kv_heads = grouped.shape[:3]
    num_cmp = k_cmp.shape[1]
    if num_cmp == 0:
        importance = grouped.new_zeros(batch, num_kv_heads, n, num_blocks)
    else:
        p_cmp, _ = _softmax(_exact_scores(grouped, k_cmp.detach(), _scale(params)), cmp_mask)
        importance = block_importance(p_cmp.sum(dim=2), num_blocks, params)
    current = positions.div(params.block_size, rounding_mode="floor")[:, None, :, None]
    return _top_blocks(importance, current, params.top_n).permute(0, 2, 1, 3).contiguous()


def _local_positions(num_rows: int, seq_lens: torch.Tensor) -> torch.Tensor:
    """(B, rows): the token each row of a right-aligned cache holds (row S − L_b + p holds token p; < 0: padding)."""
    rows = torch.arange(num_rows, device=seq_lens.device)
    return rows[None, :] - (num_rows - seq_lens)[:, None]


def _unseen_to_zero(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) with 0 in every row that no query of its sequence may read (mask (B, …, S) false
    throughout): cache padding and slack may hold anything, NaN included, and 0 · NaN would leak."""
    seen = mask.flatten(1, -2).any(1)
    return torch.where(seen[:, :, None, None], x, 0)


def nsa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    seq_lens: torch.Tensor,
    params: SparsityParams,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
    *,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NSA for the last n tokens of each sequence from a KV cache: the full-sequence o[t] at those positions.

    Sequence b holds L_b = seq_lens[b] tokens (the n new ones included); q (B, n, Hq, Dk) and gates
    (B, n, Hq, 3) are its tokens L_b − n … L_b − 1 (a negative position is padding: output 0, no blocks).
    k (B, S, Hkv, Dk), v (B, S, Hkv, Dv) feed selection and hold each sequence right-aligned: row S − L_b + p
    is token p, the rows before it left padding, so S ≥ max L_b.  k_win/v_win (B, S_w, Hkv, ·), when given,
    feed the window instead, right-aligned the same way; they may keep only their last w + n − 1 rows.
    k_cmp (B, Tcc, Hkv, Dk), v_cmp (B, Tcc, Hkv, Dv) hold each sequence's compressed blocks from index 0;
    entries past spec.num_compressed_blocks(L_b) are ignored.  Returns out (B, n, Hq, Dv) in q's dtype,
    lse (B, n, Hq, 3) float32 and indices (B, n, Hkv, top_n) int64, as nsa_forward does for those rows.
    `indices`, when given, replaces the selection (to check a low-precision kernel for its own choice,
    which may break near-ties differently).
    """
    n, num_kv_heads = q.shape[1], k.shape[2]
    grouped = _grouped(q, num_kv_heads)
    lens = seq_lens.to(device=q.device, dtype=torch.long)
    positions = lens[:, None] - n + torch.arange(n, device=q.device)
    length, stride, block = params.compress_block, params.compress_stride, params.block_size

    block_end = torch.arange(k_cmp.shape[1], device=q.device) * stride + length - 1
    cmp_mask = (block_end <= positions[..., None])[:, None, None]
    k_cmp, v_cmp = (_unseen_to_zero(x, cmp_mask) for x in (k_cmp, v_cmp))
    num_blocks = num_selection_blocks(k.shape[1], block)
    if indices is None:
        indices = _decode_select(grouped, k_cmp, cmp_mask, positions, num_blocks, params)

    tokens = _local_positions(k.shape[1], lens)
    chosen = torch.zeros(*indices.shape[:-1], num_blocks + 2, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(indices < 0, num_blocks, indices), True)
    token_block = torch.where(tokens >= 0, tokens.div(block, rounding_mode="floor"), num_blocks + 1)
    in_selected = chosen.gather(-1, token_block[:, None, None, :].expand(*indices.shape[:-1], -1))
    slc_mask = (in_selected & (tokens[:, None, None, :] <= positions[:, :, None, None])).permute(0, 2, 1, 3)

    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    window_tokens = _local_positions(k_win.shape[1], lens)[:, None, :]
    t = positions[..., None]
    win_mask = (window_tokens >= 0) & (window_tokens <= t) & (window_tokens > t - params.window)

    slc_mask, win_mask = slc_mask.unsqueeze(2), win_mask[:, None, None]
    branches = [
        (k_cmp, v_cmp, cmp_mask),
        (_unseen_to_zero(k, slc_mask), _unseen_to_zero(v, slc_mask), slc_mask),
        (_unseen_to_zero(k_win, win_mask), _unseen_to_zero(v_win, win_mask), win_mask),
    ]
    results = [
        _branch_forward(grouped, keys, values, [_Chunk(0, n, 0, keys.shape[1], mask)], _scale(params))
        for keys, values, mask in branches
    ]
    g = gates.to(grouped.dtype)
    out = sum(g[..., i : i + 1] * o for i, (o, _) in enumerate(results))
    lse = torch.stack([branch_lse for _, branch_lse in results], dim=-1)
    return out.to(q.dtype), lse.float(), indices
