"""NSAConfig: every hyperparameter of a conversion, validated once, serialised into config.json."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from nsa_convert.spec import SparsityParams

BRANCH_KV_MODES = ("shared", "independent")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: str | int) -> int:
    """'5GB', '500MiB', '1000000' or 1000000 → bytes (ValueError when it is not a positive size)."""
    if isinstance(value, int):
        size = value
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if not found or found.group(2).upper() not in SIZE_UNITS:
            raise ValueError(f"cannot read size '{value}' (use e.g. 5GB or 500MiB)")
        size = int(float(found.group(1)) * SIZE_UNITS[found.group(2).upper()])
    if size < 1:
        raise ValueError(f"size {value!r} must be positive")
    return size


@dataclass(frozen=True)
class NSAConfig:
    """What a conversion builds.

    block_size, top_n, window, compress_block, compress_stride: the spec's l', n, w, l and d.
    branch_kv: "shared" feeds the dense k/v to every branch; "independent" adds per-branch k/v
        projections for the compressed and selected branches (copies of the dense ones; the dense
        projection keeps feeding the window).
    compress_hidden: width of φ's residual MLP (None: the head dimension).
    gate_cmp_logit: initial logit of the compression gate. The selection and window gates start at 0.5
        each, so for T ≤ min(w, n·l') their mix is the dense attention exactly; the compression gate
        starts at sigmoid(gate_cmp_logit), small enough to keep the dense model's logits.
    dtype: dtype of the new NSA tensors ("auto": that of the source's attention projections).
    seed: seed of the random parts of the initialisation.
    """

    block_size: int = 64
    top_n: int = 16
    window: int = 512
    compress_block: int = 32
    compress_stride: int = 16
    branch_kv: str = "shared"
    compress_hidden: int | None = None
    gate_cmp_logit: float = -10.0
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        self.sparsity()
        if self.branch_kv not in BRANCH_KV_MODES:
            raise ValueError(f"branch_kv must be one of {', '.join(BRANCH_KV_MODES)}, got {self.branch_kv!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compress_hidden is not None and self.compress_hidden < 1:
            raise ValueError(f"compress_hidden must be a positive integer, got {self.compress_hidden!r}")

    def sparsity(self, scale: float | None = None) -> SparsityParams:
        """The op-level parameters (raises ValueError on an inconsistent geometry)."""
        return SparsityParams(
            block_size=self.block_size,
            top_n=self.top_n,
            window=self.window,
            compress_block=self.compress_block,
            compress_stride=self.compress_stride,
            scale=scale,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NSAConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})
