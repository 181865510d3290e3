"""NSA forward and backward on packed sequences, built from the branch kernels; batched entry points wrap it.

Order of the forward: compressed branch (writes its lse, which selection needs, and g_cmp·o_cmp into an fp32
accumulator), top-n selection, selected branch (adds g_slc·o_slc), window branch (adds g_win·o_win and writes
the output in the input dtype: the gate combination is fused into the last epilogue). The branch outputs are
not kept: each backward dq kernel recomputes rowsum(dO ∘ o_branch), which is the gate's gradient and the
softmax-backward delta, in the same pass as dq.
"""

from __future__ import annotations

import torch

from nsa_convert.kernels.banded import FINAL, LSE_ONLY, STORE_ACC, banded_backward, banded_forward
from nsa_convert.kernels.buffers import empty
from nsa_convert.kernels.selected import selected_backward, selected_forward
from nsa_convert.kernels.selection import select_launch
from nsa_convert.spec import SparsityParams, num_compressed_blocks


def _cu(lengths: list[int], device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, params: SparsityParams) -> torch.Tensor:
    """cu_seqlens of the packed compressed keys: sequence i contributes num_compressed_blocks(T_i) rows."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    tc = [num_compressed_blocks(n, params.compress_block, params.compress_stride) for n in lengths]
    return _cu(tc, cu_seqlens.device)


def _resolve(params: SparsityParams, q: torch.Tensor) -> SparsityParams:
    return params.resolved(q.shape[-1])


def _geometry(cu_seqlens, cu_seqlens_cmp, max_seqlen, params):
    cu = cu_seqlens.to(torch.int32)
    cu_c = compressed_cu_seqlens(cu, params) if cu_seqlens_cmp is None else cu_seqlens_cmp.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    max_c = num_compressed_blocks(max_seqlen, params.compress_block, params.compress_stride)
    return cu, cu_c, max_seqlen, max_c


def _check(q, k, v, k_cmp, v_cmp, gates):
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    for name, x in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if x.shape[-2] != hkv:
            raise ValueError(f"{name} has {x.shape[-2]} heads, expected {hkv}")
    if gates.shape[-1] != 3 or gates.shape[-2] != hq:
        raise ValueError(f"gates must end in ({hq}, 3), got {tuple(gates.shape)}")


def select_blocks_varlen(q, k_cmp, params, cu_seqlens, cu_seqlens_cmp=None, max_seqlen=None):
    """Selected block ids [N, Hkv, n] (int64, ascending, −1 padded) of packed q [N, Hq, DK], k_cmp [Nc, Hkv, DK]."""
    params = _resolve(params, q)
    cu, cu_c, max_len, _ = _geometry(cu_seqlens, cu_seqlens_cmp, max_seqlen, params)
    n, hq, _ = q.shape
    hkv = k_cmp.shape[1]
    lse = empty(n, hq, 3, dtype=torch.float32, device=q.device)
    banded_forward(
        q, k_cmp, k_cmp, lse, lse, None, lse, cu, cu_c, max_len, stride=params.compress_stride,
        span=params.compress_block, window=0, branch=0, mode=LSE_ONLY, scale=params.scale,
    )  # fmt: skip
    idx = empty(n, hkv, params.top_n, dtype=torch.int64, device=q.device)
    select_launch(q, k_cmp, lse[..., 0], idx, cu, cu_c, max_len, params)
    return idx


def nsa_forward_varlen(
    q, k, v, k_cmp, v_cmp, gates, params, cu_seqlens, cu_seqlens_cmp=None, max_seqlen=None,
    k_win=None, v_win=None,
):  # fmt: skip
    """NSA on packed sequences.

    q [N, Hq, DK], k [N, Hkv, DK], v [N, Hkv, DV], gates [N, Hq, 3] (cmp, slc, win), k_win/v_win [N, Hkv, ·]
    optional window-branch keys/values; k_cmp [Nc, Hkv, DK], v_cmp [Nc, Hkv, DV] packed with cu_seqlens_cmp
    (default: num_compressed_blocks of each length). cu_seqlens [S + 1] int32 offsets of the sequences.
    Returns out [N, Hq, DV] (q.dtype), lse [N, Hq, 3] float32 (−inf for an empty branch), indices
    [N, Hkv, n] int64 (block ids local to each sequence, ascending, −1 padded).
    """
    _check(q, k, v, k_cmp, v_cmp, gates)
    params = _resolve(params, q)
    cu, cu_c, max_len, _ = _geometry(cu_seqlens, cu_seqlens_cmp, max_seqlen, params)
    n, hq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    acc = empty(n, hq, dv, dtype=torch.float32, device=q.device)
    out = empty(n, hq, dv, dtype=q.dtype, device=q.device)
    lse = empty(n, hq, 3, dtype=torch.float32, device=q.device)
    banded_forward(
        q, k_cmp, v_cmp, gates, acc, None, lse, cu, cu_c, max_len, stride=params.compress_stride,
        span=params.compress_block, window=0, branch=0, mode=STORE_ACC, scale=params.scale,
    )  # fmt: skip
    idx = empty(n, hkv, params.top_n, dtype=torch.int64, device=q.device)
    select_launch(q, k_cmp, lse[..., 0], idx, cu, cu_c, max_len, params)
    selected_forward(q, k, v, idx, gates, acc, lse, cu, max_len, params, accumulate=True)
    kw = k if k_win is None else k_win
    vw = v if v_win is None else v_win
    banded_forward(
        q, kw, vw, gates, acc, out, lse, cu, cu, max_len, stride=1, span=1, window=params.window,
        branch=2, mode=FINAL, scale=params.scale,
    )  # fmt: skip
    return out, lse, idx


def nsa_backward_varlen(
    grad_out, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, out, lse, indices, params, cu_seqlens,
    cu_seqlens_cmp=None, max_seqlen=None,
):  # fmt: skip
    """Gradients of nsa_forward_varlen: (dq, dk, dv, dk_cmp, dv_cmp, dgates, dk_win, dv_win), shapes of the
    inputs (dk_win/dv_win None when k_win/v_win are None). `out` is unused: the branch outputs are recomputed.
    """
    params = _resolve(params, q)
    cu, cu_c, max_len, max_c = _geometry(cu_seqlens, cu_seqlens_cmp, max_seqlen, params)
    do = grad_out.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = empty(*q.shape, **f32)
    dgates = empty(*gates.shape, **f32)
    dk_cmp = empty(*k_cmp.shape, **f32)
    dv_cmp = empty(*v_cmp.shape, **f32)
    banded_backward(
        q, k_cmp, v_cmp, gates, do, lse, dq, dgates, dk_cmp, dv_cmp, cu, cu_c, max_len, max_c,
        stride=params.compress_stride, span=params.compress_block, window=0, branch=0, scale=params.scale,
        accum_dq=False, accum_dkv=False,
    )  # fmt: skip
    dk = empty(*k.shape, **f32)
    dv = empty(*v.shape, **f32)
    selected_backward(
        q, k, v, indices, gates, do, lse, dq, dgates, dk, dv, cu, max_len, params, accum_dq=True
    )
    separate = k_win is not None
    kw = k_win if separate else k
    vw = v_win if separate else v
    dkw = empty(*kw.shape, **f32) if separate else dk
    dvw = empty(*vw.shape, **f32) if separate else dv
    banded_backward(
        q, kw, vw, gates, do, lse, dq, dgates, dkw, dvw, cu, cu, max_len, max_len, stride=1, span=1,
        window=params.window, branch=2, scale=params.scale, accum_dq=True, accum_dkv=not separate,
    )  # fmt: skip
    return (
        dq.to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        dk_cmp.to(k_cmp.dtype),
        dv_cmp.to(v_cmp.dtype),
        dgates.to(gates.dtype),
        dkw.to(kw.dtype) if separate else None,
        dvw.to(vw.dtype) if separate else None,
    )


def _pack(x):
    """[B, T, ...] → [B·T, ...] with a unit-stride last dim (the kernels index it directly)."""
    if x is None:
        return None
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _batch_cu(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length


def nsa_forward(q, k, v, k_cmp, v_cmp, gates, params, k_win=None, v_win=None):
    """Batched NSA: q [B, T, Hq, DK], k [B, T, Hkv, DK], v [B, T, Hkv, DV], k_cmp [B, Tc, Hkv, DK],
    v_cmp [B, Tc, Hkv, DV], gates [B, T, Hq, 3]. Returns out [B, T, Hq, DV] (q.dtype), lse [B, T, Hq, 3]
    float32 per-branch log-sum-exp (−inf where empty), indices [B, T, Hkv, n] int64 ascending, −1 padded.
    """
    b, t = q.shape[:2]
    tc = k_cmp.shape[1]
    out, lse, idx = nsa_forward_varlen(
        _pack(q), _pack(k), _pack(v), _pack(k_cmp), _pack(v_cmp), _pack(gates), params,
        _batch_cu(b, t, q.device), _batch_cu(b, tc, q.device), t, _pack(k_win), _pack(v_win),
    )  # fmt: skip
    return out.view(b, t, *out.shape[1:]), lse.view(b, t, *lse.shape[1:]), idx.view(b, t, *idx.shape[1:])


def nsa_backward(grad_out, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, out, lse, indices, params):
    """Gradients of nsa_forward: (dq, dk, dv, dk_cmp, dv_cmp, dgates, dk_win, dv_win), batched shapes."""
    b, t = q.shape[:2]
    tc = k_cmp.shape[1]
    grads = nsa_backward_varlen(
        _pack(grad_out), _pack(q), _pack(k), _pack(v), _pack(k_cmp), _pack(v_cmp), _pack(gates),
        _pack(k_win), _pack(v_win), _pack(out), _pack(lse), _pack(indices), params,
        _batch_cu(b, t, q.device), _batch_cu(b, tc, q.device), t,
    )  # fmt: skip
    return tuple(None if g is None else g.view(b, -1, *g.shape[1:]) for g in grads)


def select_blocks(q, k_cmp, params):
    """Selected block ids [B, T, Hkv, n] (int64, ascending, −1 padded) of q [B, T, Hq, DK], k_cmp [B, Tc, Hkv, DK]."""
    b, t = q.shape[:2]
    idx = select_blocks_varlen(
        _pack(q), _pack(k_cmp), params, _batch_cu(b, t, q.device), _batch_cu(b, k_cmp.shape[1], q.device), t
    )
    return idx.view(b, t, *idx.shape[1:])
