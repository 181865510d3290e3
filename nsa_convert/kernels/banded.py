"""Banded attention on packed sequences: the compressed and sliding-window branches share these kernels.

Both branches let query t see a contiguous key range: key s is visible iff
    s·KSTRIDE + KSPAN − 1 ≤ t            (compressed: KSTRIDE = d, KSPAN = l; window: 1, 1)
    and, when WINDOW > 0, s ≥ t − WINDOW + 1.
Query rows are the (position, group head) pairs of one KV head, flattened as row = t·G + g, so every loaded
K/V tile serves all G heads of the group and any G fills the matrix tiles (no padding of the group).

Layouts (packed, `cu` = int32 cumulative sequence lengths, one program column per sequence):
    q [N, Hq, DK], k [Nk, Hkv, DK], v [Nk, Hkv, DV], gates [N, Hq, 3], lse [N, Hq, 3] float32.
The branch's gate and lse live in column `BRANCH` of the 3-wide tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nsa_convert.kernels.buffers import empty
from nsa_convert.kernels.hardware import multiprocessors
from nsa_convert.kernels.tiles import load_cols, load_pairs, load_rows

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Forward epilogue modes: where the gated branch output goes (Python ints; kernels see the constexprs).
STORE_ACC, ADD_ACC, FINAL, LSE_ONLY = 0, 1, 2, 3
_STORE_ACC = tl.constexpr(STORE_ACC)
_ADD_ACC = tl.constexpr(ADD_ACC)
_LSE_ONLY = tl.constexpr(LSE_ONLY)
LN2_C = tl.constexpr(LN2)

SPLITS_PER_SM = 16
"""Compressed dk/dv: programs per multiprocessor the row splits aim for (the first key blocks see all rows).
Measured on the H100 at 64k (cmp bwd, paper-G16 / llama-G4): 4 → 49.0 / 29.2 ms, 16 → 45.1 / 24.9, 32 → 42.9 /
27.4."""


@triton.jit
def n_visible(t, KSTRIDE: tl.constexpr, KSPAN: tl.constexpr):
    """How many keys query t sees from the left: s·KSTRIDE + KSPAN − 1 ≤ t (a prefix 0 … n − 1)."""
    return tl.where(t + 1 >= KSPAN, (t + 1 - KSPAN) // KSTRIDE + 1, 0)


@triton.jit
def _visible(s, t, KSTRIDE: tl.constexpr, KSPAN: tl.constexpr, WINDOW: tl.constexpr):
    vis = s < n_visible(t, KSTRIDE, KSPAN)
    if WINDOW > 0:
        vis = vis & (s > t - WINDOW)
    return vis


@triton.jit
def banded_fwd_kernel(
    Q, K, V, GATE, ACC, OUT, LSE, CU_Q, CU_K,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sa_t, sa_h, so_t, so_h, sl_t, sl_h,
    scale_log2,
    GROUP: tl.constexpr, KSTRIDE: tl.constexpr, KSPAN: tl.constexpr, WINDOW: tl.constexpr,
    BRANCH: tl.constexpr, MODE: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M flattened (t, g) rows of one KV head of one sequence, online softmax over keys."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    T = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    Tk = tl.load(CU_K + b + 1) - k_start
    row0 = pid_m * BLOCK_M
    if row0 >= T * GROUP:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    t = rows // GROUP
    hq = h * GROUP + rows % GROUP
    row_ok = t < T
    tok = (q_start + t).to(tl.int64)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    q = load_pairs(Q, tok, hq, row_ok, sq_t, sq_h, dk, DK)
    t_lo = row0 // GROUP
    t_hi = tl.minimum(T - 1, (row0 + BLOCK_M - 1) // GROUP)
    hi = tl.minimum(n_visible(t_hi, KSTRIDE, KSPAN), Tk)
    lo = 0
    if WINDOW > 0:
        lo = (tl.maximum(t_lo - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], tl.float32)
    k_base = K + h * sk_h
    v_base = V + h * sv_h
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        ktok = (k_start + s).to(tl.int64)
        kt = load_cols(k_base, ktok, s_ok, sk_t, dk, DK)
        qk = tl.dot(q, kt) * scale_log2
        vis = _visible(s[None, :], t[:, None], KSTRIDE, KSPAN, WINDOW) & s_ok[None, :]
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if MODE != _LSE_ONLY:
            vt = load_rows(v_base, ktok, s_ok, sv_t, dv, DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    nonempty = l_i > 0
    lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * LN2_C, float("-inf"))
    tl.store(LSE + tok * sl_t + hq * sl_h + BRANCH, lse, mask=row_ok)
    if MODE != _LSE_ONLY:
        gate = tl.load(GATE + tok * sg_t + hq * sg_h + BRANCH, mask=row_ok, other=0.0).to(tl.float32)
        o = acc * (gate / tl.where(nonempty, l_i, 1.0))[:, None]
        omask = row_ok[:, None] & (dv[None, :] < DV)
        a_ptr = ACC + tok[:, None] * sa_t + hq[:, None] * sa_h + dv[None, :]
        if MODE == _STORE_ACC:
            tl.store(a_ptr, o, mask=omask)
        else:
            o += tl.load(a_ptr, mask=omask, other=0.0)
            if MODE == _ADD_ACC:
                tl.store(a_ptr, o, mask=omask)
            else:
                o_ptr = OUT + tok[:, None] * so_t + hq[:, None] * so_h + dv[None, :]
                tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def banded_bwd_dq_kernel(
    Q, K, V, GATE, DO, LSE, DQ, DELTA, CU_Q, CU_K,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sd_t, sd_h, sl_t, sl_h, sdq_t, sdq_h, sdl_t, sdl_h,
    scale, scale_log2,
    GROUP: tl.constexpr, KSTRIDE: tl.constexpr, KSPAN: tl.constexpr, WINDOW: tl.constexpr,
    BRANCH: tl.constexpr, ACCUM: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq and delta = rowsum(dO ∘ o_branch) (the gate's gradient) in one pass over the keys.

    The branch output is not stored, so delta is accumulated alongside: with dp = dO·v and p normalised by
    the forward lse, dq = scale·g·(Σ p·dp·k − delta·Σ p·k) and delta = Σ p·dp.
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first (compressed: work grows with t)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    T = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    Tk = tl.load(CU_K + b + 1) - k_start
    row0 = pid_m * BLOCK_M
    if row0 >= T * GROUP:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    t = rows // GROUP
    hq = h * GROUP + rows % GROUP
    row_ok = t < T
    tok = (q_start + t).to(tl.int64)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    q = load_pairs(Q, tok, hq, row_ok, sq_t, sq_h, dk, DK)
    do = load_pairs(DO, tok, hq, row_ok, sd_t, sd_h, dv, DV)
    lse = tl.load(LSE + tok * sl_t + hq * sl_h + BRANCH, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    t_lo = row0 // GROUP
    t_hi = tl.minimum(T - 1, (row0 + BLOCK_M - 1) // GROUP)
    hi = tl.minimum(n_visible(t_hi, KSTRIDE, KSPAN), Tk)
    lo = 0
    if WINDOW > 0:
        lo = (tl.maximum(t_lo - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    acc_pdp = tl.zeros([BLOCK_M, BDK], tl.float32)
    acc_p = tl.zeros([BLOCK_M, BDK], tl.float32)
    delta = tl.zeros([BLOCK_M], tl.float32)
    k_base = K + h * sk_h
    v_base = V + h * sv_h
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        ktok = (k_start + s).to(tl.int64)
        kk = load_rows(k_base, ktok, s_ok, sk_t, dk, DK)
        vt = load_cols(v_base, ktok, s_ok, sv_t, dv, DV)
        qk = tl.dot(q, tl.trans(kk)) * scale_log2
        vis = _visible(s[None, :], t[:, None], KSTRIDE, KSPAN, WINDOW) & s_ok[None, :]
        p = tl.where(vis, tl.math.exp2(qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt)
        pdp = p * dp
        delta += tl.sum(pdp, 1)
        acc_pdp += tl.dot(pdp.to(kk.dtype), kk)
        acc_p += tl.dot(p.to(kk.dtype), kk)
    gate = tl.load(GATE + tok * sg_t + hq * sg_h + BRANCH, mask=row_ok, other=0.0).to(tl.float32)
    dq = (acc_pdp - delta[:, None] * acc_p) * (gate * scale)[:, None]
    dq_ptr = DQ + tok[:, None] * sdq_t + hq[:, None] * sdq_h + dk[None, :]
    dq_mask = row_ok[:, None] & (dk[None, :] < DK)
    if ACCUM:
        dq += tl.load(dq_ptr, mask=dq_mask, other=0.0)
    tl.store(dq_ptr, dq, mask=dq_mask)
    tl.store(DELTA + tok * sdl_t + hq * sdl_h + BRANCH, delta, mask=row_ok)


@triton.jit
def banded_bwd_dkdv_kernel(
    Q, K, V, GATE, DO, LSE, DELTA, DK_, DV_, CU_Q, CU_K,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sd_t, sd_h, sl_t, sl_h, sdl_t, sdl_h,
    sdk_s, sdk_t, sdk_h, sdv_s, sdv_t, sdv_h,
    splits, scale, scale_log2,
    GROUP: tl.constexpr, KSTRIDE: tl.constexpr, KSPAN: tl.constexpr, WINDOW: tl.constexpr,
    BRANCH: tl.constexpr, ACCUM: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dk, dv of BLOCK_N keys of one KV head: loop over the query rows that see them (no atomics).

    The rows are cut into `splits` contiguous parts, one program each, written to DK_/DV_ + split·stride
    (summed afterwards in a fixed order): the compressed branch has few keys, each seen by many rows. The
    parts are the same row ranges for every key block, and key blocks are the fastest grid axis, so the
    programs running together read the same q/dO rows (from L2 instead of DRAM, once per key block).
    """
    pid_n = tl.program_id(0)
    h = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    T = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    Tk = tl.load(CU_K + b + 1) - k_start
    n0 = pid_n * BLOCK_N
    if n0 >= Tk:
        return
    s = n0 + tl.arange(0, BLOCK_N)
    s_ok = s < Tk
    ktok = (k_start + s).to(tl.int64)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kk = load_rows(K + h * sk_h, ktok, s_ok, sk_t, dk, DK)
    vv = load_rows(V + h * sv_h, ktok, s_ok, sv_t, dv, DV)
    t_first = n0 * KSTRIDE + KSPAN - 1
    t_end = T
    if WINDOW > 0:
        t_end = tl.minimum(T, tl.minimum(n0 + BLOCK_N, Tk) - 1 + WINDOW)
    acc_dk = tl.zeros([BLOCK_N, BDK], tl.float32)
    acc_dv = tl.zeros([BLOCK_N, BDV], tl.float32)
    per_split = tl.cdiv(tl.cdiv(T * GROUP, splits), BLOCK_M) * BLOCK_M
    r_begin = tl.maximum(t_first * GROUP, split * per_split)
    r_end = tl.minimum(t_end * GROUP, (split + 1) * per_split)
    for row0 in range(r_begin, r_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        t = rows // GROUP
        hq = h * GROUP + rows % GROUP
        row_ok = rows < r_end
        tok = (q_start + t).to(tl.int64)
        q = load_pairs(Q, tok, hq, row_ok, sq_t, sq_h, dk, DK)
        do = load_pairs(DO, tok, hq, row_ok, sd_t, sd_h, dv, DV)
        lse = tl.load(LSE + tok * sl_t + hq * sl_h + BRANCH, mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + tok * sdl_t + hq * sdl_h + BRANCH, mask=row_ok, other=0.0)
        gate = tl.load(GATE + tok * sg_t + hq * sg_h + BRANCH, mask=row_ok, other=0.0).to(tl.float32)
        qk_t = tl.dot(kk, tl.trans(q)) * scale_log2
        vis = _visible(s[:, None], t[None, :], KSTRIDE, KSPAN, WINDOW) & s_ok[:, None] & row_ok[None, :]
        pg_t = tl.where(vis, tl.math.exp2(qk_t - lse2[None, :]), 0.0) * gate[None, :]
        acc_dv += tl.dot(pg_t.to(do.dtype), do)
        dp_t = tl.dot(vv, tl.trans(do))
        ds_t = pg_t * (dp_t - delta[None, :])
        acc_dk += tl.dot(ds_t.to(q.dtype), q)
    acc_dk *= scale
    dk_ptr = DK_ + split * sdk_s + ktok[:, None] * sdk_t + h * sdk_h + dk[None, :]
    dv_ptr = DV_ + split * sdv_s + ktok[:, None] * sdv_t + h * sdv_h + dv[None, :]
    dk_mask = s_ok[:, None] & (dk[None, :] < DK)
    dv_mask = s_ok[:, None] & (dv[None, :] < DV)
    if ACCUM:
        acc_dk += tl.load(dk_ptr, mask=dk_mask, other=0.0)
        acc_dv += tl.load(dv_ptr, mask=dv_mask, other=0.0)
    tl.store(dk_ptr, acc_dk, mask=dk_mask)
    tl.store(dv_ptr, acc_dv, mask=dv_mask)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def banded_forward(
    q, k, v, gates, acc, out, lse, cu_q, cu_k, max_len, *, stride, span, window, branch, mode, scale
):
    """Launch the forward for one branch; q/k/v/gates/acc/out/lse are packed (see module doc)."""
    n_seq = cu_q.numel() - 1
    hq, dk = q.shape[1], q.shape[2]
    hkv, dv = k.shape[1], v.shape[2]
    group = hq // hkv
    block_m, block_n, warps, stages = _fwd_config(dk, dv, q.device.type)
    grid = (triton.cdiv(max_len * group, block_m), hkv, n_seq)
    out_ = out if out is not None else acc
    banded_fwd_kernel[grid](
        q, k, v, gates, acc, out_, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        gates.stride(0), gates.stride(1), acc.stride(0), acc.stride(1), out_.stride(0), out_.stride(1),
        lse.stride(0), lse.stride(1),
        scale * LOG2E,
        GROUP=group, KSTRIDE=stride, KSPAN=span, WINDOW=window, BRANCH=branch, MODE=mode,
        DK=dk, DV=dv, BDK=_pow2(dk), BDV=_pow2(dv), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def banded_backward(
    q, k, v, gates, do, lse, dq, delta, dk, dv, cu_q, cu_k, max_len, max_len_k, *,
    stride, span, window, branch, scale, accum_dq, accum_dkv,
):  # fmt: skip
    """dq (fp32, added to when accum_dq), delta[..., branch] = dgates, then dk/dv (fp32) of one branch."""
    n_seq = cu_q.numel() - 1
    hq, dkh = q.shape[1], q.shape[2]
    hkv, dvh = k.shape[1], v.shape[2]
    group = hq // hkv
    block_m, block_n, warps, stages = _dq_config(dkh, dvh, q.device.type, window)
    consts = dict(
        GROUP=group, KSTRIDE=stride, KSPAN=span, WINDOW=window, BRANCH=branch,
        DK=dkh, DV=dvh, BDK=_pow2(dkh), BDV=_pow2(dvh),
    )  # fmt: skip
    banded_bwd_dq_kernel[(triton.cdiv(max_len * group, block_m), hkv, n_seq)](
        q, k, v, gates, do, lse, dq, delta, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        gates.stride(0), gates.stride(1), do.stride(0), do.stride(1), lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), delta.stride(0), delta.stride(1),
        scale, scale * LOG2E, ACCUM=accum_dq, BLOCK_M=block_m, BLOCK_N=block_n, **consts,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    kv_block_n, kv_block_m, warps, stages = _dkdv_config(dkh, dvh, q.device.type, window)
    if max_len_k == 0:
        return
    n_kb = triton.cdiv(max_len_k, kv_block_n)
    splits = _dkdv_splits(q, n_kb * hkv * n_seq, window)
    out_k, out_v = dk, dv
    if splits > 1:
        out_k = empty(splits, *dk.shape, dtype=dk.dtype, device=dk.device)
        out_v = empty(splits, *dv.shape, dtype=dv.dtype, device=dv.device)
    sk3 = out_k.stride() if splits > 1 else (0, *dk.stride())
    sv3 = out_v.stride() if splits > 1 else (0, *dv.stride())
    banded_bwd_dkdv_kernel[(n_kb, hkv * splits, n_seq)](
        q, k, v, gates, do, lse, delta, out_k, out_v, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        gates.stride(0), gates.stride(1), do.stride(0), do.stride(1), lse.stride(0), lse.stride(1),
        delta.stride(0), delta.stride(1), sk3[0], sk3[1], sk3[2], sv3[0], sv3[1], sv3[2],
        splits, scale, scale * LOG2E, ACCUM=accum_dkv and splits == 1, BLOCK_M=kv_block_m,
        BLOCK_N=kv_block_n, **consts, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if splits > 1:
        for total, parts in ((dk, out_k), (dv, out_v)):
            if accum_dkv:
                total.add_(parts.sum(0))
            else:
                torch.sum(parts, 0, out=total)


def _dkdv_splits(q, n_programs: int, window: int) -> int:
    """Row splits of the dk/dv pass with n_programs key blocks: SPLITS_PER_SM programs per multiprocessor in
    all; one for the window branch, whose keys each see only the rows of one window."""
    if window:
        return 1
    target = SPLITS_PER_SM * multiprocessors(q.device, 1)
    return max(1, min(64, triton.cdiv(target, n_programs)))


def _fwd_config(dk: int, dv: int, device: str):
    """(BLOCK_M, BLOCK_N, warps, stages); small tiles under the interpreter keep CI fast."""
    if device != "cuda":
        return 16, 16, 4, 1
    if max(dk, dv) > 128:
        return 64, 64, 4, 2
    return 128, 64, 8, 3


def _override(name: str) -> tuple[int, int, int, int] | None:
    """A launch config from the environment ("a,b,warps,stages"; benchmarking, see sweep_backward.py)."""
    env = os.environ.get(name)
    if not env:
        return None
    problem = f"{name}={env!r}: expected two tile sizes (powers of two ≥ 16), warps (a power of two), stages"
    try:
        values = tuple(int(x) for x in env.split(","))
    except ValueError:
        raise ValueError(problem) from None
    if len(values) != 4 or min(values[:2]) < 16 or values[3] < 1:
        raise ValueError(problem)
    if any(x < 1 or x & (x - 1) for x in values[:3]):
        raise ValueError(problem)
    return values


def _dq_config(dk: int, dv: int, device: str, window: int):
    """(BLOCK_M, BLOCK_N, warps, stages) of the dq pass; NSA_BANDED_DQ="bm,bn,warps,stages" overrides.
    Measured at 64k: 8 warps with halved tiles in both passes (no spills) ran 2× slower than these; 32-key
    tiles in 3 stages speed the window branch up (win bwd 17.1 → 16.6 ms paper-G16, 10.0 → 9.5 llama-G4,
    sweep_backward.py 2026-12-08) and leave the compressed one as it is (43.5, 25.0 → 25.5)."""
    override = _override("NSA_BANDED_DQ")
    if override:
        return override
    if device != "cuda":
        return 16, 16, 4, 1
    if window and max(dk, dv) <= 128:
        return 64, 32, 4, 3
    if max(dk, dv) > 128:
        return 64, 32, 4, 2
    return 64, 64, 4, 2


def _dkdv_config(dk: int, dv: int, device: str, window: int):
    """(BLOCK_N keys, BLOCK_M query rows, warps, stages) of the dk/dv pass;
    NSA_BANDED_DKDV="bn,bm,warps,stages" overrides. Measured at 64k (sweep_backward.py, 2026-12-08): 32-row
    tiles speed the window branch up (win bwd 17.1 → 16.4 ms paper-G16, 10.0 → 9.0 llama-G4; they spill
    256 B instead of 448 in the offline sm_90 compile) and slow the compressed one (43.5 → 46.7, 25.0 →
    27.0); 8 warps or 32-key tiles cost the compressed branch 37–62% and the window's up to 31% (one
    exception: 32 keys × 64 rows, llama −2%)."""
    override = _override("NSA_BANDED_DKDV")
    if override:
        return override
    if device != "cuda":
        return 16, 16, 4, 1
    if max(dk, dv) > 128 or window:
        return 64, 32, 4, 2
    return 64, 64, 4, 2
