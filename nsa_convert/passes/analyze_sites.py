"""Pass: learn what each marked attention call is: owner, GQA shape, projections, scale, mask."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from transformers import PretrainedConfig

from nsa_convert.passes.find_attention import SiteMatch, site_matches

aten = torch.ops.aten
FACTS_KEY = "nsa_facts"
LINEAR_TARGETS = {aten.linear.default}
MAX_PROBE_LEN = 8192
MIN_PROBE_LEN = 64


@dataclass
class MaskFacts:
    """kind: "causal", "sliding" (with window), "bidirectional", "other" or "unknown"."""

    kind: str
    window: int | None = None


@dataclass
class SiteFacts:
    """Everything the support check and the rewrite need about one site."""

    match: SiteMatch
    module: str
    module_class: str
    layer: int | None
    query: Node
    key: Node
    value: Node
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    query_linear: Node | None
    key_linear: Node | None
    value_linear: Node | None
    mask: MaskFacts
    layer_type: str | None

    @property
    def hidden(self) -> Node | None:
        return None if self.query_linear is None else self.query_linear.args[0]

    @property
    def hidden_size(self) -> int:
        return 0 if self.hidden is None else int(self.hidden.meta["val"].shape[-1])


def owner_module(node: Node) -> tuple[str, str]:
    """The innermost module on the node's nn_module_stack whose class is an attention class (else the innermost)."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if not stack:
        return "", ""
    for path, cls in reversed(stack):
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        if "attention" in name.rsplit(".", 1)[-1].lower():
            return path, name
    path, cls = stack[-1]
    return path, cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))


def layer_index(path: str) -> int | None:
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(found.group(1)) if found else None


def _is_full_slice(node: object) -> bool:
    """x[..., 0:∞] — what indexing with `:` or `None` leaves in a graph with symbolic shapes."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target == aten.slice.Tensor):
        return False
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1


def _skip_full_slices(node: Node) -> Node:
    while _is_full_slice(node):
        node = node.args[0]
    return node


def unrepeat_kv(node: Node) -> Node:
    """Undo transformers' repeat_kv (unsqueeze → expand → reshape) to reach the tensor with Hkv heads."""
    if not (node.op == "call_function" and node.target in (aten.reshape.default, aten.view.default)):
        return node
    expand = _skip_full_slices(node.args[0])
    if not (isinstance(expand, Node) and expand.target == aten.expand.default):
        return node
    unsqueeze = _skip_full_slices(expand.args[0])
    if isinstance(unsqueeze, Node) and unsqueeze.target == aten.unsqueeze.default and unsqueeze.args[1] == 2:
        return _skip_full_slices(unsqueeze.args[0])
    return node


def find_projection(node: Node, max_depth: int = 64) -> Node | None:
    """The nearest linear node upstream of `node` whose weight is a parameter (breadth-first)."""
    queue, seen = deque([(node, 0)]), {node}
    while queue:
        current, depth = queue.popleft()
        if current.op == "call_function" and current.target in LINEAR_TARGETS:
            weight = current.args[1]
            if isinstance(weight, Node) and weight.op == "get_attr":
                return current
        if depth == max_depth:
            continue
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append((parent, depth + 1))
    return None


def linear_module_path(linear: Node | None) -> str | None:
    return None if linear is None else str(linear.args[1].target).rsplit(".", 1)[0]


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def evaluate_mask(
    graph_module: GraphModule, mask: Node, seq_len: int, vocab_size: int
) -> torch.Tensor | None:
    """Run the subgraph that builds `mask` on a concrete input of `seq_len` tokens, on the CPU.

    Returns None when the mask depends on anything but the input ids (parameters, other inputs).
    """
    needed = _ancestors(mask)
    if any(node.op in ("get_attr", "call_module") for node in needed):
        return None
    graph, env = Graph(), {}
    inputs = []
    for node in graph_module.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            if node.name != "input_ids":
                return None
            inputs.append(torch.randint(0, max(vocab_size, 2), (1, seq_len)))
        copy = graph.node_copy(node, lambda n: env[n])
        if copy.kwargs.get("device") is not None:
            copy.kwargs = {**copy.kwargs, "device": torch.device("cpu")}
        env[node] = copy
    graph.output(env[mask])
    with torch.no_grad():
        return GraphModule(torch.nn.Module(), graph)(*inputs)


def classify_mask(allowed: torch.Tensor) -> MaskFacts:
    """allowed: [P, P] booleans (query × key) → causal, sliding window, bidirectional or other."""
    size = allowed.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    if torch.equal(allowed, causal):
        return MaskFacts("causal")
    if bool(allowed.all()):
        return MaskFacts("bidirectional")
    window = int(allowed[-1].sum())
    if torch.equal(allowed, causal & torch.ones_like(causal).triu(-(window - 1))):
        return MaskFacts("sliding", window)
    return MaskFacts("other")


def analyze_mask(graph_module: GraphModule, match: SiteMatch, vocab_size: int) -> MaskFacts:
    if match.mask is None:
        return MaskFacts("causal" if match.is_causal else "bidirectional")
    constants = [
        abs(arg)
        for node in _ancestors(match.mask)
        for arg in (*node.args, *node.kwargs.values())
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) <= MAX_PROBE_LEN
    ]
    probe = max(MIN_PROBE_LEN, min(MAX_PROBE_LEN, max(constants, default=0) + 33))
    values = evaluate_mask(graph_module, match.mask, probe, vocab_size)
    if values is None:
        return MaskFacts("unknown")
    allowed = values if values.dtype == torch.bool else values == 0
    return classify_mask(allowed.reshape(-1, probe, probe)[0])


def _shape(node: Node) -> tuple[int, ...]:
    return tuple(int(s) if isinstance(s, int) else -1 for s in node.meta["val"].shape)


def analyze(graph_module: GraphModule, match: SiteMatch, config: PretrainedConfig) -> SiteFacts:
    module, module_class = owner_module(match.output)
    layer = layer_index(module)
    key = match.key if match.enable_gqa else unrepeat_kv(match.key)
    value = match.value if match.enable_gqa else unrepeat_kv(match.value)
    q_shape, k_shape, v_shape = _shape(match.query), _shape(key), _shape(value)
    text_config = config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None)
    return SiteFacts(
        match=match,
        module=module,
        module_class=module_class,
        layer=layer,
        query=match.query,
        key=key,
        value=value,
        num_q_heads=q_shape[1],
        num_kv_heads=k_shape[1],
        head_dim=q_shape[-1],
        v_head_dim=v_shape[-1],
        scale=float(match.scale) if match.scale is not None else q_shape[-1] ** -0.5,
        query_linear=find_projection(match.query),
        key_linear=find_projection(key),
        value_linear=find_projection(value),
        mask=analyze_mask(graph_module, match, getattr(text_config, "vocab_size", 2)),
        layer_type=layer_types[layer]
        if layer_types and layer is not None and layer < len(layer_types)
        else None,
    )


class AnalyzeSites(PassBase):
    """Sets node.meta["nsa_facts"] = SiteFacts next to each SiteMatch."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config

    def call(self, graph_module: GraphModule) -> PassResult:
        for match in site_matches(graph_module):
            match.output.meta[FACTS_KEY] = analyze(graph_module, match, self.config)
        return PassResult(graph_module, False)


def site_facts(graph_module: GraphModule) -> list[SiteFacts]:
    return [node.meta[FACTS_KEY] for node in graph_module.graph.nodes if FACTS_KEY in node.meta]
