"""Selected-block attention, position by position or block by block.

Group-centric loading: one program holds all G query heads of a KV head at one position (rows padded to
16 for the matrix units) and walks that position's selected blocks, so each K/V block it loads serves the
whole group. The dk/dv pass inverts the selection (which positions chose block j) with a stable sort and
gives each (block, KV head, chunk of those positions) programs that gather the positions × group heads into
their row tiles; the chunks' partial sums are added in chunk order, without atomics, so it is deterministic.

For small groups the position-by-position forward is bound by its K/V gathers (n·l' keys per position for
only G rows), so below BLOCKS_BELOW_GROUP the forward goes block by block too: each program loads one K/V
block once, attends the gathered rows (positions × heads) that chose it and writes one partial output and
log-sum-exp per (position, slot, head); a combine pass merges each position's slots in slot order.

Layouts as in banded.py: q [N, Hq, DK], k [N, Hkv, DK], v [N, Hkv, DV], idx [N, Hkv, n] (block ids local to
each sequence, ascending, −1 padded), gates/lse [N, Hq, 3] (column 1 is this branch).
"""

from __future__ import annotations

import bisect
import os

import torch
import triton
import triton.language as tl

from nsa_convert.kernels.banded import ADD_ACC, LN2_C, LOG2E
from nsa_convert.kernels.buffers import empty
from nsa_convert.kernels.tiles import load_cols, load_pairs, load_rows


@triton.jit
def _epilogue(
    m_i, l_i, acc, tok, hq, g_ok, dv, GATE, ACC, LSE, sg_t, sg_h, sa_t, sa_h, sl_t, sl_h,
    MODE: tl.constexpr, DV: tl.constexpr,
):  # fmt: skip
    """The branch's lse (log2 running max m_i, sum l_i) into LSE[..., 1]; gate_slc · acc / l_i stored into,
    or (MODE 1) added to, the fp32 accumulator. One position's group heads as rows."""
    nonempty = l_i > 0
    lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * LN2_C, float("-inf"))
    tl.store(LSE + tok * sl_t + hq * sl_h + 1, lse, mask=g_ok)
    gate = tl.load(GATE + tok * sg_t + hq * sg_h + 1, mask=g_ok, other=0.0).to(tl.float32)
    o = acc * (gate / tl.where(nonempty, l_i, 1.0))[:, None]
    a_ptr = ACC + tok * sa_t + hq[:, None] * sa_h + dv[None, :]
    omask = g_ok[:, None] & (dv[None, :] < DV)
    if MODE == 1:
        o += tl.load(a_ptr, mask=omask, other=0.0)
    tl.store(a_ptr, o, mask=omask)


@triton.jit
def selected_fwd_kernel(
    Q, K, V, IDX, GATE, ACC, LSE, CU,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, si_t, si_h, sg_t, sg_h, sa_t, sa_h, sl_t, sl_h,
    scale_log2,
    GROUP: tl.constexpr, BH: tl.constexpr, SEL: tl.constexpr, BS: tl.constexpr, TOPN: tl.constexpr,
    MODE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
):  # fmt: skip
    """One program: position t of one KV head, all group heads as rows, online softmax over its blocks."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU + b)
    T = tl.load(CU + b + 1) - q_start
    if t >= T:
        return
    tok = (q_start + t).to(tl.int64)
    g = tl.arange(0, BH)
    g_ok = g < GROUP
    hq = h * GROUP + g
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    q = tl.load(
        Q + tok * sq_t + hq[:, None] * sq_h + dk[None, :], mask=g_ok[:, None] & (dk[None, :] < DK), other=0.0
    )
    m_i = tl.full([BH], -1.0e30, tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BDV], tl.float32)
    kb = tl.arange(0, BS)
    k_base = K + h * sk_h
    v_base = V + h * sv_h
    for slot in range(TOPN):
        j = tl.load(IDX + tok * si_t + h * si_h + slot)
        s = j * SEL + kb
        s_ok = (kb < SEL) & (s <= t) & (s >= 0)
        ktok = (q_start + s).to(tl.int64)
        kt = load_cols(k_base, ktok, s_ok, sk_t, dk, DK)
        vv = load_rows(v_base, ktok, s_ok, sv_t, dv, DV)
        qk = tl.where(s_ok[None, :], tl.dot(q, kt) * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    _epilogue(m_i, l_i, acc, tok, hq, g_ok, dv, GATE, ACC, LSE, sg_t, sg_h, sa_t, sa_h, sl_t, sl_h, MODE, DV)


@triton.jit
def selected_dq_kernel(
    Q, K, V, IDX, GATE, DO, LSE, DQ, DELTA, CU,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, si_t, si_h, sg_t, sg_h, sd_t, sd_h, sl_t, sl_h,
    sdq_t, sdq_h, sdl_t, sdl_h,
    scale, scale_log2,
    GROUP: tl.constexpr, BH: tl.constexpr, SEL: tl.constexpr, BS: tl.constexpr, TOPN: tl.constexpr,
    ACCUM: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
    KT: tl.constexpr,
):  # fmt: skip
    """dq (added to DQ when ACCUM) and delta = rowsum(dO ∘ o_slc) in one pass (see banded_bwd_dq_kernel);
    each selected block in tiles of KT keys (fewer registers per tile)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU + b)
    T = tl.load(CU + b + 1) - q_start
    if t >= T:
        return
    tok = (q_start + t).to(tl.int64)
    g = tl.arange(0, BH)
    g_ok = g < GROUP
    hq = h * GROUP + g
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    q = tl.load(
        Q + tok * sq_t + hq[:, None] * sq_h + dk[None, :], mask=g_ok[:, None] & (dk[None, :] < DK), other=0.0
    )
    do = tl.load(
        DO + tok * sd_t + hq[:, None] * sd_h + dv[None, :], mask=g_ok[:, None] & (dv[None, :] < DV), other=0.0
    )
    lse = tl.load(LSE + tok * sl_t + hq * sl_h + 1, mask=g_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    acc_pdp = tl.zeros([BH, BDK], tl.float32)
    acc_p = tl.zeros([BH, BDK], tl.float32)
    delta = tl.zeros([BH], tl.float32)
    k_base = K + h * sk_h
    v_base = V + h * sv_h
    for cell in range(TOPN * (BS // KT)):
        j = tl.load(IDX + tok * si_t + h * si_h + cell // (BS // KT))
        kb = cell % (BS // KT) * KT + tl.arange(0, KT)
        s = j * SEL + kb
        s_ok = (kb < SEL) & (s <= t) & (s >= 0)
        ktok = (q_start + s).to(tl.int64)
        kk = load_rows(k_base, ktok, s_ok, sk_t, dk, DK)
        vt = load_cols(v_base, ktok, s_ok, sv_t, dv, DV)
        qk = tl.dot(q, tl.trans(kk)) * scale_log2
        p = tl.where(s_ok[None, :], tl.math.exp2(qk - lse2[:, None]), 0.0)
        pdp = p * tl.dot(do, vt)
        delta += tl.sum(pdp, 1)
        acc_pdp += tl.dot(pdp.to(kk.dtype), kk)
        acc_p += tl.dot(p.to(kk.dtype), kk)
    gate = tl.load(GATE + tok * sg_t + hq * sg_h + 1, mask=g_ok, other=0.0).to(tl.float32)
    dq = (acc_pdp - delta[:, None] * acc_p) * (gate * scale)[:, None]
    dq_ptr = DQ + tok * sdq_t + hq[:, None] * sdq_h + dk[None, :]
    dq_mask = g_ok[:, None] & (dk[None, :] < DK)
    if ACCUM:
        dq += tl.load(dq_ptr, mask=dq_mask, other=0.0)
    tl.store(dq_ptr, dq, mask=dq_mask)
    tl.store(DELTA + tok * sdl_t + hq * sdl_h + 1, delta, mask=g_ok)


@triton.jit
def _work_item(w, seg, CU, SEG, WORK_OFF, seq_first, n_seq, max_blocks, CHUNK: tl.constexpr):
    """Work item w of segment seg (invert_selection): block j, KV head h, the sequence's start and length,
    and the range [p_begin, p_end) of the segment's listed positions that this item takes."""
    chunk = w - tl.load(WORK_OFF + seg)
    j = seg % max_blocks
    b = seq_first + (seg // max_blocks) % n_seq
    h = seg // (max_blocks * n_seq)
    q_start = tl.load(CU + b)
    T = tl.load(CU + b + 1) - q_start
    p_begin = tl.load(SEG + seg) + chunk * CHUNK
    p_end = tl.minimum(tl.load(SEG + seg + 1), p_begin + CHUNK)
    return j, h, q_start, T, p_begin, p_end


@triton.jit
def selected_fwd_blocks_kernel(
    Q, K, V, PART_O, PART_L, CU, POS, ENTRY, SEG, WORK_SEG, WORK_OFF,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, seq_first, n_seq, max_blocks, n_seg, scale_log2,
    GROUP: tl.constexpr, SEL: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
):  # fmt: skip
    """Block j of one KV head against up to CHUNK of the positions that chose it: for each (position, head)
    row, the block's softmax-normalised output into PART_O and its log2-sum-exp into PART_L, both at row
    ENTRY·G + head (see invert_selection). Work item w is program w: chunk w − WORK_OFF[seg] of segment
    seg = WORK_SEG[w], as in selected_dkdv_kernel."""
    w = tl.program_id(0)
    seg = tl.load(WORK_SEG + w)
    if seg >= n_seg:
        return
    j, h, q_start, T, p_begin, p_end = _work_item(
        w, seg, CU, SEG, WORK_OFF, seq_first, n_seq, max_blocks, CHUNK
    )
    kb = tl.arange(0, BS)
    s = j * SEL + kb
    s_ok = (kb < SEL) & (s < T)
    ktok = (q_start + s).to(tl.int64)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kt = load_cols(K + h * sk_h, ktok, s_ok, sk_t, dk, DK)
    vv = load_rows(V + h * sv_h, ktok, s_ok, sv_t, dv, DV)
    n_rows = (p_end - p_begin) * GROUP
    for row0 in range(0, n_rows, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        t = tl.load(POS + p_begin + rows // GROUP, mask=row_ok, other=0).to(tl.int64) - q_start
        entry = tl.load(ENTRY + p_begin + rows // GROUP, mask=row_ok, other=0).to(tl.int64)
        g = rows % GROUP
        q = load_pairs(Q, q_start + t, h * GROUP + g, row_ok, sq_t, sq_h, dk, DK)
        vis = s_ok[None, :] & (s[None, :] <= t[:, None])
        qk = tl.where(vis, tl.dot(q, kt) * scale_log2, float("-inf"))
        m = tl.max(qk, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.math.exp2(qk - m[:, None])
        l_sum = tl.sum(p, 1)
        o = tl.dot(p.to(vv.dtype), vv) / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        part = entry * GROUP + g
        tl.store(
            PART_O + part[:, None] * BDV + dv[None, :], o.to(PART_O.dtype.element_ty), mask=row_ok[:, None]
        )
        lse2 = tl.where(l_sum > 0, m + tl.math.log2(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))
        tl.store(PART_L + part, lse2, mask=row_ok)


@triton.jit
def selected_combine_kernel(
    IDX, PART_O, PART_L, GATE, ACC, LSE, first, n_tok,
    si_t, si_h, sg_t, sg_h, sa_t, sa_h, sl_t, sl_h,
    GROUP: tl.constexpr, BH: tl.constexpr, TOPN: tl.constexpr, MODE: tl.constexpr, DV: tl.constexpr,
    BDV: tl.constexpr,
):  # fmt: skip
    """One (token, KV head): merge its slots' partial outputs (selected_fwd_blocks_kernel) in slot order,
    then the epilogue of selected_fwd_kernel (gate, accumulator, the branch's lse)."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    tok = (first + i).to(tl.int64)
    g = tl.arange(0, BH)
    g_ok = g < GROUP
    hq = h * GROUP + g
    dv = tl.arange(0, BDV)
    m_i = tl.full([BH], -1.0e30, tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BDV], tl.float32)
    base = (h * n_tok + i).to(tl.int64) * TOPN
    for slot in range(TOPN):
        j = tl.load(IDX + tok * si_t + h * si_h + slot)
        ok = g_ok & (g * 0 + j >= 0)
        part = (base + slot) * GROUP + g
        lse2 = tl.load(PART_L + part, mask=ok, other=float("-inf"))
        o = tl.load(PART_O + part[:, None] * BDV + dv[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, lse2)
        alpha = tl.math.exp2(m_i - m_new)
        beta = tl.math.exp2(lse2 - m_new)
        l_i = l_i * alpha + beta
        acc = acc * alpha[:, None] + beta[:, None] * o
        m_i = m_new
    _epilogue(m_i, l_i, acc, tok, hq, g_ok, dv, GATE, ACC, LSE, sg_t, sg_h, sa_t, sa_h, sl_t, sl_h, MODE, DV)


@triton.jit
def selected_dkdv_kernel(
    Q, K, V, GATE, DO, LSE, DELTA, PART_K, PART_V, CU, POS, SEG, WORK_SEG, WORK_OFF,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sd_t, sd_h, sl_t, sl_h, sdl_t, sdl_h,
    n_seq, max_blocks, n_seg, scale, scale_log2,
    GROUP: tl.constexpr, SEL: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, KB: tl.constexpr,
):  # fmt: skip
    """Partial dk, dv of keys KB·i … of one selection block from up to CHUNK of the positions that chose it.
    Fewer keys than the block per program: smaller accumulators, more programs (the BS / KB programs of one
    work item are neighbours, so they read its rows of q and dO from L2 about together).

    POS lists, per (h, sequence, block) segment SEG[(h·n_seq + b)·max_blocks + j] … SEG[… + 1], the packed
    token index of each position that selected block j, ascending. Work item w (BS / KB programs) is chunk
    w − WORK_OFF[seg] of segment seg = WORK_SEG[w]; rows are those positions × the G group heads. Chunking
    keeps block 0 (chosen by every position) from serialising the pass; PART_K/PART_V [W, BS, BDK|BDV].
    """
    w = tl.program_id(0) // (BS // KB)
    seg = tl.load(WORK_SEG + w)
    if seg >= n_seg:
        return
    j, h, q_start, T, p_begin, p_end = _work_item(w, seg, CU, SEG, WORK_OFF, 0, n_seq, max_blocks, CHUNK)
    kb = tl.arange(0, KB)
    if KB < BS:  # a whole block per program keeps the plain index (offset arithmetic costs registers)
        kb += tl.program_id(0) % (BS // KB) * KB
    s = j * SEL + kb
    s_ok = (kb < SEL) & (s < T)
    ktok = (q_start + s).to(tl.int64)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kk = load_rows(K + h * sk_h, ktok, s_ok, sk_t, dk, DK)
    vv = load_rows(V + h * sv_h, ktok, s_ok, sv_t, dv, DV)
    n_rows = (p_end - p_begin) * GROUP
    acc_dk = tl.zeros([KB, BDK], tl.float32)
    acc_dv = tl.zeros([KB, BDV], tl.float32)
    for row0 in range(0, n_rows, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        tok = tl.load(POS + p_begin + rows // GROUP, mask=row_ok, other=0).to(tl.int64)
        t = tok - q_start
        hq = h * GROUP + rows % GROUP
        q = load_pairs(Q, tok, hq, row_ok, sq_t, sq_h, dk, DK)
        do = load_pairs(DO, tok, hq, row_ok, sd_t, sd_h, dv, DV)
        lse = tl.load(LSE + tok * sl_t + hq * sl_h + 1, mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + tok * sdl_t + hq * sdl_h + 1, mask=row_ok, other=0.0)
        gate = tl.load(GATE + tok * sg_t + hq * sg_h + 1, mask=row_ok, other=0.0).to(tl.float32)
        qk_t = tl.dot(kk, tl.trans(q)) * scale_log2
        vis = s_ok[:, None] & row_ok[None, :] & (s[:, None] <= t[None, :])
        pg_t = tl.where(vis, tl.math.exp2(qk_t - lse2[None, :]), 0.0) * gate[None, :]
        acc_dv += tl.dot(pg_t.to(do.dtype), do)
        ds_t = pg_t * (tl.dot(vv, tl.trans(do)) - delta[None, :])
        acc_dk += tl.dot(ds_t.to(q.dtype), q)
    acc_dk *= scale
    part = w.to(tl.int64) * BS + kb[:, None]
    tl.store(PART_K + part * BDK + dk[None, :], acc_dk)
    tl.store(PART_V + part * BDV + dv[None, :], acc_dv)


@triton.jit
def selected_dkdv_reduce_kernel(
    PART_K, PART_V, DK_, DV_, CU, WORK_OFF, sdk_t, sdk_h, sdv_t, sdv_h, n_seq, max_blocks,
    SEL: tl.constexpr, BS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
    BDV: tl.constexpr, ACCUM: tl.constexpr,
):  # fmt: skip
    """dk, dv of selection block j of KV head h: its chunks' partial sums, added in chunk order."""
    j = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU + b)
    T = tl.load(CU + b + 1) - q_start
    if j * SEL >= T:
        return
    seg = (h * n_seq + b) * max_blocks + j
    w0 = tl.load(WORK_OFF + seg)
    w1 = tl.load(WORK_OFF + seg + 1)
    kb = tl.arange(0, BS)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    acc_dk = tl.zeros([BS, BDK], tl.float32)
    acc_dv = tl.zeros([BS, BDV], tl.float32)
    for w in range(w0, w1):
        part = w * BS + kb[:, None]
        acc_dk += tl.load(PART_K + part * BDK + dk[None, :])
        acc_dv += tl.load(PART_V + part * BDV + dv[None, :])
    s = j * SEL + kb
    s_ok = (kb < SEL) & (s < T)
    ktok = (q_start + s).to(tl.int64)
    dk_ptr = DK_ + ktok[:, None] * sdk_t + h * sdk_h + dk[None, :]
    dv_ptr = DV_ + ktok[:, None] * sdv_t + h * sdv_h + dv[None, :]
    dk_mask = s_ok[:, None] & (dk[None, :] < DK)
    dv_mask = s_ok[:, None] & (dv[None, :] < DV)
    if ACCUM:
        acc_dk += tl.load(dk_ptr, mask=dk_mask, other=0.0)
        acc_dv += tl.load(dv_ptr, mask=dv_mask, other=0.0)
    tl.store(dk_ptr, acc_dk, mask=dk_mask)
    tl.store(dv_ptr, acc_dv, mask=dv_mask)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _gather_consts(q, k, v, params):
    group = q.shape[1] // k.shape[1]
    gpu = q.device.type == "cuda"
    return dict(
        GROUP=group, BH=_pow2(group), SEL=params.block_size, BS=_pow2(params.block_size),
        TOPN=params.top_n, DK=q.shape[2], DV=v.shape[2], BDK=_pow2(q.shape[2]), BDV=_pow2(v.shape[2]),
        num_warps=4, num_stages=2 if gpu else 1,
    )  # fmt: skip


def _dq_config(q, block: int) -> tuple[int, int]:
    """(warps, keys per tile) of the selected dq pass. 2 warps beat 4 on the H100 at 64k (dq 23.1 → 20.8 ms
    paper-G16, 46.1 → 40.5 llama-G4; 8 were slower); the forward keeps 4 (2 was slower for G = 4). Whole
    blocks per tile take 255 registers (offline sm_90 compile), so 4 programs per SM: NSA_SLC_DQ="warps,keys"
    overrides (benchmarking; keys a power of two ≥ 16 dividing the padded block)."""
    env = os.environ.get("NSA_SLC_DQ")
    if env:
        warps, keys = (int(x) for x in env.split(","))
        return warps, _key_tile("NSA_SLC_DQ", keys, block)
    return (2 if q.device.type == "cuda" else 4), block


def _dkdv_config(q, block: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, warps, stages, CHUNK, keys per program) of the dk/dv pass, measured on the H100 at 64k
    (sweep_backward.py, 2026-12-08): 32 rows with 4 warps and whole blocks, slc bwd 63.4 → 43.8 ms paper-G16
    and 67.5 → 56.3 ms llama-G4 against 64 rows with 8 warps (the earlier setting).
    NSA_SLC_DKDV="bm,warps,stages,chunk[,keys]" overrides (benchmarking; keys a power of two ≥ 16 dividing
    the padded block)."""
    env = os.environ.get("NSA_SLC_DKDV")
    if env:
        values = [int(x) for x in env.split(",")]
        return (*values[:4], _key_tile("NSA_SLC_DKDV", values[4], block) if len(values) > 4 else block)
    if q.device.type != "cuda":
        return 16, 4, 1, 8, block
    return 32, 4, 2, 1024, block


def _key_tile(variable: str, keys: int, block: int) -> int:
    """An override's keys per tile: a power of two from 16 up to the padded block (so it divides it)."""
    if keys < 16 or keys > block or keys & (keys - 1):
        raise ValueError(f"{variable}: keys per tile must be a power of two from 16 to {block}, got {keys}")
    return keys


BLOCKS_BELOW_GROUP = 5
"""Groups smaller than this take the block-by-block forward. On the H100 at 64k it beat the position-by-
position one for G = 4 (33.1 → 22.7 ms) and lost for G = 7, 8 and 16 (RESULTS.md)."""

PARTIAL_BYTES = 1 << 30
"""Bound on the block-by-block forward's partial outputs: longer inputs run in chunks of positions."""


def _blocks_config(q):
    """(BLOCK_M, warps, stages, CHUNK) of the block-by-block forward; on the H100 64 rows, 4 warps and 2
    stages were best or tied (of 32/64/128 rows, 4/8 warps, 2/3 stages, chunks of 64–1024).
    NSA_SLC_FWD_BLOCKS="bm,warps,stages,chunk" overrides (benchmarking)."""
    if q.device.type != "cuda":
        return 16, 4, 1, 8
    env = os.environ.get("NSA_SLC_FWD_BLOCKS")
    if env:
        return tuple(int(x) for x in env.split(","))
    return 64, 4, 2, 256


def selected_forward(q, k, v, idx, gates, acc, lse, cu, max_len, params, *, accumulate):
    """acc [N, Hq, DV] (fp32) = or += gate_slc · o_slc; lse[..., 1] = the branch's log-sum-exp."""
    consts = _gather_consts(q, k, v, params)
    mode = ADD_ACC if accumulate else 0
    if consts["GROUP"] < BLOCKS_BELOW_GROUP:
        _selected_forward_blocks(q, k, v, idx, gates, acc, lse, cu, max_len, params, consts, mode)
        return
    grid = (max_len, k.shape[1], cu.numel() - 1)
    selected_fwd_kernel[grid](
        q, k, v, idx, gates, acc, lse, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        idx.stride(0), idx.stride(1), gates.stride(0), gates.stride(1), acc.stride(0), acc.stride(1),
        lse.stride(0), lse.stride(1), params.scale * LOG2E, MODE=mode, **consts,
    )  # fmt: skip


def _selected_forward_blocks(q, k, v, idx, gates, acc, lse, cu, max_len, params, consts, mode):
    """The block-by-block forward (module docstring), in chunks of positions under PARTIAL_BYTES; each
    chunk's work list covers only the sequences it overlaps (many short packed documents stay cheap)."""
    n_tok, hq, _ = q.shape
    hkv, top_n, group, bdv = k.shape[1], params.top_n, consts["GROUP"], consts["BDV"]
    step = max(1, PARTIAL_BYTES // (hq * top_n * (bdv * q.element_size() + 4)))
    block_m, warps, stages, chunk = _blocks_config(q)
    offsets = cu.tolist()
    gather = {name: consts[name] for name in ("GROUP", "SEL", "BS", "DK", "DV", "BDK", "BDV")}
    for first in range(0, n_tok, step):
        n = min(step, n_tok - first)
        seq_first = bisect.bisect_right(offsets, first) - 1
        n_seq = bisect.bisect_left(offsets, first + n) - seq_first
        longest = max(offsets[b + 1] - offsets[b] for b in range(seq_first, seq_first + n_seq))
        max_blocks = triton.cdiv(longest, params.block_size)
        pos, entry, seg, work_seg, work_off = invert_selection(
            idx[first : first + n], cu, max_blocks, chunk, first, seq_first, n_seq
        )
        part_o = empty(hkv * n * top_n * group, bdv, dtype=q.dtype, device=q.device)
        part_l = empty(part_o.shape[0], dtype=torch.float32, device=q.device)
        selected_fwd_blocks_kernel[(work_seg.numel(),)](
            q, k, v, part_o, part_l, cu, pos, entry.to(torch.int32), seg, work_seg, work_off,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            seq_first, n_seq, max_blocks, hkv * n_seq * max_blocks, params.scale * LOG2E,
            BLOCK_M=block_m, CHUNK=chunk, num_warps=warps, num_stages=stages, **gather,
        )  # fmt: skip
        selected_combine_kernel[(n, hkv)](
            idx, part_o, part_l, gates, acc, lse, first, n,
            idx.stride(0), idx.stride(1), gates.stride(0), gates.stride(1), acc.stride(0), acc.stride(1),
            lse.stride(0), lse.stride(1),
            GROUP=group, BH=consts["BH"], TOPN=top_n, MODE=mode, DV=consts["DV"], BDV=bdv, num_warps=4,
        )  # fmt: skip


def invert_selection(idx, cu, max_blocks, chunk, first=0, seq_first=0, n_seq=None):
    """(POS, ENTRY, SEG, WORK_SEG, WORK_OFF): the positions that selected each block, and the work list.

    idx [n, Hkv, top_n] holds the block ids (local to each sequence) of packed tokens first … first + n − 1,
    which lie in sequences seq_first … seq_first + n_seq − 1 (default: all) of at most max_blocks blocks.
    Cells (h, token, slot) are numbered (h·n + token − first)·top_n + slot. Segment (h, sequence, block)
    lists the cells that name its block by ascending token: their packed token indices in
    POS[SEG[seg] : SEG[seg + 1]] and their numbers in ENTRY (int64; a stable sort, so sums over a segment
    run in a fixed order). Segment seg splits into chunks of `chunk` positions, work items WORK_OFF[seg] …
    WORK_OFF[seg + 1] − 1; WORK_SEG maps each work item back to its segment (n_seg past the end). The
    work list has a static upper bound, so nothing waits on the device.
    """
    n_tok, hkv, top_n = idx.shape
    n_seq = cu.numel() - 1 if n_seq is None else n_seq
    dev = idx.device
    tokens = torch.arange(first, first + n_tok, device=dev)
    seq = torch.searchsorted(cu[1:].to(torch.int64), tokens, right=True) - seq_first
    heads = torch.arange(hkv, device=dev)
    local = idx.permute(1, 0, 2)
    seg = (heads[:, None, None] * n_seq + seq[None, :, None]) * max_blocks + local
    n_seg = hkv * n_seq * max_blocks
    seg = torch.where(local >= 0, seg, n_seg).reshape(-1)
    order = torch.sort(seg, stable=True).indices
    pos = (first + (order // top_n) % n_tok).to(torch.int32)
    counts = torch.zeros(n_seg + 1, dtype=torch.int64, device=dev).scatter_add_(0, seg, torch.ones_like(seg))
    offsets = torch.zeros(n_seg + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts[:n_seg], 0)
    work_off = torch.zeros(n_seg + 1, dtype=torch.int64, device=dev)
    work_off[1:] = torch.cumsum((counts[:n_seg] + chunk - 1) // chunk, 0)
    n_work = n_seg + triton.cdiv(seg.numel(), chunk)
    work = torch.arange(n_work, device=dev)
    work_seg = torch.searchsorted(work_off[1:], work, right=True).to(torch.int32)
    return pos, order, offsets, work_seg, work_off


def selected_backward(
    q, k, v, idx, gates, do, lse, dq, delta, dk, dv, cu, max_len, params, *, accum_dq, accum_dkv=False
):
    """dq (fp32, added to when accum_dq), delta[..., 1], then dk/dv (fp32, written for every key, or added
    to when accum_dkv)."""
    consts = _gather_consts(q, k, v, params)
    n_seq = cu.numel() - 1
    hkv = k.shape[1]
    warps, keys = _dq_config(q, consts["BS"])
    selected_dq_kernel[(max_len, hkv, n_seq)](
        q, k, v, idx, gates, do, lse, dq, delta, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        idx.stride(0), idx.stride(1), gates.stride(0), gates.stride(1), do.stride(0), do.stride(1),
        lse.stride(0), lse.stride(1), dq.stride(0), dq.stride(1), delta.stride(0), delta.stride(1),
        params.scale, params.scale * LOG2E, ACCUM=accum_dq, KT=keys, **{**consts, "num_warps": warps},
    )  # fmt: skip
    max_blocks = triton.cdiv(max_len, params.block_size)
    block_m, warps, stages, chunk, keys = _dkdv_config(q, consts["BS"])
    pos, _, seg, work_seg, work_off = invert_selection(idx, cu, max_blocks, chunk)
    for key in ("BH", "TOPN", "num_warps", "num_stages"):
        consts.pop(key)
    n_work = work_seg.numel()
    bs, bdk, bdv = consts["BS"], consts["BDK"], consts["BDV"]
    part_k = empty(n_work, bs, bdk, dtype=torch.float32, device=q.device)
    part_v = empty(n_work, bs, bdv, dtype=torch.float32, device=q.device)
    selected_dkdv_kernel[(n_work * (bs // keys),)](
        q, k, v, gates, do, lse, delta, part_k, part_v, cu, pos, seg, work_seg, work_off,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        gates.stride(0), gates.stride(1), do.stride(0), do.stride(1), lse.stride(0), lse.stride(1),
        delta.stride(0), delta.stride(1), n_seq, max_blocks, hkv * n_seq * max_blocks,
        params.scale, params.scale * LOG2E, BLOCK_M=block_m, CHUNK=chunk, KB=keys, num_warps=warps,
        num_stages=stages, **consts,
    )  # fmt: skip
    selected_dkdv_reduce_kernel[(max_blocks, hkv, n_seq)](
        part_k, part_v, dk, dv, cu, work_off, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        n_seq, max_blocks, SEL=params.block_size, BS=bs, DK=consts["DK"], DV=consts["DV"], BDK=bdk, BDV=bdv,
        ACCUM=accum_dkv, num_warps=4,
    )  # fmt: skip
