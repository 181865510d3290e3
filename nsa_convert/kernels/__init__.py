"""Triton kernels for NSA: the backend behind `nsa_attention(..., backend="triton")`.

Batched entry points (fixed interface of the custom ops): `nsa_forward`, `nsa_backward`, `select_blocks`.
Packed variable-length entry points: `nsa_forward_varlen`, `nsa_backward_varlen`, `select_blocks_varlen`
(cu_seqlens int32 [S + 1]; compressed keys packed per sequence, see `compressed_cu_seqlens`).
On CPU tensors the same kernels run under TRITON_INTERPRET=1.
"""

from nsa_convert.kernels.nsa import (
    compressed_cu_seqlens,
    nsa_backward,
    nsa_backward_varlen,
    nsa_forward,
    nsa_forward_varlen,
    select_blocks,
    select_blocks_varlen,
)

__all__ = [
    "compressed_cu_seqlens",
    "nsa_backward",
    "nsa_backward_varlen",
    "nsa_forward",
    "nsa_forward_varlen",
    "select_blocks",
    "select_blocks_varlen",
]
