"""Triton NSA decoding: the newest n tokens of each sequence against its KV cache (`reference.nsa_decode`).

Group-centric: the rows of a program are the n new tokens × the G query heads of one KV head (flattened,
row = j·G + g, padded to ≥ 16 for the matrix units), so each K/V tile it loads serves the whole group. A
step reads only the compressed keys/values, the n selected blocks and the window. Four launches:

1. compressed partials, split-K over the compressed keys (enough programs to fill the GPU at batch 1):
   each writes its slice's scaled scores (selection needs them) and an online-softmax partial (m, l, acc);
2. reduce + select, one program per (sequence, KV head, new token): merges the partials into g_cmp·o_cmp
   and its lse, turns the scores into p_cmp, folds them into block importance (eq. 9, summed over the
   group: eq. 10) tile by tile, then ranks all blocks at once by a threshold search (forced blocks first,
   ties to the lower index; no sort);
3. sparse partials, one program per (sequence, KV head, chunk): a chunk is one selected-block slot (every
   new token's block in that slot) or one BW-token tile of the window;
4. combine: merges the selected and window partials and adds them, gated, to the compressed branch.

Caches are right-aligned (row S − L_b + p of k/v is token p of sequence b); compressed keys start at 0 per
sequence. Nothing here syncs with the host, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_convert.spec import SparsityParams, num_compressed_blocks, num_selection_blocks

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
MAX_ROWS = 64
"""Rows (new tokens × group heads) per program; longer decodes are split into chunks of new tokens."""
BC = 64
"""Compressed keys per tile."""
BW = 64
"""Window keys per tile (one program each)."""
TILE = 8192
"""Elements of the 3-D tiles (importance terms, partial accumulators) one load takes."""
MAX_SPLITS = 64
"""Most programs the compressed keys of one (sequence, KV head) are split over."""
POISON = False
"""Tests set this to fill every buffer the kernels must write with NaN (or −7777 for indices) first."""


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not POISON:
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7777, dtype=dtype, device=device)


@triton.jit
def _band_weight(k, R: tl.constexpr, QC: tl.constexpr):
    """#{(m, n): m < R, n < QC, m + n = k}: how often p_cmp[R(j + 1) − 1 − k] counts for block j (eq. 9)."""
    w = tl.minimum(tl.minimum(k, R - 1), tl.minimum(QC - 1, R + QC - 2 - k)) + 1
    return tl.where((k >= 0) & (k <= R + QC - 2), w, 0).to(tl.float32)


@triton.jit
def _online(m_i, l_i, acc, s, v):
    """One online-softmax step over scores s [R, N] (log2 domain, −inf masked) and values v [N, DV]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _merge_partials(PM, PL, PA, r, r_ok, c_lo, c_hi, sp_c, spa_c, spa_r, dv, DV: tl.constexpr, GP: tl.constexpr,
                    CP: tl.constexpr, CCH: tl.constexpr, BDV: tl.constexpr):  # fmt: skip
    """Merge the (m, l, acc) partials c_lo … c_hi − 1 (c_hi − c_lo ≤ CP) of rows r (pointers at this (b, h)).

    The maxima and sums of all partials are read at once; the accumulators CCH partials per load.
    """
    c = c_lo + tl.arange(0, CP)
    ok = (c < c_hi)[:, None] & r_ok[None, :]
    m_all = tl.load(PM + c[:, None] * sp_c + r[None, :], mask=ok, other=-1.0e30)
    m = tl.max(m_all, 0)
    l_sum = tl.sum(
        tl.load(PL + c[:, None] * sp_c + r[None, :], mask=ok, other=0.0) * tl.math.exp2(m_all - m[None, :]), 0
    )
    acc = tl.zeros([GP, BDV], tl.float32)
    for c0 in range(c_lo, c_hi, CCH):
        cc = c0 + tl.arange(0, CCH)
        ok2 = (cc < c_hi)[:, None] & r_ok[None, :]
        m_c = tl.load(PM + cc[:, None] * sp_c + r[None, :], mask=ok2, other=-1.0e30)
        a_c = tl.load(
            PA + cc[:, None, None] * spa_c + r[None, :, None] * spa_r + dv[None, None, :],
            mask=ok2[:, :, None] & (dv[None, None, :] < DV),
            other=0.0,
        )
        acc += tl.sum(a_c * tl.math.exp2(m_c - m[None, :])[:, :, None], 0)
    return m, l_sum, acc


@triton.jit
def _cmp_partial_kernel(
    Q, KC, VC, LENS, SC, PM, PL, PA,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    ssc_bh, ssc_r, sp_bh, sp_s, spa_bh, spa_s, spa_r,
    n_new, split_len, tc_bound, scale_log2,
    HKV: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, CSTRIDE: tl.constexpr, CSPAN: tl.constexpr,
    BLOCK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
):  # fmt: skip
    """Scores and an online-softmax partial over compressed keys split·split_len … of one (b, KV head)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    length = tl.load(LENS + b)
    r = tl.arange(0, ROWS)
    j = r // GROUP
    row_ok = j < n_new
    t = length - n_new + j
    nvis = tl.where(row_ok & (t + 1 >= CSPAN), (t + 1 - CSPAN) // CSTRIDE + 1, 0)
    nvis = tl.minimum(nvis, tc_bound)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, tl.max(nvis, 0))
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    b64 = b.to(tl.int64)
    q = tl.load(
        Q + b64 * sq_b + j[:, None] * sq_t + (h * GROUP + r % GROUP)[:, None] * sq_h + dk[None, :],
        mask=row_ok[:, None] & (dk[None, :] < DK),
        other=0.0,
    )
    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BDV], tl.float32)
    k_base = KC + b64 * sk_b + h * sk_h
    v_base = VC + b64 * sv_b + h * sv_h
    sc_base = SC + bh.to(tl.int64) * ssc_bh
    for c0 in range(lo, hi, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        c_ok = c < hi
        kt = tl.load(
            k_base + c[None, :].to(tl.int64) * sk_t + dk[:, None],
            mask=c_ok[None, :] & (dk[:, None] < DK),
            other=0.0,
        )
        s = tl.dot(q, kt) * scale_log2
        s = tl.where(row_ok[:, None] & (c[None, :] < nvis[:, None]), s, float("-inf"))
        tl.store(sc_base + r[:, None] * ssc_r + c[None, :], s, mask=row_ok[:, None] & c_ok[None, :])
        vv = tl.load(
            v_base + c[:, None].to(tl.int64) * sv_t + dv[None, :],
            mask=c_ok[:, None] & (dv[None, :] < DV),
            other=0.0,
        )
        m_i, l_i, acc = _online(m_i, l_i, acc, s, vv)
    tl.store(PM + bh * sp_bh + split * sp_s + r, m_i, mask=row_ok)
    tl.store(PL + bh * sp_bh + split * sp_s + r, l_i, mask=row_ok)
    tl.store(
        PA + bh * spa_bh + split * spa_s + r[:, None] * spa_r + dv[None, :],
        acc,
        mask=row_ok[:, None] & (dv[None, :] < DV),
    )


@triton.jit
def _cmp_select_kernel(
    SC, PM, PL, PA, GATE, LENS, ACC, LSE, IMP, IDX,
    ssc_bh, ssc_r, sp_bh, sp_s, spa_bh, spa_s, spa_r,
    sg_b, sg_t, sg_h, sa_b, sa_t, sa_h, sl_b, sl_t, sl_h, si_b, si_t, si_h,
    n_new, n_split,
    HKV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, CSTRIDE: tl.constexpr, CSPAN: tl.constexpr,
    SEL: tl.constexpr, TOPN: tl.constexpr, TOPNP: tl.constexpr, RATIO: tl.constexpr, QC: tl.constexpr,
    KWP: tl.constexpr, BLOCKS: tl.constexpr, NBP: tl.constexpr, CP: tl.constexpr, CCH: tl.constexpr,
    DV: tl.constexpr, BDV: tl.constexpr,
):  # fmt: skip
    """g_cmp·o_cmp, lse_cmp and the top-n blocks of new token jq of one (b, KV head).

    Block importance goes tile by tile into IMP (this program's row), then the whole row is ranked by
    a 31-step search for the importance threshold of the n-th block (float bits are ordered like the
    floats: importance is non-negative; forced blocks get +inf), ties going to the lower blocks.
    """
    bh = tl.program_id(0)
    jq = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    t = tl.load(LENS + b) - n_new + jq
    g = tl.arange(0, GP)
    g_ok = g < GROUP
    r = jq * GROUP + g
    hq = h * GROUP + g
    dv = tl.arange(0, BDV)
    m, l_sum, acc = _merge_partials(
        PM + bh * sp_bh, PL + bh * sp_bh, PA + bh * spa_bh, r, g_ok, 0, n_split, sp_s, spa_s, spa_r, dv, DV, GP,
        CP, CCH, BDV,
    )  # fmt: skip
    nonempty = l_sum > 0
    l_safe = tl.where(nonempty, l_sum, 1.0)
    lse2 = tl.where(nonempty, m + tl.math.log2(l_safe), float("inf"))
    gate = tl.load(GATE + b * sg_b + jq * sg_t + hq * sg_h, mask=g_ok, other=0.0).to(tl.float32)
    tl.store(
        ACC + b * sa_b + jq * sa_t + hq[:, None] * sa_h + dv[None, :],
        acc * (gate / l_safe)[:, None],
        mask=g_ok[:, None] & (dv[None, :] < DV),
    )
    tl.store(LSE + b * sl_b + jq * sl_t + hq * sl_h, tl.where(nonempty, lse2 * LN2, float("-inf")), mask=g_ok)

    nvis = tl.where(t + 1 >= CSPAN, (t + 1 - CSPAN) // CSTRIDE + 1, 0)
    cur = tl.where(t >= 0, t // SEL, -1)
    kw = tl.arange(0, KWP)
    wk = _band_weight(kw, RATIO, QC)
    sc_base = SC + bh.to(tl.int64) * ssc_bh
    imp_base = IMP + (bh * n_new + jq).to(tl.int64) * NBP
    for j0 in range(0, cur + 1, BLOCKS):
        jb = j0 + tl.arange(0, BLOCKS)
        ci = RATIO * (jb[:, None] + 1) - 1 - kw[None, :]
        c_ok = (ci >= 0) & (ci < nvis) & (wk[None, :] > 0)
        sc = tl.load(
            sc_base + r[:, None, None] * ssc_r + ci[None, :, :],
            mask=g_ok[:, None, None] & c_ok[None, :, :],
            other=float("-inf"),
        )
        p_grp = tl.sum(tl.math.exp2(sc - lse2[:, None, None]), 0)
        tl.store(imp_base + jb, tl.sum(p_grp * wk[None, :], 1), mask=jb <= cur)
    tl.debug_barrier()
    j = tl.arange(0, NBP)
    cand = j <= cur
    imp = tl.load(imp_base + j, mask=cand, other=0.0)
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    bits = tl.where(cand, tl.where(forced, 0x7F800000, imp.to(tl.int32, bitcast=True)), -1)
    lo = 0
    hi = 0x7F800001
    for _ in tl.static_range(31):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((bits >= mid).to(tl.int32), 0) >= TOPN
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = bits > lo
    ties = bits == lo
    need = TOPN - tl.sum(above.to(tl.int32), 0)
    chosen = above | (ties & (tl.cumsum(ties.to(tl.int32), 0) <= need))
    chosen = tl.where(tl.sum(cand.to(tl.int32), 0) <= TOPN, cand, chosen)
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    idx_base = IDX + b * si_b + jq * si_t + h * si_h
    tl.store(idx_base + slot, j.to(tl.int64), mask=chosen)
    s = tl.arange(0, TOPNP)
    count = tl.sum(chosen.to(tl.int32), 0)
    tl.store(idx_base + s, tl.full([TOPNP], -1, tl.int64), mask=(s >= count) & (s < TOPN))


@triton.jit
def _sparse_partial_kernel(
    Q, K, V, KW, VW, IDX, LENS, PM, PL, PA,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, skw_b, skw_t, skw_h, svw_b, svw_t, svw_h,
    si_b, si_t, si_h, sp_bh, sp_c, spa_bh, spa_c, spa_r,
    n_new, rows_k, rows_w, scale_log2,
    HKV: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, SEL: tl.constexpr, BS: tl.constexpr,
    TOPN: tl.constexpr, WINDOW: tl.constexpr, BWIN: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
):  # fmt: skip
    """Partial of chunk c of one (b, KV head): selected-block slot c (c < TOPN) or window tile c − TOPN."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    length = tl.load(LENS + b)
    r = tl.arange(0, ROWS)
    jr = r // GROUP
    row_ok = jr < n_new
    t = length - n_new + jr
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    b64 = b.to(tl.int64)
    q = tl.load(
        Q + b64 * sq_b + jr[:, None] * sq_t + (h * GROUP + r % GROUP)[:, None] * sq_h + dk[None, :],
        mask=row_ok[:, None] & (dk[None, :] < DK),
        other=0.0,
    )
    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BDV], tl.float32)
    if c < TOPN:
        kb = tl.arange(0, BS)
        k_base = K + b64 * sk_b + h * sk_h
        v_base = V + b64 * sv_b + h * sv_h
        for jq in range(n_new):
            blk = tl.load(IDX + b * si_b + jq * si_t + h * si_h + c)
            if blk >= 0:
                p = blk * SEL + kb
                p_ok = (kb < SEL) & (p <= length - n_new + jq)
                row = (rows_k - length + p).to(tl.int64)
                kt = tl.load(
                    k_base + row[None, :] * sk_t + dk[:, None],
                    mask=p_ok[None, :] & (dk[:, None] < DK),
                    other=0.0,
                )
                vv = tl.load(
                    v_base + row[:, None] * sv_t + dv[None, :],
                    mask=p_ok[:, None] & (dv[None, :] < DV),
                    other=0.0,
                )
                s = tl.dot(q, kt) * scale_log2
                s = tl.where((row_ok & (jr == jq))[:, None] & p_ok[None, :], s, float("-inf"))
                m_i, l_i, acc = _online(m_i, l_i, acc, s, vv)
    else:
        p = tl.maximum(length - n_new - WINDOW + 1, 0) + (c - TOPN) * BWIN + tl.arange(0, BWIN)
        p_ok = p < length
        row = (rows_w - length + p).to(tl.int64)
        kt = tl.load(
            KW + b64 * skw_b + h * skw_h + row[None, :] * skw_t + dk[:, None],
            mask=p_ok[None, :] & (dk[:, None] < DK),
            other=0.0,
        )
        vv = tl.load(
            VW + b64 * svw_b + h * svw_h + row[:, None] * svw_t + dv[None, :],
            mask=p_ok[:, None] & (dv[None, :] < DV),
            other=0.0,
        )
        s = tl.dot(q, kt) * scale_log2
        vis = (
            row_ok[:, None] & p_ok[None, :] & (p[None, :] <= t[:, None]) & (p[None, :] > t[:, None] - WINDOW)
        )
        m_i, l_i, acc = _online(m_i, l_i, acc, tl.where(vis, s, float("-inf")), vv)
    tl.store(PM + bh * sp_bh + c * sp_c + r, m_i, mask=row_ok)
    tl.store(PL + bh * sp_bh + c * sp_c + r, l_i, mask=row_ok)
    tl.store(
        PA + bh * spa_bh + c * spa_c + r[:, None] * spa_r + dv[None, :],
        acc,
        mask=row_ok[:, None] & (dv[None, :] < DV),
    )


@triton.jit
def _combine_kernel(
    PM, PL, PA, GATE, ACC, OUT, LSE,
    sp_bh, sp_c, spa_bh, spa_c, spa_r,
    sg_b, sg_t, sg_h, sa_b, sa_t, sa_h, so_b, so_t, so_h, sl_b, sl_t, sl_h,
    n_new, n_chunks,
    HKV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, TOPN: tl.constexpr, CP: tl.constexpr,
    CCH: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
):  # fmt: skip
    """out = g_cmp·o_cmp + g_slc·o_slc + g_win·o_win for new token jq of one (b, KV head)."""
    bh = tl.program_id(0)
    jq = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, GP)
    g_ok = g < GROUP
    r = jq * GROUP + g
    hq = h * GROUP + g
    dv = tl.arange(0, BDV)
    omask = g_ok[:, None] & (dv[None, :] < DV)
    out = tl.load(ACC + b * sa_b + jq * sa_t + hq[:, None] * sa_h + dv[None, :], mask=omask, other=0.0)
    for branch in tl.static_range(1, 3):
        c_lo = (branch - 1) * TOPN
        c_hi = TOPN + (branch - 1) * (n_chunks - TOPN)
        m, l_sum, acc = _merge_partials(
            PM + bh * sp_bh, PL + bh * sp_bh, PA + bh * spa_bh, r, g_ok, c_lo, c_hi, sp_c, spa_c, spa_r, dv, DV, GP,
            CP, CCH, BDV,
        )  # fmt: skip
        nonempty = l_sum > 0
        l_safe = tl.where(nonempty, l_sum, 1.0)
        gate = tl.load(GATE + b * sg_b + jq * sg_t + hq * sg_h + branch, mask=g_ok, other=0.0).to(tl.float32)
        out += acc * (gate / l_safe)[:, None]
        lse = tl.where(nonempty, (m + tl.math.log2(l_safe)) * LN2, float("-inf"))
        tl.store(LSE + b * sl_b + jq * sl_t + hq * sl_h + branch, lse, mask=g_ok)
    tl.store(
        OUT + b * so_b + jq * so_t + hq[:, None] * so_h + dv[None, :],
        out.to(OUT.dtype.element_ty),
        mask=omask,
    )


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk(partials: int, rows: int, width: int) -> int:
    """Partials per accumulator load: a power of two ≤ partials with rows × width × it ≤ TILE."""
    return max(1, min(partials, TILE // (rows * width)))


def _decode_chunk(q, k, v, k_cmp, v_cmp, gates, lens, params, k_win, v_win):
    """One launch set for n ≤ MAX_ROWS / G new tokens: (out, lse, indices)."""
    batch, n, hq, dk = q.shape
    hkv, dv, rows_k = k.shape[2], v.shape[3], k.shape[1]
    group = hq // hkv
    device = q.device
    rows = n * group
    rows_p = max(16, triton.next_power_of_2(rows))
    gp = triton.next_power_of_2(group)
    bdk, bdv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    length, stride, block = params.compress_block, params.compress_stride, params.block_size
    tc_bound = min(k_cmp.shape[1], num_compressed_blocks(rows_k, length, stride))
    if k_cmp.shape[1] == 0:
        k_cmp = q.new_zeros(batch, 1, hkv, dk)
        v_cmp = q.new_zeros(batch, 1, hkv, dv)
    tiles = triton.cdiv(tc_bound, BC)
    n_split = max(1, min(tiles, MAX_SPLITS, triton.cdiv(2 * _sm_count(device), batch * hkv)))
    split_len = max(1, triton.cdiv(tiles, n_split)) * BC
    n_split = max(1, triton.cdiv(tc_bound, split_len))
    f32 = dict(dtype=torch.float32, device=device)
    scores = _empty(batch * hkv, rows, max(1, tc_bound), **f32)
    pm = _empty(batch * hkv, n_split, rows, **f32)
    pl = _empty(batch * hkv, n_split, rows, **f32)
    pa = _empty(batch * hkv, n_split, rows, dv, **f32)
    warps = 4
    _cmp_partial_kernel[(batch * hkv, n_split)](
        q, k_cmp, v_cmp, lens, scores, pm, pl, pa,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        v_cmp.stride(0), v_cmp.stride(1), v_cmp.stride(2),
        scores.stride(0), scores.stride(1), pm.stride(0), pm.stride(1), pa.stride(0), pa.stride(1), pa.stride(2),
        n, split_len, tc_bound, params.scale * LOG2E,
        HKV=hkv, GROUP=group, ROWS=rows_p, CSTRIDE=stride, CSPAN=length, BLOCK=BC, DK=dk, DV=dv, BDK=bdk, BDV=bdv,
        num_warps=warps,
    )  # fmt: skip
    acc = _empty(batch, n, hq, dv, **f32)
    lse = _empty(batch, n, hq, 3, **f32)
    indices = _empty(batch, n, hkv, params.top_n, dtype=torch.int64, device=device)
    ratio, per_cmp = block // stride, length // stride
    kwp = triton.next_power_of_2(ratio + per_cmp - 1)
    nbp = triton.next_power_of_2(max(1, num_selection_blocks(rows_k, block)))
    importance = _empty(batch * hkv * n, nbp, **f32)
    cp = triton.next_power_of_2(n_split)
    _cmp_select_kernel[(batch * hkv, n)](
        scores, pm, pl, pa, gates, lens, acc, lse, importance, indices,
        scores.stride(0), scores.stride(1), pm.stride(0), pm.stride(1), pa.stride(0), pa.stride(1), pa.stride(2),
        gates.stride(0), gates.stride(1), gates.stride(2), acc.stride(0), acc.stride(1), acc.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), indices.stride(0), indices.stride(1), indices.stride(2),
        n, n_split,
        HKV=hkv, GROUP=group, GP=gp, CSTRIDE=stride, CSPAN=length, SEL=block, TOPN=params.top_n,
        TOPNP=triton.next_power_of_2(params.top_n), RATIO=ratio, QC=per_cmp, KWP=kwp,
        BLOCKS=max(16, min(nbp, TILE // (gp * kwp))), NBP=nbp, CP=cp, CCH=_chunk(cp, gp, bdv), DV=dv, BDV=bdv,
        num_warps=max(warps, min(16, nbp // 256)),
    )  # fmt: skip
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    n_chunks = params.top_n + triton.cdiv(params.window + n - 1, BW)
    pm2 = _empty(batch * hkv, n_chunks, rows, **f32)
    pl2 = _empty(batch * hkv, n_chunks, rows, **f32)
    pa2 = _empty(batch * hkv, n_chunks, rows, dv, **f32)
    _sparse_partial_kernel[(batch * hkv, n_chunks)](
        q, k, v, k_win, v_win, indices, lens, pm2, pl2, pa2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), k_win.stride(0), k_win.stride(1), k_win.stride(2), v_win.stride(0), v_win.stride(1),
        v_win.stride(2), indices.stride(0), indices.stride(1), indices.stride(2),
        pm2.stride(0), pm2.stride(1), pa2.stride(0), pa2.stride(1), pa2.stride(2),
        n, rows_k, k_win.shape[1], params.scale * LOG2E,
        HKV=hkv, GROUP=group, ROWS=rows_p, SEL=block, BS=max(16, triton.next_power_of_2(block)),
        TOPN=params.top_n, WINDOW=params.window, BWIN=BW, DK=dk, DV=dv, BDK=bdk, BDV=bdv,
        num_warps=warps,
    )  # fmt: skip
    out = _empty(batch, n, hq, dv, dtype=q.dtype, device=device)
    cp2 = triton.next_power_of_2(max(params.top_n, n_chunks - params.top_n))
    _combine_kernel[(batch * hkv, n)](
        pm2, pl2, pa2, gates, acc, out, lse,
        pm2.stride(0), pm2.stride(1), pa2.stride(0), pa2.stride(1), pa2.stride(2),
        gates.stride(0), gates.stride(1), gates.stride(2), acc.stride(0), acc.stride(1), acc.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        n, n_chunks,
        HKV=hkv, GROUP=group, GP=gp, TOPN=params.top_n, CP=cp2, CCH=_chunk(cp2, gp, bdv), DV=dv, BDV=bdv,
        num_warps=warps,
    )  # fmt: skip
    return out, lse, indices


def _unit_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index the last dimension directly."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `reference.nsa_decode` (any strides with a unit last one; no host sync).

    Returns out (B, n, Hq, Dv) in q's dtype, lse (B, n, Hq, 3) float32, indices (B, n, Hkv, top_n) int64.
    """
    params = params.resolved(q.shape[-1])
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win = (
        _unit_stride(x) for x in (q, k, v, k_cmp, v_cmp, gates, k_win, v_win)
    )
    lens = seq_lens.to(torch.int32)
    n = q.shape[1]
    per_chunk = max(1, MAX_ROWS // (q.shape[2] // k.shape[2]))
    if n <= per_chunk:
        return _decode_chunk(q, k, v, k_cmp, v_cmp, gates, lens, params, k_win, v_win)
    parts = []
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        # The first `stop` new tokens are a decode of their own once the cache forgets the later ones.
        drop = n - stop
        k_c, v_c, kw_c, vw_c = (
            None if x is None else x[:, : x.shape[1] - drop] for x in (k, v, k_win, v_win)
        )
        parts.append(
            _decode_chunk(
                q[:, start:stop],
                k_c,
                v_c,
                k_cmp,
                v_cmp,
                gates[:, start:stop],
                lens - drop,
                params,
                kw_c,
                vw_c,
            )
        )
    return tuple(torch.cat(part, dim=1) for part in zip(*parts, strict=True))
