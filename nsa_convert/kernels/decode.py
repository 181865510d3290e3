"""Triton NSA decoding: the newest n tokens of each sequence against its KV cache (`reference.nsa_decode`).

Group-centric: the rows of a program are the n new tokens × the G query heads of one KV head (flattened,
row = j·G + g, padded to ≥ 16 for the matrix units), so each K/V tile it loads serves the whole group. A
step reads only the compressed keys/values, the n selected blocks and the window. Work is spread over
many programs per (sequence, KV head), so that a single sequence fills the GPU too. Four launches:

1. compressed + window, split-K: a program either takes a slice of the compressed keys or (unless
   LATE_WINDOW) WIN_SPAN tokens of the window, and writes an online-softmax partial (m, l, acc). A
   compressed program also folds each tile's probabilities into block importance terms (eq. 9) with one
   small matrix product, relative to the tile's running maximum, which it stores beside them, in two
   planes: the terms of the blocks whose home the tile is, then of the next tile's first blocks (`_home`);
2. select, one program per (sequence, KV head, new token, part of the blocks): merges the maxima and sums
   of the compressed partials into each head's lse, turns the stored pieces into the group's importance
   (eq. 10) and writes the part's top n blocks as sort keys (importance bits, then the block's index
   reversed, so that ties go to the lower block; forced blocks get +inf). The last part program of each
   (sequence, KV head, new token) to finish merges the parts' keys into the top n (exact: each part kept
   its own top n) and writes them as the step's indices, in ascending order;
3. selected partials, one program per (sequence, KV head, SLOTS slots): reads its slots' blocks from the
   indices and attends to them, GATHER blocks per tile. With LATE_WINDOW, the window programs move here
   from launch 1, ahead of the slot programs: they need no selection, so they run beside launch 2;
4. combine, one program per (sequence, KV head, new token, HEADS heads, slice of the value dimension):
   merges the three branches' partials, gates and adds them.

On Hopper and later, launches 2–4 are programmatic dependent launches: their programs start while the
previous launch drains, which hides most of the gap between launches (a step at batch 1 is a few dozen µs).

Caches are right-aligned (row S − L_b + p of k/v is token p of sequence b); compressed keys start at 0 per
sequence. Nothing here syncs with the host, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_convert.kernels.banded import n_visible
from nsa_convert.kernels.buffers import empty
from nsa_convert.kernels.hardware import multiprocessors
from nsa_convert.kernels.tiles import load_cols, load_pairs, load_rows
from nsa_convert.spec import SparsityParams, num_compressed_blocks, num_selection_blocks

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
NO_BLOCK = tl.constexpr(2**31 - 1)
"""Above every block index: sort keys store it minus the block, and unfilled slots sort last with it."""
MAX_ROWS = 64
"""Rows (new tokens × group heads) per program; longer decodes are split into chunks of new tokens."""
BC = 32
"""Compressed keys per tile (at least; more when a selection block's terms span more). Small tiles keep
more programs resident per multiprocessor (shared memory per pipeline stage)."""
BW = 64
"""Window keys per tile."""
WIN_SPAN = 0
"""Window keys per program, a multiple of BW (0: one tile): fewer programs, fewer partials to merge."""
PART = 128
"""Blocks ranked per select program (at least; more when there would be over MAX_PARTS parts)."""
MAX_PARTS = 8
"""Most select programs per (sequence, KV head, new token): the last to finish merges parts × n keys."""
SLOTS = 2
"""Selected blocks per slot program."""
GATHER = 2
"""Selected blocks gathered into one tile (SLOTS / GATHER tiles per slot program, one after the other)."""
SLOT_STAGES = 3
"""Pipeline stages of the slot programs' tile loop (one stage holds a tile's keys and values in shared memory)."""
HEADS = 4
"""Query heads per combine program."""
DV_SLICE = 16
"""Value columns per combine program."""
TILE = 8192
"""Elements of the 3-D tiles (partial accumulators) one load takes."""
MAX_SPLITS = 64
"""Most programs the compressed keys of one (sequence, KV head) are split over."""
WAVES = 2
"""Compressed programs aimed at per multiprocessor: fewer splits mean fewer partials to merge."""
CMP_WARPS = 4
"""Warps of a compressed + window program."""
CMP_MAXNREG = 0
"""Registers per thread the compressed + window programs are held to (0: as the compiler likes; at 168 on
the H100, three programs fit per multiprocessor, at 128 four)."""
LATE_WINDOW = 0
"""1: the window programs run in the slot launch, first and beside the select launch (they need no selection),
instead of in the compressed launch, beside the compressed slices."""


@triton.jit
def _wait_then_release():
    """Programmatic dependent launch: wait until the previous launch has finished and its writes are
    visible, then let the next launch's programs start (they wait likewise before reading anything)."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _band_weight(k, R: tl.constexpr, QC: tl.constexpr):
    """#{(m, n): m < R, n < QC, m + n = k}: how often p_cmp[R(j + 1) − 1 − k] counts for block j (eq. 9)."""
    w = tl.minimum(tl.minimum(k, R - 1), tl.minimum(QC - 1, R + QC - 2 - k)) + 1
    return tl.where((k >= 0) & (k <= R + QC - 2), w, 0).to(tl.float32)


@triton.jit
def _home(j, RATIO: tl.constexpr, BLOCK: tl.constexpr):
    """The compressed tile holding block j's last term: its other terms lie there or in the tile before."""
    return (RATIO * (j + 1) - 1) // BLOCK


@triton.jit
def _online(m_i, l_i, acc, s, v):
    """One online-softmax step over scores s [R, N] (log2 domain, −inf masked) and values v [N, DV]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc, p


@triton.jit
def _store_partial(PM, PL, PA, slot, r, row_ok, dv, m_i, l_i, acc, ROWS: tl.constexpr, BDV: tl.constexpr):
    """Partial `slot` (flat over (sequence, KV head) × partials) of rows r."""
    tl.store(PM + slot * ROWS + r, m_i, mask=row_ok)
    tl.store(PL + slot * ROWS + r, l_i, mask=row_ok)
    tl.store(PA + (slot * ROWS + r[:, None]) * BDV + dv[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_stats(PM, PL, first, count, r, r_ok, CP: tl.constexpr, ROWS: tl.constexpr):
    """Maximum and sum (log2 domain) over partials first … first + count − 1 of rows r."""
    c = tl.arange(0, CP)
    ok = (c < count)[:, None] & r_ok[None, :]
    at = (first + c)[:, None] * ROWS + r[None, :]
    m_all = tl.load(PM + at, mask=ok, other=-1.0e30)
    m = tl.max(m_all, 0)
    l_sum = tl.sum(tl.load(PL + at, mask=ok, other=0.0) * tl.math.exp2(m_all - m[None, :]), 0)
    return m, l_sum


@triton.jit
def _merge_branch(PM, PL, PA, first, count, r, r_ok, dv, CP: tl.constexpr, CCH: tl.constexpr,
                  GP: tl.constexpr, DVS: tl.constexpr, ROWS: tl.constexpr, BDV: tl.constexpr):  # fmt: skip
    """(m, l, acc[:, dv]) of partials first … first + count − 1 merged; accumulators CCH partials per load."""
    m, l_sum = _merge_stats(PM, PL, first, count, r, r_ok, CP, ROWS)
    acc = tl.zeros([GP, DVS], tl.float32)
    for c0 in range(0, count, CCH):
        cc = c0 + tl.arange(0, CCH)
        ok = (cc < count)[:, None] & r_ok[None, :]
        at = (first + cc)[:, None] * ROWS + r[None, :]
        m_c = tl.load(PM + at, mask=ok, other=-1.0e30)
        a_c = tl.load(PA + at[:, :, None] * BDV + dv[None, None, :], mask=ok[:, :, None], other=0.0)
        acc += tl.sum(a_c * tl.math.exp2(m_c - m[None, :])[:, :, None], 0)
    return m, l_sum, acc


@triton.jit
def _window_tile(q, KW, VW, skw_t, svw_t, p, length, rows_w, scale_log2, row_ok, t, dk, dv, m_i, l_i, acc,
                 WINDOW: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):  # fmt: skip
    """One online-softmax step over window keys p (right-aligned cache rows, those ≥ length masked)."""
    p_ok = p < length
    row = (rows_w - length + p).to(tl.int64)
    kt = load_cols(KW, row, p_ok, skw_t, dk, DK)
    vv = load_rows(VW, row, p_ok, svw_t, dv, DV)
    s = tl.dot(q, kt) * scale_log2
    vis = row_ok[:, None] & p_ok[None, :] & (p[None, :] <= t[:, None]) & (p[None, :] > t[:, None] - WINDOW)
    m_i, l_i, acc, _ = _online(m_i, l_i, acc, tl.where(vis, s, float("-inf")), vv)
    return m_i, l_i, acc


@triton.jit
def _window_span(q, KW, VW, PM2, PL2, PA2, skw_t, svw_t, i, slot, length, n_new, rows_w, scale_log2, r, row_ok,
                 t, dk, dv, WINDOW: tl.constexpr, BWIN: tl.constexpr, SPAN: tl.constexpr, DK: tl.constexpr,
                 DV: tl.constexpr, ROWS: tl.constexpr, BDV: tl.constexpr):  # fmt: skip
    """Window span i (SPAN keys from the first any new token sees, BWIN per tile) of one (b, KV head),
    stored as partial `slot`; KW and VW point at that (b, KV head)'s window keys and values. A one-tile
    span has no loop, so no pipeline stages in shared memory."""
    m_i = tl.full([ROWS], -1.0e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BDV], tl.float32)
    first = tl.maximum(length - n_new - WINDOW + 1, 0) + i * SPAN
    if SPAN == BWIN:
        m_i, l_i, acc = _window_tile(
            q, KW, VW, skw_t, svw_t, first + tl.arange(0, BWIN), length, rows_w, scale_log2, row_ok, t, dk, dv,
            m_i, l_i, acc, WINDOW, DK, DV,
        )  # fmt: skip
    else:
        for p0 in range(first, tl.minimum(first + SPAN, length), BWIN):
            m_i, l_i, acc = _window_tile(
                q, KW, VW, skw_t, svw_t, p0 + tl.arange(0, BWIN), length, rows_w, scale_log2, row_ok, t, dk,
                dv, m_i, l_i, acc, WINDOW, DK, DV,
            )  # fmt: skip
    _store_partial(PM2, PL2, PA2, slot, r, row_ok, dv, m_i, l_i, acc, ROWS, BDV)


@triton.jit
def _cmp_window_kernel(
    Q, KC, VC, KW, VW, LENS, U, MT, PM, PL, PA, PM2, PL2, PA2, COUNT,
    sq_b, sq_t, sq_h, skc_b, skc_t, skc_h, svc_b, svc_t, svc_h, skw_b, skw_t, skw_h, svw_b, svw_t, svw_h,
    su_p, su_bh, su_r, smt_bh, smt_t,
    n_new, n_split, n_chunks, split_len, tc_bound, rows_w, scale_log2,
    HKV: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, CSTRIDE: tl.constexpr, CSPAN: tl.constexpr,
    BLOCK: tl.constexpr, RATIO: tl.constexpr, QC: tl.constexpr, NW: tl.constexpr, NSEL: tl.constexpr,
    WINDOW: tl.constexpr, BWIN: tl.constexpr, SPAN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, PDL: tl.constexpr, MERGE: tl.constexpr, LATE_WIN: tl.constexpr,
):  # fmt: skip
    """Program (b·HKV + h, i): compressed slice i (i < n_split) or, unless LATE_WIN, window span i − n_split
    of one (b, h)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    length = tl.load(LENS + b)
    r = tl.arange(0, ROWS)
    if MERGE and pid == 0:  # launch 2's part programs count themselves in COUNT
        tl.store(COUNT + bh * n_new + r, 0, mask=r < n_new)
    jr = r // GROUP
    row_ok = jr < n_new
    t = length - n_new + jr
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    b64 = b.to(tl.int64)
    q = load_pairs(Q + b64 * sq_b, jr, h * GROUP + r % GROUP, row_ok, sq_t, sq_h, dk, DK)
    if pid < n_split:
        m_i = tl.full([ROWS], -1.0e30, tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BDV], tl.float32)
        nvis = tl.minimum(tl.where(row_ok, n_visible(t, CSTRIDE, CSPAN), 0), tc_bound)
        lo = pid * split_len
        hi = tl.minimum(lo + split_len, tl.max(nvis, 0))
        k_base = KC + b64 * skc_b + h * skc_h
        v_base = VC + b64 * svc_b + h * svc_h
        for c0 in range(lo, hi, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            c_ok = c < hi
            row = c.to(tl.int64)
            kt = load_cols(k_base, row, c_ok, skc_t, dk, DK)
            vv = load_rows(v_base, row, c_ok, svc_t, dv, DV)
            s = tl.dot(q, kt) * scale_log2
            s = tl.where(c[None, :] < nvis[:, None], s, float("-inf"))
            m_i, l_i, acc, p = _online(m_i, l_i, acc, s, vv)
            tile = c0 // BLOCK
            # Blocks with terms in this tile: those whose home it is (plane 0), then the next tile's
            # first ones (plane 1).
            jb = (c0 + RATIO) // RATIO - 1 + tl.arange(0, NW)
            w = _band_weight(RATIO * (jb[None, :] + 1) - 1 - c[:, None], RATIO, QC)
            u = tl.dot(p, w, input_precision="ieee")
            home = _home(jb, RATIO, BLOCK)
            at = bh * su_bh + r[:, None] * su_r + jb[None, :]
            tl.store(U + at, u, mask=row_ok[:, None] & (home == tile)[None, :])
            tl.store(U + su_p + at, u, mask=row_ok[:, None] & (home == tile + 1)[None, :])
            tl.store(MT + bh * smt_bh + tile * smt_t + r, m_i, mask=row_ok)
        _store_partial(PM, PL, PA, bh * n_split + pid, r, row_ok, dv, m_i, l_i, acc, ROWS, BDV)
    elif not LATE_WIN:
        _window_span(
            q, KW + b64 * skw_b + h * skw_h, VW + b64 * svw_b + h * svw_h, PM2, PL2, PA2, skw_t, svw_t,
            pid - n_split, bh * n_chunks + NSEL + pid - n_split, length, n_new, rows_w, scale_log2, r,
            row_ok, t, dk, dv, WINDOW, BWIN, SPAN, DK, DV, ROWS, BDV,
        )  # fmt: skip


@triton.jit
def _store_top_n(top, pos, AT, TOPN: tl.constexpr):
    """The blocks of the first TOPN of the sort keys `top` (descending), in ascending order, −1 for none."""
    chosen = tl.sort(tl.where((pos < TOPN) & (top >= 0), -(top & 0xFFFFFFFF) + NO_BLOCK, NO_BLOCK))
    tl.store(AT + pos, tl.where(chosen == NO_BLOCK, -1, chosen), mask=pos < TOPN)


@triton.jit
def _select_kernel(
    U, MT, PM, PL, LENS, KEYS, COUNT, IDX,
    su_p, su_bh, su_r, smt_bh, smt_t, si_b, si_t, si_h,
    n_new, n_split, tc_bound,
    HKV: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, CSTRIDE: tl.constexpr,
    CSPAN: tl.constexpr, SEL: tl.constexpr, BLOCK: tl.constexpr, RATIO: tl.constexpr, PB: tl.constexpr,
    NPART: tl.constexpr, TOPN: tl.constexpr, TOPNP: tl.constexpr, NKEYSP: tl.constexpr, CP: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Top n of blocks part·PB … of new token jq of one (b, KV head). With one part, they are the indices;
    otherwise the program stores its top TOPNP as sort keys in KEYS, and the last of the NPART programs to
    finish merges them into the indices."""
    if PDL:
        _wait_then_release()
    bh = tl.program_id(0)
    jq = tl.program_id(1)
    part = tl.program_id(2)
    b = bh // HKV
    length = tl.load(LENS + b)
    t = length - n_new + jq
    g = tl.arange(0, GP)
    g_ok = g < GROUP
    r = jq * GROUP + g
    m, l_sum = _merge_stats(PM + bh * n_split * ROWS, PL + bh * n_split * ROWS, 0, n_split, r, g_ok, CP, ROWS)
    lse2 = tl.where(l_sum > 0, m + tl.math.log2(tl.where(l_sum > 0, l_sum, 1.0)), float("inf"))
    tiles = tl.cdiv(tl.minimum(n_visible(length - 1, CSTRIDE, CSPAN), tc_bound), BLOCK)
    cur = tl.where(t >= 0, t // SEL, -1)
    j = part * PB + tl.arange(0, PB)
    cand = j <= cur
    at = bh * su_bh + r[:, None] * su_r + j[None, :]
    imp = tl.zeros([GP, PB], tl.float32)
    # Each plane's terms are relative to the maximum of the tile they lie in.
    for i in tl.static_range(2):
        tile = _home(j, RATIO, BLOCK) - i
        ok = g_ok[:, None] & (cand & (tile >= 0) & (tile < tiles))[None, :]
        u = tl.load(U + i * su_p + at, mask=ok, other=0.0)
        m_t = tl.load(MT + bh * smt_bh + tile[None, :] * smt_t + r[:, None], mask=ok, other=float("-inf"))
        imp += u * tl.math.exp2(m_t - lse2[:, None])
    imp = tl.sum(imp, 0)
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    bits = tl.where(forced, 0x7F800000, imp.to(tl.int32, bitcast=True)).to(tl.int64)
    key = tl.where(cand, (bits << 32) | (-j + NO_BLOCK).to(tl.int64), -1)
    top = tl.sort(key, descending=True)
    at_idx = IDX + b * si_b + jq * si_t + (bh % HKV) * si_h
    if NPART == 1:
        _store_top_n(top, tl.arange(0, PB), at_idx, TOPN)
    else:
        pos = tl.arange(0, PB)
        mine = KEYS + (bh * n_new + jq) * NPART * TOPNP
        tl.store(mine + part * TOPNP + pos, top, mask=pos < TOPNP)
        tl.debug_barrier()  # every thread's keys stored before the count (a release) says so
        if tl.atomic_add(COUNT + bh * n_new + jq, 1, sem="acq_rel") == NPART - 1:
            tl.debug_barrier()
            every = tl.arange(0, NKEYSP)
            keys = tl.load(mine + every, mask=every < NPART * TOPNP, other=-1, cache_modifier=".cg")
            _store_top_n(tl.sort(keys, descending=True), every, at_idx, TOPN)


@triton.jit
def _selected_kernel(
    Q, K, V, KW, VW, IDX, LENS, PM2, PL2, PA2,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, skw_b, skw_t, skw_h, svw_b, svw_t, svw_h,
    si_b, si_t, si_h,
    n_new, n_chunks, rows_k, rows_w, scale_log2,
    HKV: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, SEL: tl.constexpr, BS: tl.constexpr,
    SLOTS: tl.constexpr, GATHER: tl.constexpr, TOPN: tl.constexpr, WINDOW: tl.constexpr, BWIN: tl.constexpr,
    SPAN: tl.constexpr, NLATE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
    BDV: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (b·HKV + h, i): window span i < NLATE of one (b, KV head), or slots (i − NLATE)·SLOTS … (each
    new token's indices, ascending) and their partial. Window spans need no selection: they come first and
    do not wait for the select launch, so they run while it does."""
    pid = tl.program_id(1)
    sp = pid - NLATE
    window = False  # without window programs, a compile-time False: the slot kernel as it was
    if NLATE > 0:
        window = sp < 0
    if PDL:
        if window:
            tl.extra.cuda.gdc_launch_dependents()
        else:
            _wait_then_release()
    bh = tl.program_id(0)
    first = sp * SLOTS
    b = bh // HKV
    h = bh % HKV
    length = tl.load(LENS + b)
    r = tl.arange(0, ROWS)
    jr = r // GROUP
    row_ok = jr < n_new
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    b64 = b.to(tl.int64)
    q = load_pairs(Q + b64 * sq_b, jr, h * GROUP + r % GROUP, row_ok, sq_t, sq_h, dk, DK)
    if window:
        t = length - n_new + jr
        _window_span(
            q, KW + b64 * skw_b + h * skw_h, VW + b64 * svw_b + h * svw_h, PM2, PL2, PA2, skw_t, svw_t,
            pid, bh * n_chunks + n_chunks - NLATE + pid, length, n_new, rows_w, scale_log2, r, row_ok, t, dk,
            dv, WINDOW, BWIN, SPAN, DK, DV, ROWS, BDV,
        )  # fmt: skip
    else:
        m_i = tl.full([ROWS], -1.0e30, tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BDV], tl.float32)
        kb = tl.arange(0, GATHER * BS)
        within = kb % BS
        k_base = K + b64 * sk_b + h * sk_h
        v_base = V + b64 * sv_b + h * sv_h
        for jq in range(n_new):
            for g0 in range(0, SLOTS, GATHER):
                slot = first + g0 + kb // BS
                blk = tl.load(IDX + b * si_b + jq * si_t + h * si_h + slot, mask=slot < TOPN, other=-1)
                p = blk * SEL + within
                p_ok = (blk >= 0) & (within < SEL) & (p <= length - n_new + jq)
                row = rows_k - length + p
                kt = load_cols(k_base, row, p_ok, sk_t, dk, DK)
                vv = load_rows(v_base, row, p_ok, sv_t, dv, DV)
                s = tl.dot(q, kt) * scale_log2
                s = tl.where((row_ok & (jr == jq))[:, None] & p_ok[None, :], s, float("-inf"))
                m_i, l_i, acc, _ = _online(m_i, l_i, acc, s, vv)
        _store_partial(PM2, PL2, PA2, bh * n_chunks + sp, r, row_ok, dv, m_i, l_i, acc, ROWS, BDV)


@triton.jit
def _combine_kernel(
    PM, PL, PA, PM2, PL2, PA2, GATE, OUT, LSE,
    sg_b, sg_t, sg_h, so_b, so_t, so_h, sl_b, sl_t, sl_h,
    n_split, n_chunks,
    HKV: tl.constexpr, GROUP: tl.constexpr, GH: tl.constexpr, ROWS: tl.constexpr, NSEL: tl.constexpr,
    CP0: tl.constexpr, CCH0: tl.constexpr, CP1: tl.constexpr, CCH1: tl.constexpr, CP2: tl.constexpr,
    CCH2: tl.constexpr, DV: tl.constexpr, DVS: tl.constexpr, BDV: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[:, dv] = g_cmp·o_cmp + g_slc·o_slc + g_win·o_win for GH heads of new token jq of one (b, KV head)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)
    heads = tl.cdiv(GROUP, GH)
    jq = tl.program_id(1) // heads
    dv = tl.program_id(2) * DVS + tl.arange(0, DVS)
    b = bh // HKV
    h = bh % HKV
    g = tl.program_id(1) % heads * GH + tl.arange(0, GH)
    g_ok = g < GROUP
    r = jq * GROUP + g
    hq = h * GROUP + g
    out = tl.zeros([GH, DVS], tl.float32)
    for branch in tl.static_range(3):
        if branch == 0:
            m, l_sum, acc = _merge_branch(
                PM, PL, PA, bh * n_split, n_split, r, g_ok, dv, CP0, CCH0, GH, DVS, ROWS, BDV
            )
        elif branch == 1:
            m, l_sum, acc = _merge_branch(
                PM2, PL2, PA2, bh * n_chunks, NSEL, r, g_ok, dv, CP1, CCH1, GH, DVS, ROWS, BDV
            )
        else:
            m, l_sum, acc = _merge_branch(
                PM2, PL2, PA2, bh * n_chunks + NSEL, n_chunks - NSEL, r, g_ok, dv, CP2, CCH2, GH, DVS, ROWS,
                BDV,
            )  # fmt: skip
        nonempty = l_sum > 0
        l_safe = tl.where(nonempty, l_sum, 1.0)
        gate = tl.load(GATE + b * sg_b + jq * sg_t + hq * sg_h + branch, mask=g_ok, other=0.0).to(tl.float32)
        out += acc * (gate / l_safe)[:, None]
        lse = tl.where(nonempty, (m + tl.math.log2(l_safe)) * LN2, float("-inf"))
        if tl.program_id(2) == 0:
            tl.store(LSE + b * sl_b + jq * sl_t + hq * sl_h + branch, lse, mask=g_ok)
    tl.store(
        OUT + b * so_b + jq * so_t + hq[:, None] * so_h + dv[None, :],
        out.to(OUT.dtype.element_ty),
        mask=g_ok[:, None] & (dv[None, :] < DV),
    )


def _use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and later): each launch after the first starts its programs
    while the previous one drains, instead of after it (they wait for its results before reading them)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _chunk(partials: int, rows: int, width: int) -> int:
    """Partials per accumulator load: a power of two ≤ partials with rows × width × it ≤ TILE."""
    return max(1, min(partials, TILE // (rows * width)))


def _decode_chunk(q, k, v, k_cmp, v_cmp, gates, lens, params, k_win, v_win):
    """One launch set for n ≤ MAX_ROWS / G new tokens: (out, lse, indices)."""
    batch, n, hq, dk = q.shape
    hkv, dv, rows_k = k.shape[2], v.shape[3], k.shape[1]
    group = hq // hkv
    device = q.device
    rows_p = max(16, triton.next_power_of_2(n * group))
    gp = triton.next_power_of_2(group)
    bdk, bdv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    length, stride, block = params.compress_block, params.compress_stride, params.block_size
    top_n = params.top_n
    ratio, per_cmp = block // stride, length // stride
    bc = max(BC, triton.next_power_of_2(ratio + per_cmp - 1))
    nw = triton.next_power_of_2(max(16, triton.cdiv(bc, ratio) + triton.cdiv(per_cmp - 1, ratio) + 1))
    tc_bound = min(k_cmp.shape[1], num_compressed_blocks(rows_k, length, stride))
    if k_cmp.shape[1] == 0:
        k_cmp = q.new_zeros(batch, 1, hkv, dk)
        v_cmp = q.new_zeros(batch, 1, hkv, dv)
    tiles = max(1, triton.cdiv(tc_bound, bc))
    n_split = max(1, min(tiles, MAX_SPLITS, triton.cdiv(WAVES * multiprocessors(device, 4), batch * hkv)))
    split_len = triton.cdiv(tiles, n_split) * bc
    n_split = max(1, triton.cdiv(tc_bound, split_len))
    span = WIN_SPAN or BW
    if span % BW:
        raise ValueError(f"WIN_SPAN ({WIN_SPAN}) must be a multiple of BW ({BW})")
    n_win = triton.cdiv(params.window + n - 1, span)
    n_sel = triton.cdiv(top_n, SLOTS)
    n_chunks = n_sel + n_win
    f32 = dict(dtype=torch.float32, device=device)
    pdl = _use_pdl(device)
    # Eq. 9 terms, two planes: the blocks whose home a tile is, then the next tile's first blocks.
    pieces = empty(2, batch * hkv, rows_p, triton.cdiv(tiles * bc, ratio) + nw, **f32)
    tile_max = empty(batch * hkv, tiles, rows_p, **f32)
    pm, pl = (empty(batch * hkv, n_split, rows_p, **f32) for _ in range(2))
    pa = empty(batch * hkv, n_split, rows_p, bdv, **f32)
    pm2, pl2 = (empty(batch * hkv, n_chunks, rows_p, **f32) for _ in range(2))
    pa2 = empty(batch * hkv, n_chunks, rows_p, bdv, **f32)
    blocks = max(1, num_selection_blocks(rows_k, block))
    top_np = triton.next_power_of_2(top_n)
    part = max(PART, top_np, triton.next_power_of_2(triton.cdiv(blocks, MAX_PARTS)))
    parts = triton.cdiv(blocks, part)
    indices = empty(batch, n, hkv, top_n, dtype=torch.int64, device=device)
    if parts > 1:
        keys = empty(batch * hkv, n, parts, top_np, dtype=torch.int64, device=device)
        counts = empty(batch * hkv, n, dtype=torch.int32, device=device)  # finished part programs per token
    else:  # the kernels never touch them
        keys, counts = indices, lens
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    scale_log2 = params.scale * LOG2E
    late = n_win if LATE_WINDOW else 0  # window programs in the slot launch, before the slot programs
    # Launch 1 is never a dependent launch: it starts once the previous step (or chunk) has finished, which
    # is what lets launch 3's window programs skip their wait.
    _cmp_window_kernel[(batch * hkv, n_split + n_win - late)](
        q, k_cmp, v_cmp, k_win, v_win, lens, pieces, tile_max, pm, pl, pa, pm2, pl2, pa2, counts,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        v_cmp.stride(0), v_cmp.stride(1), v_cmp.stride(2), k_win.stride(0), k_win.stride(1), k_win.stride(2),
        v_win.stride(0), v_win.stride(1), v_win.stride(2),
        *pieces.stride()[:3], tile_max.stride(0), tile_max.stride(1),
        n, n_split, n_chunks, split_len, tc_bound, k_win.shape[1], scale_log2,
        HKV=hkv, GROUP=group, ROWS=rows_p, CSTRIDE=stride, CSPAN=length, BLOCK=bc, RATIO=ratio, QC=per_cmp,
        NW=nw, NSEL=n_sel, WINDOW=params.window, BWIN=BW, SPAN=span, DK=dk, DV=dv, BDK=bdk, BDV=bdv, PDL=pdl,
        MERGE=parts > 1, LATE_WIN=late > 0, num_warps=CMP_WARPS, maxnreg=CMP_MAXNREG or None,
    )  # fmt: skip
    _select_kernel[(batch * hkv, n, parts)](
        pieces, tile_max, pm, pl, lens, keys, counts, indices,
        *pieces.stride()[:3], tile_max.stride(0), tile_max.stride(1),
        indices.stride(0), indices.stride(1), indices.stride(2),
        n, n_split, tc_bound,
        HKV=hkv, GROUP=group, GP=gp, ROWS=rows_p, CSTRIDE=stride, CSPAN=length, SEL=block, BLOCK=bc,
        RATIO=ratio, PB=part, NPART=parts, TOPN=top_n, TOPNP=top_np,
        NKEYSP=triton.next_power_of_2(parts * top_np), CP=triton.next_power_of_2(n_split), PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    _selected_kernel[(batch * hkv, n_sel + late)](
        q, k, v, k_win, v_win, indices, lens, pm2, pl2, pa2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), k_win.stride(0), k_win.stride(1), k_win.stride(2), v_win.stride(0), v_win.stride(1),
        v_win.stride(2), indices.stride(0), indices.stride(1), indices.stride(2),
        n, n_chunks, rows_k, k_win.shape[1], scale_log2,
        HKV=hkv, GROUP=group, ROWS=rows_p, SEL=block, BS=max(16, triton.next_power_of_2(block)), SLOTS=SLOTS,
        GATHER=GATHER, TOPN=top_n, WINDOW=params.window, BWIN=BW, SPAN=span, NLATE=late, DK=dk, DV=dv,
        BDK=bdk, BDV=bdv, PDL=pdl,
        num_warps=4, num_stages=SLOT_STAGES, launch_pdl=pdl,
    )  # fmt: skip
    out = empty(batch, n, hq, dv, dtype=q.dtype, device=device)
    lse = empty(batch, n, hq, 3, **f32)
    dvs = min(DV_SLICE, bdv)
    gh = min(HEADS, gp)
    cps = [triton.next_power_of_2(count) for count in (n_split, n_sel, n_win)]
    _combine_kernel[(batch * hkv, n * triton.cdiv(group, gh), triton.cdiv(dv, dvs))](
        pm, pl, pa, pm2, pl2, pa2, gates, out, lse,
        gates.stride(0), gates.stride(1), gates.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        n_split, n_chunks,
        HKV=hkv, GROUP=group, GH=gh, ROWS=rows_p, NSEL=n_sel,
        CP0=cps[0], CCH0=_chunk(cps[0], gh, dvs), CP1=cps[1], CCH1=_chunk(cps[1], gh, dvs), CP2=cps[2],
        CCH2=_chunk(cps[2], gh, dvs), DV=dv, DVS=dvs, BDV=bdv, PDL=pdl,
        num_warps=1, launch_pdl=pdl,  # its tiles are HEADS × DV_SLICE: one warp's worth
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
