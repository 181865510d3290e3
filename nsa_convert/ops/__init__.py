"""NSA as torch.library custom ops, so that models using it trace under torch.export and train.

`nsa_convert::nsa_attention` returns (out, lse, indices) and dispatches to a backend: "reference"
(`nsa_convert.reference`, any device) or "triton" (`nsa_convert.kernels`, CUDA).  Its backward is a second
op, `nsa_convert::nsa_attention_backward`, so the backward is backend-specific and traceable as well.
`nsa_convert::nsa_attention_varlen` (and its backward) is the same on packed documents, each computed alone;
`nsa_convert::select_blocks` exposes the block selection alone; `nsa_convert::nsa_decode` is the decoding
path (the last few tokens of each sequence against a KV cache, `nsa_convert.kernels.decode` on "triton").  Use the Python wrappers below: they
validate inputs, resolve the default scale and the "auto" backend, then call the ops.
"""

from __future__ import annotations

import functools
import itertools
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from nsa_convert import reference
from nsa_convert.spec import SparsityParams, num_compressed_blocks

__all__ = [
    "BACKENDS",
    "nsa_attention",
    "nsa_attention_varlen",
    "nsa_attention_with_stats",
    "nsa_decode",
    "nsa_decode_with_stats",
    "resolve_backend",
    "select_blocks",
]

BACKENDS = ("auto", "reference", "triton")
"""Accepted `backend` names; "auto" means "triton" for CUDA inputs when Triton imports, else "reference"."""


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for `backend` on tensors of `device` ("auto" resolved; unknown names raise)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and _triton_available() else "reference"


def _implementation(backend: str, name: str) -> Any:
    """`name` (nsa_forward, nsa_backward, their _varlen forms, select_blocks, nsa_decode) of a backend."""
    module: ModuleType
    if backend == "reference":
        module = reference
    elif backend == "triton" and name == "nsa_decode":
        import nsa_convert.kernels.decode as module
    elif backend == "triton":
        import nsa_convert.kernels as module
    else:
        raise ValueError(f"backend must be 'reference' or 'triton' inside the op, got {backend!r}")
    function = getattr(module, name, None)
    if function is None:
        raise NotImplementedError(f"the {backend!r} backend does not provide {module.__name__}.{name} yet")
    return function


def _params(
    block_size: int, top_n: int, window: int, compress_block: int, compress_stride: int, scale: float
) -> SparsityParams:
    return SparsityParams(block_size, top_n, window, compress_block, compress_stride, scale)


@torch.library.custom_op("nsa_convert::nsa_attention", mutates_args=())
def _nsa_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    params = _params(block_size, top_n, window, compress_block, compress_stride, scale)
    return _implementation(backend, "nsa_forward")(q, k, v, k_cmp, v_cmp, gates, params, k_win, v_win)


@_nsa_attention_op.register_fake
def _nsa_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    batch, seq_len, num_q_heads, _ = q.shape
    out = q.new_empty(batch, seq_len, num_q_heads, v.shape[-1])
    lse = q.new_empty(batch, seq_len, num_q_heads, 3, dtype=torch.float32)
    indices = q.new_empty(batch, seq_len, k.shape[2], top_n, dtype=torch.long)
    return out, lse, indices


@torch.library.custom_op("nsa_convert::nsa_attention_backward", mutates_args=())
def _nsa_attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> list[Tensor]:
    """[dq, dk, dv, dk_cmp, dv_cmp, dgates] followed by [dk_win, dv_win] when k_win/v_win are given."""
    params = _params(block_size, top_n, window, compress_block, compress_stride, scale)
    backward = _implementation(backend, "nsa_backward")
    grads = backward(grad_out, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, out, lse, indices, params)
    return [g for g in grads if g is not None]


@_nsa_attention_backward_op.register_fake
def _nsa_attention_backward_fake(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> list[Tensor]:
    return [torch.empty_like(x) for x in (q, k, v, k_cmp, v_cmp, gates, k_win, v_win) if x is not None]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win, *config = inputs
    out, lse, indices = output
    ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, out, lse, indices)
    ctx.config = config
    ctx.mark_non_differentiable(lse, indices)


def _backward(
    ctx: Any, grad_out: Tensor, _grad_lse: Tensor, _grad_indices: Tensor
) -> tuple[Tensor | None, ...]:
    saved = ctx.saved_tensors
    grads = _nsa_attention_backward_op(grad_out.contiguous(), *saved, *ctx.config)
    has_window = saved[6] is not None
    window_grads = (grads[6], grads[7]) if has_window else (None, None)
    return (*grads[:6], *window_grads) + (None,) * len(ctx.config)


_nsa_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("nsa_convert::select_blocks", mutates_args=())
def _select_blocks_op(
    q: Tensor,
    k_cmp: Tensor,
    block_size: int,
    top_n: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> Tensor:
    params = SparsityParams(
        block_size=block_size,
        top_n=top_n,
        compress_block=compress_block,
        compress_stride=compress_stride,
        scale=scale,
    )
    return _implementation(backend, "select_blocks")(q, k_cmp, params)


@_select_blocks_op.register_fake
def _select_blocks_fake(
    q: Tensor,
    k_cmp: Tensor,
    block_size: int,
    top_n: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> Tensor:
    batch, seq_len = q.shape[:2]
    return q.new_empty(batch, seq_len, k_cmp.shape[2], top_n, dtype=torch.long)


@torch.library.custom_op("nsa_convert::nsa_decode", mutates_args=())
def _nsa_decode_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    seq_lens: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    params = _params(block_size, top_n, window, compress_block, compress_stride, scale)
    decode = _implementation(backend, "nsa_decode")
    return decode(q, k, v, k_cmp, v_cmp, gates, seq_lens, params, k_win, v_win)


@_nsa_decode_op.register_fake
def _nsa_decode_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    seq_lens: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    batch, n, num_q_heads, _ = q.shape
    out = q.new_empty(batch, n, num_q_heads, v.shape[-1])
    lse = q.new_empty(batch, n, num_q_heads, 3, dtype=torch.float32)
    indices = q.new_empty(batch, n, k.shape[2], top_n, dtype=torch.long)
    return out, lse, indices


def _check_rank4(**tensors: Tensor | None) -> None:
    for name, x in tensors.items():
        if x is not None and x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(x.shape)}")


def _check_group(num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"the query heads ({num_q_heads}) must be a multiple of the KV heads ({num_kv_heads})"
        )


def _check_window_pair(k_win: Tensor | None, v_win: Tensor | None) -> None:
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win and v_win must be given together (or both left out)")


def _check_shapes(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Each expected tensor's shape; `source` names what the expectation was derived from."""
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape} from {source}")


def _check_like_q(q: Tensor, tensors: dict[str, Tensor | None]) -> None:
    """Every given tensor in q's dtype and on q's device."""
    for name, x in tensors.items():
        if x is None:
            continue
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}: cast all inputs to one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")


def _check_common(q: Tensor, k_cmp: Tensor, params: SparsityParams) -> None:
    """Checks shared by both ops: q against k_cmp, and Tc against T."""
    batch, seq_len, num_q_heads, head_dim = q.shape
    if seq_len < 1:
        raise ValueError("q must hold at least one token (T ≥ 1)")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    if k_cmp.shape[0] != batch or k_cmp.shape[3] != head_dim:
        raise ValueError(
            f"k_cmp {tuple(k_cmp.shape)} must be (B, Tc, Hkv, Dk) with B = {batch} and Dk = {head_dim} like q"
        )
    _check_group(num_q_heads, k_cmp.shape[2])
    expected = num_compressed_blocks(seq_len, params.compress_block, params.compress_stride)
    if k_cmp.shape[1] != expected:
        raise ValueError(
            f"k_cmp has {k_cmp.shape[1]} compressed blocks but T = {seq_len} with compress_block = "
            f"{params.compress_block} and compress_stride = {params.compress_stride} gives {expected}"
        )


def _check_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    params: SparsityParams,
) -> None:
    _check_rank4(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, gates=gates, k_win=k_win, v_win=v_win)
    _check_common(q, k_cmp, params)
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim = k_cmp.shape[2], v.shape[3]
    expected = {
        "k": (batch, seq_len, num_kv_heads, head_dim),
        "v": (batch, seq_len, num_kv_heads, value_dim),
        "v_cmp": (batch, k_cmp.shape[1], num_kv_heads, value_dim),
        "gates": (batch, seq_len, num_q_heads, 3),
    }
    _check_window_pair(k_win, v_win)
    if k_win is not None:
        expected.update(k_win=expected["k"], v_win=expected["v"])
    tensors = {"k": k, "v": v, "v_cmp": v_cmp, "gates": gates, "k_win": k_win, "v_win": v_win}
    _check_shapes(tensors, expected, f"q {tuple(q.shape)}, k_cmp {tuple(k_cmp.shape)} and v")
    _check_like_q(q, {"k_cmp": k_cmp, **tensors})


def nsa_attention_with_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    *,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    block_size: int = 64,
    top_n: int = 16,
    window: int = 512,
    compress_block: int = 32,
    compress_stride: int = 16,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Like `nsa_attention`, also returning each branch's log-sum-exp and the selected blocks.

    Returns out (B, T, Hq, Dv) in q's dtype, lse (B, T, Hq, 3) float32 ordered (cmp, slc, win; -inf for
    a branch with no keys) and indices (B, T, Hkv, top_n) int64 (sorted, padded with -1).  Only out is
    differentiable.
    """
    params = SparsityParams(block_size, top_n, window, compress_block, compress_stride, scale)
    _check_attention(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, params)
    params = params.resolved(q.shape[-1])
    return _nsa_attention_op(
        q,
        k,
        v,
        k_cmp,
        v_cmp,
        gates,
        k_win,
        v_win,
        block_size,
        top_n,
        window,
        compress_block,
        compress_stride,
        float(params.scale),
        resolve_backend(backend, q.device),
    )


def nsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    *,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    block_size: int = 64,
    top_n: int = 16,
    window: int = 512,
    compress_block: int = 32,
    compress_stride: int = 16,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Native Sparse Attention (NSA_SPEC.md): o = g_cmp · o_cmp + g_slc · o_slc + g_win · o_win.

    q (B, T, Hq, Dk); k (B, T, Hkv, Dk); v (B, T, Hkv, Dv) with Hq a multiple of Hkv;
    k_cmp (B, Tc, Hkv, Dk), v_cmp (B, Tc, Hkv, Dv) the compressed keys/values, Tc =
    spec.num_compressed_blocks(T, compress_block, compress_stride); gates (B, T, Hq, 3) ordered
    (cmp, slc, win); k_win/v_win (like k/v), when given, feed the sliding-window branch instead of k/v.
    scale defaults to Dk ** -0.5; backend is one of BACKENDS.  Returns out (B, T, Hq, Dv) in q's dtype,
    differentiable with respect to every tensor argument (the block selection itself is discrete).
    """
    out, _, _ = nsa_attention_with_stats(
        q,
        k,
        v,
        k_cmp,
        v_cmp,
        gates,
        k_win=k_win,
        v_win=v_win,
        block_size=block_size,
        top_n=top_n,
        window=window,
        compress_block=compress_block,
        compress_stride=compress_stride,
        scale=scale,
        backend=backend,
    )
    return out


def select_blocks(
    q: Tensor,
    k_cmp: Tensor,
    *,
    block_size: int = 64,
    top_n: int = 16,
    compress_block: int = 32,
    compress_stride: int = 16,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """The selection blocks NSA attends to: per (b, t, KV head), forced 0, current and previous, the rest
    by compressed-attention importance summed over the query-head group (ties to the lower index).

    q (B, T, Hq, Dk); k_cmp (B, Tc, Hkv, Dk).  Returns a LongTensor (B, T, Hkv, top_n), sorted ascending
    and padded with -1 where fewer than top_n blocks exist.
    """
    params = SparsityParams(
        block_size, top_n, compress_block=compress_block, compress_stride=compress_stride, scale=scale
    )
    _check_rank4(q=q, k_cmp=k_cmp)
    _check_common(q, k_cmp, params)
    if k_cmp.dtype != q.dtype or k_cmp.device != q.device:
        raise ValueError(f"k_cmp ({k_cmp.dtype} on {k_cmp.device}) must match q ({q.dtype} on {q.device})")
    params = params.resolved(q.shape[-1])
    return _select_blocks_op(
        q,
        k_cmp,
        block_size,
        top_n,
        compress_block,
        compress_stride,
        float(params.scale),
        resolve_backend(backend, q.device),
    )


def _document_spans(cu_seqlens: Tensor, cu_seqlens_cmp: Tensor) -> list[tuple[slice, slice]]:
    """(token rows, compressed rows) of every non-empty packed document."""
    tokens, blocks = cu_seqlens.tolist(), cu_seqlens_cmp.tolist()
    return [
        (slice(tokens[i], tokens[i + 1]), slice(blocks[i], blocks[i + 1]))
        for i in range(len(tokens) - 1)
        if tokens[i + 1] > tokens[i]
    ]


def _alone(x: Tensor | None, rows: slice) -> Tensor | None:
    """One document's rows of a packed tensor as a batch of one."""
    return None if x is None else x[rows].unsqueeze(0)


def _reference_varlen_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    cu_seqlens: Tensor,
    cu_seqlens_cmp: Tensor,
    params: SparsityParams,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference on each document alone, results packed again: the definition of the varlen op."""
    parts = [
        reference.nsa_forward(
            *(_alone(x, t) for x in (q, k, v)),
            *(_alone(x, c) for x in (k_cmp, v_cmp)),
            _alone(gates, t),
            params,
            _alone(k_win, t),
            _alone(v_win, t),
        )
        for t, c in _document_spans(cu_seqlens, cu_seqlens_cmp)
    ]
    out, lse, indices = (torch.cat([part[i][0] for part in parts]) for i in range(3))
    return out, lse, indices


def _reference_varlen_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    cu_seqlens: Tensor,
    cu_seqlens_cmp: Tensor,
    params: SparsityParams,
) -> list[Tensor | None]:
    """Gradients of _reference_varlen_forward, document by document."""
    parts = [
        reference.nsa_backward(
            *(_alone(x, t) for x in (grad_out, q, k, v)),
            *(_alone(x, c) for x in (k_cmp, v_cmp)),
            *(_alone(x, t) for x in (gates, k_win, v_win, out, lse, indices)),
            params,
        )
        for t, c in _document_spans(cu_seqlens, cu_seqlens_cmp)
    ]
    return [None if parts[0][i] is None else torch.cat([part[i][0] for part in parts]) for i in range(8)]


@torch.library.custom_op("nsa_convert::nsa_attention_varlen", mutates_args=())
def _nsa_attention_varlen_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    cu_seqlens: Tensor,
    cu_seqlens_cmp: Tensor,
    max_seqlen: int,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    params = _params(block_size, top_n, window, compress_block, compress_stride, scale)
    if backend == "reference":
        return _reference_varlen_forward(
            q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, cu_seqlens_cmp, params
        )
    forward = _implementation(backend, "nsa_forward_varlen")
    return forward(q, k, v, k_cmp, v_cmp, gates, params, cu_seqlens, cu_seqlens_cmp, max_seqlen, k_win, v_win)


@_nsa_attention_varlen_op.register_fake
def _nsa_attention_varlen_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    cu_seqlens: Tensor,
    cu_seqlens_cmp: Tensor,
    max_seqlen: int,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    tokens, num_q_heads, _ = q.shape
    out = q.new_empty(tokens, num_q_heads, v.shape[-1])
    lse = q.new_empty(tokens, num_q_heads, 3, dtype=torch.float32)
    indices = q.new_empty(tokens, k.shape[1], top_n, dtype=torch.long)
    return out, lse, indices


@torch.library.custom_op("nsa_convert::nsa_attention_varlen_backward", mutates_args=())
def _nsa_attention_varlen_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    cu_seqlens: Tensor,
    cu_seqlens_cmp: Tensor,
    max_seqlen: int,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> list[Tensor]:
    """[dq, dk, dv, dk_cmp, dv_cmp, dgates] followed by [dk_win, dv_win] when k_win/v_win are given."""
    params = _params(block_size, top_n, window, compress_block, compress_stride, scale)
    saved = (q, k, v, k_cmp, v_cmp, gates, k_win, v_win, out, lse, indices)
    if backend == "reference":
        grads = _reference_varlen_backward(grad_out, *saved, cu_seqlens, cu_seqlens_cmp, params)
    else:
        backward = _implementation(backend, "nsa_backward_varlen")
        grads = backward(grad_out, *saved, params, cu_seqlens, cu_seqlens_cmp, max_seqlen)
    return [g for g in grads if g is not None]


@_nsa_attention_varlen_backward_op.register_fake
def _nsa_attention_varlen_backward_fake(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    cu_seqlens: Tensor,
    cu_seqlens_cmp: Tensor,
    max_seqlen: int,
    block_size: int,
    top_n: int,
    window: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
    backend: str,
) -> list[Tensor]:
    return [torch.empty_like(x) for x in (q, k, v, k_cmp, v_cmp, gates, k_win, v_win) if x is not None]


def _setup_varlen_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, cu_seqlens_cmp, *config = inputs
    out, lse, indices = output
    ctx.save_for_backward(
        q, k, v, k_cmp, v_cmp, gates, k_win, v_win, out, lse, indices, cu_seqlens, cu_seqlens_cmp
    )
    ctx.config = config
    ctx.mark_non_differentiable(lse, indices)


def _varlen_backward(
    ctx: Any, grad_out: Tensor, _grad_lse: Tensor, _grad_indices: Tensor
) -> tuple[Tensor | None, ...]:
    saved = ctx.saved_tensors
    grads = _nsa_attention_varlen_backward_op(grad_out.contiguous(), *saved, *ctx.config)
    window_grads = (grads[6], grads[7]) if saved[6] is not None else (None, None)
    return (*grads[:6], *window_grads, None, None) + (None,) * len(ctx.config)


_nsa_attention_varlen_op.register_autograd(_varlen_backward, setup_context=_setup_varlen_context)


def _check_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
    blocks: int,
) -> None:
    """Shapes, dtypes and devices of nsa_attention_varlen's packed inputs against q, v and the offsets."""
    tensors = {"k": k, "v": v, "k_cmp": k_cmp, "v_cmp": v_cmp, "gates": gates}
    tensors.update({"k_win": k_win, "v_win": v_win} if k_win is not None and v_win is not None else {})
    for name, x in {"q": q, **tensors}.items():
        if x.dim() != 3:
            raise ValueError(
                f"{name} must have 3 dimensions (packed tokens first), got shape {tuple(x.shape)}"
            )
    _check_window_pair(k_win, v_win)
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim = k.shape[1], v.shape[2]
    _check_group(num_q_heads, num_kv_heads)
    expected = {
        "k": (tokens, num_kv_heads, head_dim),
        "v": (tokens, num_kv_heads, value_dim),
        "k_cmp": (blocks, num_kv_heads, head_dim),
        "v_cmp": (blocks, num_kv_heads, value_dim),
        "gates": (tokens, num_q_heads, 3),
        "k_win": (tokens, num_kv_heads, head_dim),
        "v_win": (tokens, num_kv_heads, value_dim),
    }
    _check_shapes(tensors, {name: expected[name] for name in tensors}, "q, k, v and the offsets")
    _check_like_q(q, tensors)


def _document_lengths(cu_seqlens: Tensor, tokens: int, device: torch.device) -> list[int]:
    """The documents' lengths, after checking that cu_seqlens partitions the packed tokens."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if tokens < 1:
        raise ValueError("q must hold at least one token (N ≥ 1)")
    offsets = cu_seqlens.tolist()
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != tokens:
        raise ValueError(f"cu_seqlens must run from 0 to the {tokens} packed tokens, got {offsets[:3]}…")
    lengths = [b - a for a, b in itertools.pairwise(offsets)]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    return lengths


def nsa_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    cu_seqlens: Tensor,
    *,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    block_size: int = 64,
    top_n: int = 16,
    window: int = 512,
    compress_block: int = 32,
    compress_stride: int = 16,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """NSA over packed documents, each computed as if it were alone (training on packed sequences).

    q (N, Hq, Dk), k (N, Hkv, Dk), v (N, Hkv, Dv), gates (N, Hq, 3), k_win/v_win (like k/v): the N tokens
    of all documents back to back; cu_seqlens (S + 1,) int32/int64 their offsets (0, …, N).  k_cmp
    (Nc, Hkv, Dk), v_cmp (Nc, Hkv, Dv): each document's compressed blocks, in document order
    (spec.num_compressed_blocks of each length; `nsa_convert.nn.compression.packed_block_starts` places
    them).  Returns out (N, Hq, Dv) in q's dtype, differentiable like `nsa_attention`'s.  Reads the offsets
    on the host: not for graphs traced with torch.export.
    """
    params = SparsityParams(block_size, top_n, window, compress_block, compress_stride, scale)
    if q.dim() != 3:
        raise ValueError(f"q must have 3 dimensions (packed tokens first), got shape {tuple(q.shape)}")
    lengths = _document_lengths(cu_seqlens, q.shape[0], q.device)
    blocks = [0]
    for length in lengths:
        blocks.append(blocks[-1] + num_compressed_blocks(length, compress_block, compress_stride))
    _check_varlen(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, blocks[-1])
    cu_seqlens_cmp = torch.tensor(blocks, dtype=torch.int32, device=q.device)
    params = params.resolved(q.shape[-1])
    out, _, _ = _nsa_attention_varlen_op(
        q,
        k,
        v,
        k_cmp,
        v_cmp,
        gates,
        k_win,
        v_win,
        cu_seqlens.to(torch.int32),
        cu_seqlens_cmp,
        max(lengths),
        block_size,
        top_n,
        window,
        compress_block,
        compress_stride,
        float(params.scale),
        resolve_backend(backend, q.device),
    )
    return out


def _check_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    seq_lens: Tensor,
    k_win: Tensor | None,
    v_win: Tensor | None,
) -> None:
    _check_rank4(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, gates=gates, k_win=k_win, v_win=v_win)
    batch, n, num_q_heads, head_dim = q.shape
    if n < 1:
        raise ValueError("q must hold at least one new token")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    num_kv_heads, value_dim, cached = k.shape[2], v.shape[3], k.shape[1]
    _check_group(num_q_heads, num_kv_heads)
    _check_window_pair(k_win, v_win)
    expected: dict[str, tuple[int, ...]] = {
        "k": (batch, cached, num_kv_heads, head_dim),
        "v": (batch, cached, num_kv_heads, value_dim),
        "k_cmp": (batch, k_cmp.shape[1], num_kv_heads, head_dim),
        "v_cmp": (batch, k_cmp.shape[1], num_kv_heads, value_dim),
        "gates": (batch, n, num_q_heads, 3),
    }
    tensors = {"k": k, "v": v, "k_cmp": k_cmp, "v_cmp": v_cmp, "gates": gates}
    if k_win is not None and v_win is not None:
        expected["k_win"] = (batch, k_win.shape[1], num_kv_heads, head_dim)
        expected["v_win"] = (batch, k_win.shape[1], num_kv_heads, value_dim)
        tensors.update(k_win=k_win, v_win=v_win)
    _check_shapes(tensors, expected, f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    _check_like_q(q, tensors)
    if seq_lens.shape != (batch,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"seq_lens must be an int32/int64 tensor of shape ({batch},), got {seq_lens.dtype} "
            f"{tuple(seq_lens.shape)}"
        )
    if seq_lens.device != q.device:
        raise ValueError(f"seq_lens is on {seq_lens.device} but q is on {q.device}")


def nsa_decode_with_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    seq_lens: Tensor,
    *,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    block_size: int = 64,
    top_n: int = 16,
    window: int = 512,
    compress_block: int = 32,
    compress_stride: int = 16,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Like `nsa_decode`, also returning each branch's log-sum-exp (B, n, Hq, 3) and the selected blocks
    (B, n, Hkv, top_n), as `nsa_attention_with_stats` does for those rows."""
    params = SparsityParams(block_size, top_n, window, compress_block, compress_stride, scale)
    _check_decode(q, k, v, k_cmp, v_cmp, gates, seq_lens, k_win, v_win)
    params = params.resolved(q.shape[-1])
    return _nsa_decode_op(
        q,
        k,
        v,
        k_cmp,
        v_cmp,
        gates,
        seq_lens,
        k_win,
        v_win,
        block_size,
        top_n,
        window,
        compress_block,
        compress_stride,
        float(params.scale),
        resolve_backend(backend, q.device),
    )


def nsa_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    gates: Tensor,
    seq_lens: Tensor,
    *,
    k_win: Tensor | None = None,
    v_win: Tensor | None = None,
    block_size: int = 64,
    top_n: int = 16,
    window: int = 512,
    compress_block: int = 32,
    compress_stride: int = 16,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """NSA output of the n newest tokens of each sequence from its KV cache (no gradient: inference only).

    Equal to `nsa_attention` on the whole sequence at those positions.  seq_lens (B,) int: L_b, the tokens of
    sequence b including the n new ones; q (B, n, Hq, Dk) and gates (B, n, Hq, 3) are its tokens
    L_b − n … L_b − 1.  k (B, S, Hkv, Dk), v (B, S, Hkv, Dv): the cache feeding selection, each sequence
    right-aligned (row S − L_b + p is token p; earlier rows are left padding; S ≥ max L_b).  k_win/v_win,
    when given, feed the window, right-aligned too, holding at least the last w + n − 1 rows.
    k_cmp (B, Tcc, Hkv, Dk), v_cmp (B, Tcc, Hkv, Dv): each sequence's compressed blocks from index 0
    (Tcc ≥ spec.num_compressed_blocks(L_b); later entries are ignored).  Any strides: cache views need no
    copy.  Returns out (B, n, Hq, Dv) in q's dtype.
    """
    out, _, _ = nsa_decode_with_stats(
        q,
        k,
        v,
        k_cmp,
        v_cmp,
        gates,
        seq_lens,
        k_win=k_win,
        v_win=v_win,
        block_size=block_size,
        top_n=top_n,
        window=window,
        compress_block=compress_block,
        compress_stride=compress_stride,
        scale=scale,
        backend=backend,
    )
    return out
