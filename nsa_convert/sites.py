"""The conversion plan: one record per attention site, shared by the rewritten graph and the eager model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class AttentionSite:
    """What the passes learned about one attention call, and whether it becomes NSA.

    module: path of the owning attention module (e.g. "model.layers.3.self_attn").
    kind: "sdpa" or "eager" (matmul → softmax → matmul).
    query_proj / key_proj / value_proj: paths of the linear layers whose outputs become q, k and v;
        the input of query_proj is the hidden state x_t that feeds the NSA gates.
    convert: True when the site is rewritten into NSA; otherwise `reason` says why it stays dense.
    """

    module: str
    layer: int | None
    kind: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    hidden_size: int
    query_proj: str | None
    key_proj: str | None
    value_proj: str | None
    convert: bool
    reason: str | None = None

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionSite:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def converted(sites: list[AttentionSite]) -> list[AttentionSite]:
    return [site for site in sites if site.convert]
