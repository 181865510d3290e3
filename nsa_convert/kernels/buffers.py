"""Output buffers of the kernels, poisonable so that tests see every element a kernel fails to write."""

from __future__ import annotations

import torch

POISON = False
"""Tests set this to fill every buffer the kernels must write with NaN (or −7777 for indices) first."""


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty`, or a tensor of NaN (−7777 for integers) while POISON is set."""
    if not POISON:
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7777, dtype=dtype, device=device)
