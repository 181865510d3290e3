"""Block importance and top-n selection, fused with the compressed scores.

One program takes BT positions of one KV head with all G heads of its group (rows = BT × GP, the group padded
to a power of two only here, because the group sum is a reshape). It walks the visible compressed keys in
tiles aligned to BJ selection blocks, recomputes p_cmp = exp(scale·q·k_cmp − lse_cmp), sums it over the
group, folds it into selection-block importance (spec eq. 9 as a banded convolution) and merges the tile into
a running top-n list. Nothing of size T × Tc (or T × blocks) is written.

Ranking: larger importance first, ties to the lower block id; forced blocks rank as +inf, non-candidates
as −1. The running list merges a tile in one of two exact ways: by ranks (pairwise 32-bit comparisons, no
serial rounds; used when a program holds ≤ 8 positions, e.g. G = 16) or by TOPN rounds of max-and-remove on
int64 keys (importance bits high, 0x7fffffff − j low; cheaper for programs with many positions, e.g. G = 4).
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsa_convert.kernels.banded import LOG2E, n_visible


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
def _beats(va, ja, vb, jb):
    """a ranks before b: larger importance, ties to the lower block id (ids in one row are distinct)."""
    return (va > vb) | ((va == vb) & (ja < jb))


@triton.jit
def _merge_top(run_v, run_j, new_v, new_j):
    """Top RN of running ∪ tile per row, sorted descending (running [BT, RN] is sorted descending).

    Ranks instead of rounds: a running entry's rank in the union is its slot plus the tile entries that
    beat it; a tile entry's is the running entries it does not beat (ids are distinct, so exactly one of
    a, b beats the other) plus the tile entries that beat it. Slot s takes the entry of rank s. All
    comparisons are 32-bit and independent: no serial max-and-remove rounds.
    """
    RN: tl.constexpr = run_v.shape[1]
    x = _beats(new_v[:, :, None], new_j[:, :, None], run_v[:, None, :], run_j[:, None, :]).to(tl.int32)
    y = _beats(new_v[:, :, None], new_j[:, :, None], new_v[:, None, :], new_j[:, None, :]).to(tl.int32)
    rank_run = tl.arange(0, RN)[None, :] + tl.sum(x, 1)
    rank_new = RN - tl.sum(x, 2) + tl.sum(y, 1)
    slots = tl.arange(0, RN)[None, None, :]
    hit_r = rank_run[:, :, None] == slots
    hit_n = rank_new[:, :, None] == slots
    out_v = tl.sum(tl.where(hit_r, run_v[:, :, None], 0.0), 1) + tl.sum(
        tl.where(hit_n, new_v[:, :, None], 0.0), 1
    )
    out_j = tl.sum(tl.where(hit_r, run_j[:, :, None], 0), 1) + tl.sum(
        tl.where(hit_n, new_j[:, :, None], 0), 1
    )
    return out_v, out_j


@triton.jit
def _merge_rounds(run_v, run_j, new_v, new_j, TOPN: tl.constexpr):
    """The TOPN best of running ∪ tile per row by TOPN rounds of max-and-remove on int64 keys (importance
    bits high, 0x7fffffff − j low; −1 for non-candidates), descending, (−1.0, 0) padded. Cheaper than the
    rank merge when a program holds many positions (its pairwise tensors grow with BT·RN·RN)."""
    run = tl.where(
        run_v >= 0, (run_v.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (0x7FFFFFFF - run_j), -1
    )
    key = tl.where(
        new_v >= 0, (new_v.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (0x7FFFFFFF - new_j), -1
    )
    slots = tl.arange(0, run.shape[1])[None, :]
    top = tl.full(run.shape, -1, tl.int64)
    gone = -(2**62)
    for s in tl.static_range(TOPN):
        best = tl.maximum(tl.max(run, 1), tl.max(key, 1))
        top = tl.where(slots == s, best[:, None], top)
        run = tl.where(run == best[:, None], gone, run)
        key = tl.where(key == best[:, None], gone, key)
    ok = top >= 0
    out_v = tl.where(ok, (top >> 32).to(tl.int32).to(tl.float32, bitcast=True), -1.0)
    out_j = tl.where(ok, 0x7FFFFFFF - (top & 0x7FFFFFFF).to(tl.int32), 0)
    return out_v, out_j


@triton.jit
def _sort_ascending(x):
    """Row-wise ascending sort of distinct int32 values [BT, R] by ranking (no tl.sort: it miscompiles
    small 2-D shapes on Triton 3.6)."""
    rank = tl.sum((x[:, None, :] < x[:, :, None]).to(tl.int32), 2)
    slots = tl.arange(0, x.shape[1])[None, None, :]
    return tl.sum(tl.where(rank[:, :, None] == slots, x[:, :, None], 0), 1)


@triton.jit
def select_kernel(
    Q, KC, LSE, IDX, CU_Q, CU_K,
    sq_t, sq_h, sk_t, sk_h, sl_t, sl_h, si_t, si_h,
    scale_log2,
    GROUP: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr,
    CSTRIDE: tl.constexpr, CSPAN: tl.constexpr, SEL: tl.constexpr, TOPN: tl.constexpr,
    RATIO: tl.constexpr, RP: tl.constexpr, QC: tl.constexpr, SPILL: tl.constexpr,
    BJ: tl.constexpr, RN: tl.constexpr, RANK_MERGE: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr,
):  # fmt: skip
    """IDX[t, h, :TOPN] for BT positions: selected block ids, ascending, −1 padded.

    RATIO = l'/d compressed entries per selection block (RP its power-of-two pad), QC = l/d, SPILL = how
    many later blocks one tile's entries reach past the tile (static), BJ = blocks per tile = running size.
    """
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first: work grows with t
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    T = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    Tk = tl.load(CU_K + b + 1) - k_start
    t0 = pid * BT
    if t0 >= T:
        return
    rows = tl.arange(0, BT * GP)
    t = t0 + rows // GP
    g = rows % GP
    row_ok = (t < T) & (g < GROUP)
    hq = h * GROUP + g
    tok = (q_start + t).to(tl.int64)
    dk = tl.arange(0, BDK)
    q = tl.load(
        Q + tok[:, None] * sq_t + hq[:, None] * sq_h + dk[None, :],
        mask=row_ok[:, None] & (dk[None, :] < DK),
        other=0.0,
    )
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
    run_v = tl.full([BT, RN], -2.0, tl.float32)
    run_j = 0x7FFFFFF0 - RN + tl.zeros([BT, RN], tl.int32) + tl.arange(0, RN)[None, :]
    slot = tl.arange(0, RN)[None, :]
    carry = tl.zeros([BT, BJ], tl.float32)
    kc_base = KC + h * sk_h
    for j0 in range(0, nb_hi, BJ):
        ci = j0 * RATIO + col_blk * RATIO + col_u
        c_ok = (col_u < RATIO) & (ci < Tk)
        kc = tl.load(
            kc_base + (k_start + ci).to(tl.int64)[None, :] * sk_t + dk[:, None],
            mask=c_ok[None, :] & (dk[:, None] < DK),
            other=0.0,
        )
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
        cand = (j <= cur[:, None]) & (tt[:, None] < T)
        forced = (j == 0) | (j == cur[:, None]) | (j == cur[:, None] - 1)
        val = tl.where(cand, tl.where(forced, float("inf"), imp), -1.0)
        kth_v = tl.sum(tl.where(slot == TOPN - 1, run_v, 0.0), 1)
        kth_j = tl.sum(tl.where(slot == TOPN - 1, run_j, 0), 1)
        if tl.max(_beats(val, j, kth_v[:, None], kth_j[:, None]).to(tl.int32)) > 0:
            if RANK_MERGE:
                run_v, run_j = _merge_top(run_v, run_j, val, j)
            else:
                run_v, run_j = _merge_rounds(run_v, run_j, val, j, TOPN)
    big = 0x7FFFFFF0
    chosen = tl.where((run_v >= 0) & (slot < TOPN), run_j, big + slot)
    chosen = _sort_ascending(chosen)
    chosen = tl.where(chosen >= big, -1, chosen)
    out_tok = (q_start + tt).to(tl.int64)
    tl.store(
        IDX + out_tok[:, None] * si_t + h * si_h + slot,
        chosen,
        mask=(tt[:, None] < T) & (slot < TOPN),
    )


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
    rn = max(16, triton.next_power_of_2(params.top_n))
    # rows per program, measured on the H100 at 64k (NOTES.md): G16 64 rows (4 positions, rank merge) 35.8 ms
    # vs 40.5 at 128; G4 256 rows (64 positions, round merge) 23.1 ms vs 37.0 at 128
    rows = (64 if gp >= 16 else 256) if q.device.type == "cuda" else 16
    bt = max(1, rows // gp)
    if bt * gp < 16:
        bt = 16 // gp
    warps = 4 if q.device.type != "cuda" else (8 if bt * gp >= 128 else 4)
    grid = (triton.cdiv(max_len, bt), hkv, n_seq)
    select_kernel[grid](
        q, k_cmp, lse_cmp, indices, cu_q, cu_k,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse_cmp.stride(0), lse_cmp.stride(1),
        indices.stride(0), indices.stride(1),
        params.scale * LOG2E,
        GROUP=group, GP=gp, BT=bt, CSTRIDE=params.compress_stride, CSPAN=params.compress_block,
        SEL=params.block_size, TOPN=params.top_n, RATIO=ratio, RP=triton.next_power_of_2(ratio),
        QC=qc, SPILL=spill, BJ=bj, RN=rn, RANK_MERGE=bt <= 8, DK=dk, BDK=max(16, triton.next_power_of_2(dk)),
        num_warps=warps, num_stages=2 if q.device.type == "cuda" else 1,
    )  # fmt: skip
