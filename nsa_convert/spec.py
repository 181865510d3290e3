"""NSA geometry shared by every implementation (reference, Triton kernels, decode).

`../shared/NSA_SPEC.md` is the source of truth; this module turns its index arithmetic into
functions so that no implementation re-derives it.  All indices are 0-based.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SparsityParams:
    """Hyperparameters of one NSA attention call (the spec's l, d, l', n, w and the softmax scale).

    `scale=None` means Dk ** -0.5 and is resolved by `resolved(head_dim)`.
    """

    block_size: int = 64
    top_n: int = 16
    window: int = 512
    compress_block: int = 32
    compress_stride: int = 16
    scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "top_n", "window", "compress_block", "compress_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.top_n < 3:
            raise ValueError(
                f"top_n must be at least 3 (the initial, previous and current blocks are forced), got {self.top_n}"
            )
        if self.compress_block % self.compress_stride:
            raise ValueError(
                f"compress_stride ({self.compress_stride}) must divide compress_block ({self.compress_block})"
            )
        if self.block_size % self.compress_stride:
            raise ValueError(
                f"compress_stride ({self.compress_stride}) must divide block_size ({self.block_size})"
            )
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale!r}")

    def resolved(self, head_dim: int) -> SparsityParams:
        """The same parameters with the default scale made explicit for keys of width `head_dim`."""
        if self.scale is not None:
            return self
        return SparsityParams(
            self.block_size,
            self.top_n,
            self.window,
            self.compress_block,
            self.compress_stride,
            head_dim**-0.5,
        )


def num_compressed_blocks(seq_len: int, compress_block: int, compress_stride: int) -> int:
    """Tc: compressed block i covers tokens [i·d, i·d + l − 1]; none exist while T < l."""
    if seq_len < compress_block:
        return 0
    return (seq_len - compress_block) // compress_stride + 1


def num_visible_compressed(t: int, compress_block: int, compress_stride: int) -> int:
    """How many compressed blocks query t sees: those with i·d + l − 1 ≤ t (a prefix 0 … count − 1)."""
    return num_compressed_blocks(t + 1, compress_block, compress_stride)


def num_selection_blocks(seq_len: int, block_size: int) -> int:
    """Number of selection blocks of size l' needed to cover `seq_len` tokens."""
    return -(-seq_len // block_size)


def window_start(t: int, window: int) -> int:
    """First key of query t's sliding window: the w most recent keys, t included."""
    return max(0, t - window + 1)
