"""What the launch heuristics ask of the device, with fixed stand-ins under the CPU interpreter."""

from __future__ import annotations

import torch


def multiprocessors(device: torch.device, stand_in: int) -> int:
    """The GPU's multiprocessor count; `stand_in` on the CPU (the interpreter's grids stay small)."""
    if device.type != "cuda":
        return stand_in
    return torch.cuda.get_device_properties(device).multi_processor_count
