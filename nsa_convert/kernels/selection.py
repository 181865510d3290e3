"""Block importance and top-n selection, fused with the compressed scores, in two passes per chunk of positions.

Scores pass: one program takes BT positions of one KV head with all G heads of its group (rows = BT × GP, the
group padded to a power of two only here, because the group sum is a reshape). It walks the visible
compressed keys in tiles aligned to BJ selection blocks, recomputes p_cmp = exp(scale·q·k_cmp − lse_cmp),
sums it over the group, folds it into selection-block importance (spec eq. 9 as a banded convolution) and
writes one score per (position, block): +inf for forced blocks, −1 for non-candidates.

Top-n pass: per (position, head) row, the n-th largest score is found by a bitwise search on the scores'
int32 bit patterns (ordered like the floats, all scores being ≥ 0 or −1), then the blocks above it and the
lowest-id ties fill the n slots, written ascending. It is launched per range of positions with a power of
two of candidate blocks, one row per one-warp program on the GPU. This replaced a running top-n merge
after every tile, which cost 60% of the fused kernel. Scores are written for a chunk of positions at a
time, so the buffer stays bounded at any length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_convert.kernels.banded import LOG2E, n_visible
from nsa_convert.kernels.buffers import empty
from nsa_convert.kernels.tiles import load_cols, load_pairs


@triton.jit
def _band_weight(k, R: tl.constexpr, QC: tl.constexpr):
    """w(k) = #{(m, n): m < R, n < QC, m + n = k}: how often compressed entry r(j+1)−1−k counts for block j."""
    w = tl.minimum(tl.minimum(k, R - 1), tl.minimum(QC - 1, R + QC - 2 - k)) + 1
    return tl.where((k >= 0) & (k <= R + QC - 2), w, 0).to(tl.float32)


@triton.jit
def _shift_blocks(c, SHIFT: tl.constexpr, BJ: tl.constexpr):
    """(c[:, jj − SHIFT] for jj ≥ SHIFT else 0, c[:, jj + BJ − SHIFT] for jj < SHIFT else 0), exactly."""
    src = tl.arange(0, BJ)[:, None]
    dst = tl.arange(0, BJ)[None, :]
    inside = tl.sum(c[:, :, None] * (src == dst - SHIFT).to(tl.float32)[None, :, :], 1)
    spill = tl.sum(c[:, :, None] * (src == dst + BJ - SHIFT).to(tl.float32)[None, :, :], 1)
    return inside, spill


@triton.jit
def select_scores_kernel(
    Q, KC, LSE, SC, CU_Q, CU_K,
    sq_t, sq_h, sk_t, sk_h, sl_t, sl_h, sc_r, sc_h,
    c0, chunk, scale_log2,
    GROUP: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr,
    CSTRIDE: tl.constexpr, CSPAN: tl.constexpr, SEL: tl.constexpr,
    RATIO: tl.constexpr, RP: tl.constexpr, QC: tl.constexpr, SPILL: tl.constexpr,
    BJ: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr,
):  # fmt: skip
    """SC[b·chunk + t − c0, h, j] for BT positions t ≥ c0: the score of block j (j ≤ the last tile's blocks).

    RATIO = l'/d compressed entries per selection block (RP its power-of-two pad), QC = l/d, SPILL = how
    many later blocks one tile's entries reach past the tile (static), BJ = blocks per tile.
    """
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first: work grows with t
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    T = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    Tk = tl.load(CU_K + b + 1) - k_start
    t0 = c0 + pid * BT
    if t0 >= T:
        return
    rows = tl.arange(0, BT * GP)
    t = t0 + rows // GP
    g = rows % GP
    row_ok = (t < T) & (g < GROUP)
    hq = h * GROUP + g
    tok = (q_start + t).to(tl.int64)
    dk = tl.arange(0, BDK)
    q = load_pairs(Q, tok, hq, row_ok, sq_t, sq_h, dk, DK)
    lse = tl.load(LSE + tok * sl_t + hq * sl_h, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    nvis = n_visible(t, CSTRIDE, CSPAN)

    tt = t0 + tl.arange(0, BT)
    cur = tt // SEL
    t_hi = tl.minimum(T - 1, t0 + BT - 1)
    nb_hi = t_hi // SEL + 1
    cols = tl.arange(0, BJ * RP)
    col_blk = cols // RP
    col_u = cols % RP
    u = tl.arange(0, RP)
    jj = tl.arange(0, BJ)
    sc_row = SC + (b * chunk + tt - c0).to(tl.int64) * sc_r + h * sc_h
    t_ok = (tt < T) & (tt - c0 < chunk)
    carry = tl.zeros([BT, BJ], tl.float32)
    kc_base = KC + h * sk_h
    for j0 in range(0, nb_hi, BJ):
        ci = j0 * RATIO + col_blk * RATIO + col_u
        c_ok = (col_u < RATIO) & (ci < Tk)
        kc = load_cols(kc_base, (k_start + ci).to(tl.int64), c_ok, sk_t, dk, DK)
        qk = tl.dot(q, kc) * scale_log2
        vis = c_ok[None, :] & (ci[None, :] < nvis[:, None])
        p = tl.where(vis, tl.math.exp2(qk - lse2[:, None]), 0.0)
        p_pos = tl.sum(tl.reshape(p, [BT, GP, BJ * RP]), 1)
        p3 = tl.reshape(p_pos, [BT, BJ, RP])
        imp = carry + tl.sum(p3 * _band_weight(RATIO - 1 - u, RATIO, QC)[None, None, :], 2)
        carry = tl.zeros([BT, BJ], tl.float32)
        for s in tl.static_range(1, SPILL + 1):
            c_s = tl.sum(p3 * _band_weight(RATIO * (s + 1) - 1 - u, RATIO, QC)[None, None, :], 2)
            inside, spill = _shift_blocks(c_s, s, BJ)
            imp += inside
            carry += spill
        j = j0 + jj[None, :] + tl.zeros([BT, BJ], tl.int32)
        cand = j <= cur[:, None]
        forced = (j == 0) | (j == cur[:, None]) | (j == cur[:, None] - 1)
        val = tl.where(cand, tl.where(forced, float("inf"), imp), -1.0)
        tl.store(sc_row[:, None] + j, val, mask=t_ok[:, None])


@triton.jit
def select_topn_kernel(
    SC, IDX, CU_Q, sc_r, sc_h, si_t, si_h, c0, chunk, t_first, t_end,
    SEL: tl.constexpr, TOPN: tl.constexpr, RB: tl.constexpr, NBP: tl.constexpr, RN: tl.constexpr,
):  # fmt: skip
    """IDX[t, h, :TOPN] for RB positions t in [t_first, t_end) of the chunk at c0, from their scores: selected
    block ids, ascending, −1 padded. NBP covers the blocks of t < t_end only (select_launch's ranges)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    T = tl.load(CU_Q + b + 1) - q_start
    t = t_first + pid * RB + tl.arange(0, RB)
    t_ok = (t < T) & (t < t_end)  # t_end ≤ c0 + chunk
    j = tl.arange(0, NBP)
    live = t_ok[:, None] & (j[None, :] <= (t // SEL)[:, None])
    val = tl.load(SC + (b * chunk + t - c0).to(tl.int64)[:, None] * sc_r + h * sc_h + j[None, :], mask=live)
    key = tl.where(live & (val >= 0), val.to(tl.int32, bitcast=True), -1)
    # theta = the TOPN-th largest key: the largest value with at least TOPN keys ≥ it (0 if fewer candidates)
    theta = tl.zeros([RB], tl.int32)
    for i in tl.static_range(31):
        trial = theta | (1 << (30 - i))
        enough = tl.sum((key >= trial[:, None]).to(tl.int32), 1) >= TOPN
        theta = tl.where(enough, trial, theta)
    above = key > theta[:, None]
    tie = key == theta[:, None]
    need = TOPN - tl.sum(above.to(tl.int32), 1)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= need[:, None]))
    slot = tl.cumsum(take.to(tl.int32), 1) - 1
    tok = (q_start + t).to(tl.int64)
    out = IDX + tok * si_t + h * si_h
    tl.store(out[:, None] + slot, j[None, :] + tl.zeros([RB, NBP], tl.int32), mask=take)
    n_taken = tl.sum(take.to(tl.int32), 1)
    pad = tl.arange(0, RN)[None, :]
    tl.store(
        out[:, None] + pad,
        tl.full([RB, RN], -1, tl.int32),
        mask=t_ok[:, None] & (pad >= n_taken[:, None]) & (pad < TOPN),
    )


SCORES_BYTES = 1 << 30
"""Bound on the score buffer of one chunk of positions (the chunk shrinks as sequences get longer); 1 GiB
was 3–4% faster than 256 MiB at 64k (fewer chunk tails)."""


def _scores_rows(gp: int, device: str) -> int:
    """Rows (positions × padded group) per scores program, measured on the H100 (select at 64k, paper-G16 /
    llama-G4): 64 rows 12.8 / 13.4 ms, 128 rows 12.5 / 13.6, 256 rows 14.3 / 14.3."""
    if device != "cuda":
        return 16
    return 128 if gp >= 16 else 64


def select_launch(q, k_cmp, lse_cmp, indices, cu_q, cu_k, max_len, params):
    """Fill indices [N, Hkv, n] (int64) from packed q [N, Hq, DK], k_cmp [Nc, Hkv, DK], lse_cmp [N, Hq]."""
    n_seq = cu_q.numel() - 1
    hq, dk = q.shape[1], q.shape[2]
    hkv = k_cmp.shape[1]
    group = hq // hkv
    gp = triton.next_power_of_2(group)
    ratio = params.block_size // params.compress_stride
    qc = params.compress_block // params.compress_stride
    spill = (ratio + qc - 2) // ratio
    bj = max(16, triton.next_power_of_2(spill + 1))
    gpu = q.device.type == "cuda"
    bt = max(1, _scores_rows(gp, q.device.type) // gp)
    if bt * gp < 16:
        bt = 16 // gp
    nbp = max(bj, triton.next_power_of_2(triton.cdiv(max(max_len, 1), params.block_size)))
    rb = 1 if gpu else 4
    align = max(bt, rb)
    chunk = max(align, SCORES_BYTES // (4 * n_seq * hkv * nbp) // align * align)
    chunk = min(chunk, triton.cdiv(max_len, align) * align)
    scores = empty(n_seq * chunk, hkv, nbp, dtype=torch.float32, device=q.device)
    for c0 in range(0, max_len, chunk):
        select_scores_kernel[(triton.cdiv(min(chunk, max_len - c0), bt), hkv, n_seq)](
            q, k_cmp, lse_cmp, scores, cu_q, cu_k,
            q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse_cmp.stride(0), lse_cmp.stride(1),
            scores.stride(0), scores.stride(1), c0, chunk, params.scale * LOG2E,
            GROUP=group, GP=gp, BT=bt, CSTRIDE=params.compress_stride, CSPAN=params.compress_block,
            SEL=params.block_size, RATIO=ratio, RP=triton.next_power_of_2(ratio), QC=qc, SPILL=spill, BJ=bj,
            DK=dk, BDK=max(16, triton.next_power_of_2(dk)),
            num_warps=8 if gpu and bt * gp >= 128 else 4, num_stages=2 if gpu else 1,
        )  # fmt: skip
        c1 = min(c0 + chunk, max_len)
        for t_first, t_end, blocks in _causal_ranges(c0, c1, params.block_size, nbp):
            select_topn_kernel[(triton.cdiv(t_end - t_first, rb), hkv, n_seq)](
                scores, indices, cu_q, scores.stride(0), scores.stride(1), indices.stride(0), indices.stride(1),
                c0, chunk, t_first, t_end, SEL=params.block_size, TOPN=params.top_n, RB=rb, NBP=blocks,
                RN=max(16, triton.next_power_of_2(params.top_n)), num_warps=1 if gpu else 4,
            )  # fmt: skip


def _causal_ranges(c0: int, c1: int, block_size: int, nbp: int) -> list[tuple[int, int, int]]:
    """Positions [c0, c1) split where the candidate blocks double (16, 32 … nbp): (first, end, blocks) each,
    so the top-n search of early positions does not scan blocks they cannot see. On the H100 at 64k, with one
    row and one warp per program (a row's reductions stay inside the warp), the top-n pass took 1.7 / 3.3 ms
    (paper-G16 / llama-G4) against 3.9 / 7.7 ms with 4 rows × 4 warps over all blocks."""
    ranges, start, blocks = [], c0, 16
    while start < c1:
        end = c1 if blocks >= nbp else min(c1, blocks * block_size)
        if end > start:
            ranges.append((start, end, min(blocks, nbp)))
        start, blocks = max(start, end), blocks * 2
    return ranges
