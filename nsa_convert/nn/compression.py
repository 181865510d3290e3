"""φ_K / φ_V: the learnable map from a compressed block of l tokens to one key or value."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def gather_blocks(x: torch.Tensor, compress_block: int, compress_stride: int) -> torch.Tensor:
    """Blocks of l consecutive tokens every d tokens.

    x: [B, T, H, D] → [B, Tc, H, l, D] with Tc = spec.num_compressed_blocks(T, l, d) (0 while T < l).
    Written without a branch on T so that it traces with a symbolic sequence length.
    """
    seq_len = x.shape[1]
    num_blocks = torch.sym_max(seq_len - compress_block + compress_stride, 0) // compress_stride
    starts = torch.arange(num_blocks, device=x.device) * compress_stride
    index = starts[:, None] + torch.arange(compress_block, device=x.device)[None, :]
    return x[:, index].permute(0, 1, 3, 2, 4)


def packed_block_starts(cu_seqlens: torch.Tensor, compress_block: int, compress_stride: int) -> torch.Tensor:
    """First token of every compressed block of packed documents, document by document.

    cu_seqlens (S + 1,) int: document offsets in the packed tokens.  Blocks never cross a document end,
    so each document is compressed as if it were alone; its blocks come out contiguous, in order.
    """
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    per_doc = torch.where(lengths >= compress_block, (lengths - compress_block) // compress_stride + 1, 0)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), per_doc)
    first_block = torch.cumsum(per_doc, 0) - per_doc
    local = torch.arange(doc.shape[0], device=cu.device) - first_block[doc]
    return cu[doc] + local * compress_stride


class BlockCompressor(nn.Module):
    """φ(block) = mean(block + P) + fc2(act(fc1(flatten(block + P)))), shared by a layer's KV heads.

    P is the intra-block position encoding.  The initialisation makes φ compute exactly the block
    mean (P = 0, and the residual MLP's output cancels: fc1.weight = 0 so fc1 sees only its bias,
    and fc2.bias = −fc2(act(fc1.bias))) while every parameter still receives a gradient:
    a zero-initialised last layer would leave fc1 without one.
    """

    def __init__(self, head_dim: int, compress_block: int, compress_stride: int, hidden: int | None = None):
        super().__init__()
        self.compress_block = compress_block
        self.compress_stride = compress_stride
        hidden = hidden or head_dim
        self.pos = nn.Parameter(torch.empty(compress_block, head_dim))
        self.fc1 = nn.Linear(compress_block * head_dim, hidden)
        self.fc2 = nn.Linear(hidden, head_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Block-mean initialisation (see the class docstring)."""
        self.pos.zero_()
        self.fc1.weight.zero_()
        self.fc1.bias.normal_(0.0, 1.0)
        self.fc2.weight.normal_(0.0, 0.02)
        self.fc2.bias.copy_(-F.linear(F.silu(self.fc1.bias), self.fc2.weight))

    def weights(self) -> tuple[torch.Tensor, ...]:
        """(pos, fc1 weight, fc1 bias, fc2 weight, fc2 bias): what `kernels.compress` computes φ from."""
        return self.pos, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D] → [B, Tc, H, D]."""
        return self._compress(gather_blocks(x, self.compress_block, self.compress_stride))

    def packed(self, x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Packed tokens x [N, H, D] and block starts (packed_block_starts) → packed blocks [Nc, H, D]."""
        index = starts[:, None] + torch.arange(self.compress_block, device=x.device)[None, :]
        return self._compress(x[index].transpose(1, 2))

    def _compress(self, blocks: torch.Tensor) -> torch.Tensor:
        """[..., H, l, D] blocks → [..., H, D]."""
        blocks = blocks + self.pos.to(blocks.dtype)
        residual = self.fc2(F.silu(self.fc1(blocks.flatten(-2))))
        return blocks.mean(dim=-2) + residual
