"""What a conversion does to a model, from its config alone: sites, new parameters, costs, rewritten graph.

`inspect_model(path)` accepts a dense model directory or an already converted one (its `nsa` section
then gives the hyperparameters).  No weights are read.  `Inspection.to_dict()` is the `--json` schema
documented in README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule, Node

from nsa_convert.api import Plan, plan, read_nsa_section, rewritten_graph
from nsa_convert.config import NSAConfig
from nsa_convert.errors import ConfigError, UsageError
from nsa_convert.nn.install import build_site_module
from nsa_convert.sites import AttentionSite, converted
from nsa_convert.spec import num_compressed_blocks

SCHEMA = "nsa-convert.inspect/1"
DEFAULT_CONTEXT = 32768


@dataclass
class TokenCost:
    """Per generated token at a given context, summed over all attention sites of the model."""

    attention_flops: int = 0
    kv_cache_bytes: int = 0
    kv_bytes_read: int = 0

    def add(self, other: TokenCost) -> None:
        self.attention_flops += other.attention_flops
        self.kv_cache_bytes += other.kv_cache_bytes
        self.kv_bytes_read += other.kv_bytes_read


def dense_cost(site: AttentionSite, context: int, element_bytes: int) -> TokenCost:
    """One query attending to `context` keys: 2·Hq·T·(Dk + Dv) FLOPs; the cache holds Hkv·(Dk + Dv) per token."""
    width = site.head_dim + site.v_head_dim
    return TokenCost(
        attention_flops=2 * site.num_q_heads * context * width,
        kv_cache_bytes=site.num_kv_heads * width * element_bytes,
        kv_bytes_read=context * site.num_kv_heads * width * element_bytes,
    )


def nsa_cost(site: AttentionSite, config: NSAConfig, context: int, element_bytes: int) -> TokenCost:
    """The three branches' keys (compressed, selected, window), the gate, and φ amortised over d tokens.

    The cache keeps the raw keys/values (one set per branch with independent k/v) plus one compressed
    key/value every d tokens.
    """
    width = site.head_dim + site.v_head_dim
    keys = (
        num_compressed_blocks(context, config.compress_block, config.compress_stride)
        + min(context, config.top_n * config.block_size)
        + min(context, config.window)
    )
    hidden = config.compress_hidden or site.head_dim
    compress_flops = sum(
        2 * (config.compress_block * dim * hidden + hidden * dim) for dim in (site.head_dim, site.v_head_dim)
    )
    branches = 3 if config.branch_kv == "independent" else 1
    return TokenCost(
        attention_flops=2 * site.num_q_heads * keys * width
        + 2 * site.hidden_size * 3 * site.num_q_heads
        + site.num_kv_heads * compress_flops // config.compress_stride,
        kv_cache_bytes=site.num_kv_heads * width * element_bytes * branches
        + site.num_kv_heads * width * element_bytes // config.compress_stride,
        kv_bytes_read=keys * site.num_kv_heads * width * element_bytes,
    )


@dataclass
class NodeLine:
    """One graph node as a line of text, and whether the rewrite removed (before) or added (after) it."""

    name: str
    text: str
    changed: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "text": self.text, "changed": self.changed}


def _short(value: object) -> str:
    if isinstance(value, Node):
        return value.name
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _node_text(node: Node) -> str:
    target = str(node.target).removeprefix("aten.").removesuffix(".default")
    args = ", ".join([_short(a) for a in node.args] + [f"{k}={_short(v)}" for k, v in node.kwargs.items()])
    if len(args) > 72:
        args = args[:69] + "..."
    return f"{node.name} = {target}({args})"


def scope_nodes(graph_module: GraphModule, module_path: str) -> list[Node]:
    """The nodes computed inside `module_path` (by their nn_module_stack), in graph order."""
    return [
        node
        for node in graph_module.graph.nodes
        if node.op in ("call_function", "call_module")
        and any(path == module_path for path, _ in node.meta.get("nn_module_stack", {}).values())
    ]


@dataclass
class Inspection:
    model_dir: Path
    converted_dir: bool
    model_type: str
    config: NSAConfig
    context: int
    sites: list[AttentionSite]
    added_parameters: list[tuple[str, int, int]]
    dense: TokenCost
    nsa: TokenCost
    layer_site: AttentionSite
    before: list[NodeLine] = field(default_factory=list)
    after: list[NodeLine] = field(default_factory=list)
    onnx_path: Path | None = None

    def to_dict(self) -> dict:
        def ratio(name: str) -> float:
            nsa_value = getattr(self.nsa, name)
            return round(getattr(self.dense, name) / nsa_value, 3) if nsa_value else 0.0

        costs = ("attention_flops", "kv_cache_bytes", "kv_bytes_read")
        return {
            "schema": SCHEMA,
            "model_dir": str(self.model_dir),
            "converted": self.converted_dir,
            "model_type": self.model_type,
            "nsa": self.config.to_dict(),
            "context": self.context,
            "sites": [site.to_dict() for site in self.sites],
            "added_parameters": {
                "per_site": [{"module": m, "count": c, "bytes": b} for m, c, b in self.added_parameters],
                "total_count": sum(c for _, c, _ in self.added_parameters),
                "total_bytes": sum(b for _, _, b in self.added_parameters),
            },
            "cost_per_token": {
                "dense": {name: getattr(self.dense, name) for name in costs},
                "nsa": {name: getattr(self.nsa, name) for name in costs},
                "dense_over_nsa": {name: ratio(name) for name in costs},
            },
            "layer": {
                "index": self.layer_site.layer,
                "module": self.layer_site.module,
                "before": [line.to_dict() for line in self.before],
                "after": [line.to_dict() for line in self.after],
            },
            "onnx": None if self.onnx_path is None else str(self.onnx_path),
        }


def _element_bytes(plan_: Plan) -> int:
    dtype = getattr(plan_.model_config, "dtype", None) or getattr(plan_.model_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return torch.empty(0, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32).element_size()


def _new_element_bytes(config: NSAConfig, model_element_bytes: int) -> int:
    if config.dtype == "auto":
        return model_element_bytes
    return torch.empty(0, dtype=getattr(torch, config.dtype)).element_size()


def _pick_site(sites: list[AttentionSite], layer: int | None) -> AttentionSite:
    if layer is None:
        return converted(sites)[0]
    for site in sites:
        if site.layer == layer:
            return site
    layers = sorted({site.layer for site in sites if site.layer is not None})
    raise UsageError(f"--layer {layer}: no attention site in that layer (layers: {layers[0]}…{layers[-1]})")


def inspect_model(
    path: str | Path,
    config: NSAConfig | None = None,
    *,
    context: int = DEFAULT_CONTEXT,
    layer: int | None = None,
    onnx_path: Path | None = None,
    trust_remote_code: bool = False,
) -> Inspection:
    """Plan (and rewrite) the model at `path` from its config; a converted directory brings its own NSAConfig."""
    path = Path(path)
    if context < 1:
        raise UsageError(f"--context must be positive, got {context}")
    converted_dir = False
    try:
        config, _ = read_nsa_section(path)
        converted_dir = True
    except ConfigError:  # a dense model directory has no nsa section; plan() reports real problems
        config = config or NSAConfig()
    plan_ = plan(path, config, trust_remote_code=trust_remote_code)
    element_bytes = _element_bytes(plan_)
    dense, nsa = TokenCost(), TokenCost()
    added = []
    for site in plan_.sites:
        dense.add(dense_cost(site, context, element_bytes))
        if site.convert:
            nsa.add(nsa_cost(site, config, context, element_bytes))
            module = build_site_module(plan_.captured.model, site, config)
            count = sum(p.numel() for p in module.parameters())
            added.append((site.module, count, count * _new_element_bytes(config, element_bytes)))
        else:
            nsa.add(dense_cost(site, context, element_bytes))
    chosen = _pick_site(plan_.sites, layer)
    graph_module = plan_.captured.graph_module
    before_lines = [(node.name, _node_text(node)) for node in scope_nodes(graph_module, chosen.module)]
    rewritten = rewritten_graph(plan_)
    after_nodes = scope_nodes(rewritten, chosen.module)
    after_names = {node.name for node in after_nodes}
    before_names = {name for name, _ in before_lines}
    before = [NodeLine(name, text, name not in after_names) for name, text in before_lines]
    after = [NodeLine(node.name, _node_text(node), node.name not in before_names) for node in after_nodes]
    inspection = Inspection(
        model_dir=path,
        converted_dir=converted_dir,
        model_type=plan_.model_config.model_type,
        config=config,
        context=context,
        sites=plan_.sites,
        added_parameters=added,
        dense=dense,
        nsa=nsa,
        layer_site=chosen,
        before=before,
        after=after,
    )
    if onnx_path is not None:
        from nsa_convert.onnx_export import export_onnx

        vocab = getattr(plan_.model_config.get_text_config(), "vocab_size", 2)
        inspection.onnx_path = export_onnx(rewritten, onnx_path, vocab_size=vocab)
    return inspection
