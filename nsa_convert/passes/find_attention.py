"""Pass: mark every attention call in the graph, SDPA nodes and eager matmul → softmax → matmul chains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

aten = torch.ops.aten

SDPA_TARGETS = {aten.scaled_dot_product_attention.default}
SOFTMAX_TARGETS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_TARGETS = {aten.matmul.default, aten.bmm.default}
# Ops between softmax and the value matmul, or that only cast/copy along the score path.
PASSTHROUGH_TARGETS = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.type_as.default,
}
SITE_KEY = "nsa_site"


@dataclass
class SiteMatch:
    """The nodes of one attention call.  query/key/value are the tensors attention saw ([B, H, T, D]),
    key and value possibly repeated to Hq heads; output is the node whose uses the rewrite replaces."""

    kind: str
    output: Node
    query: Node
    key: Node
    value: Node
    mask: Node | None
    is_causal: bool
    scale: float | None
    enable_gqa: bool = False
    softcap: bool = False
    sinks: bool = False


def _is_call(node: object, targets: set) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def match_sdpa(node: Node) -> SiteMatch:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return SiteMatch(
        kind="sdpa",
        output=node,
        query=bound["query"],
        key=bound["key"],
        value=bound["value"],
        mask=bound.get("attn_mask"),
        is_causal=bool(bound.get("is_causal", False)),
        scale=bound.get("scale"),
        enable_gqa=bool(bound.get("enable_gqa", False)),
    )


def _only_data_user(node: Node) -> Node | None:
    """The single user of `node` that computes with it (metadata assertions aside), if there is one."""
    users = [user for user in node.users if user.target != aten._assert_tensor_metadata.default]
    return users[0] if len(users) == 1 else None


def _skip_passthrough_up(node: Node) -> Node:
    while _is_call(node, PASSTHROUGH_TARGETS):
        node = node.args[0]
    return node


def _skip_max_subtraction(node: Node) -> Node:
    """x − max(x) (a hand-written softmax stabiliser) → x."""
    if not _is_call(node, {aten.sub.Tensor}):
        return node
    x, shift = node.args
    source = shift.args[0] if isinstance(shift, Node) and shift.op == "call_function" and shift.args else None
    if (
        isinstance(source, Node)
        and source.target in (aten.max.dim, aten.amax.default)
        and source.args[0] is x
    ):
        return _skip_passthrough_up(x)
    return node


def _scalar_operand(node: Node) -> tuple[Node, float] | None:
    """For x * c or x / c with a Python number c: (x, the factor applied to x)."""
    if not isinstance(node, Node) or node.op != "call_function" or len(node.args) != 2:
        return None
    x, c = node.args
    if not isinstance(x, Node) or not isinstance(c, (int, float)):
        return None
    if node.target in (aten.mul.Tensor, aten.mul.Scalar):
        return x, float(c)
    if node.target in (aten.div.Tensor, aten.div.Scalar):
        return x, 1.0 / float(c)
    return None


def match_eager(softmax: Node) -> SiteMatch | None:
    """Walk up from softmax through sinks, mask, soft-capping and scale to matmul(q, kᵀ), and down to matmul(p, v)."""
    logits = _skip_max_subtraction(_skip_passthrough_up(softmax.args[0]))
    sinks = False
    if _is_call(logits, {aten.cat.default}) and len(logits.args[0]) == 2:
        sinks, logits = True, _skip_passthrough_up(logits.args[0][0])
    mask = None
    if _is_call(logits, {aten.add.Tensor}) and all(isinstance(a, Node) for a in logits.args):
        logits, mask = logits.args
        logits = _skip_passthrough_up(logits)
    softcap = False
    scaled = _scalar_operand(logits)
    if scaled and _is_call(scaled[0], {aten.tanh.default}):
        softcap = True
        capped = _skip_passthrough_up(scaled[0].args[0])
        divided = _scalar_operand(capped)
        logits = _skip_passthrough_up(divided[0]) if divided else capped
        scaled = _scalar_operand(logits)
    scale = None
    if scaled:
        logits, scale = _skip_passthrough_up(scaled[0]), scaled[1]
    if not _is_call(logits, MATMUL_TARGETS):
        return None
    query, key_t = logits.args
    if not _is_call(key_t, {aten.transpose.int}):
        return None
    out = _only_data_user(softmax)
    while out is not None and (_is_call(out, PASSTHROUGH_TARGETS) or _is_call(out, {aten.slice.Tensor})):
        out = _only_data_user(out)
    if not _is_call(out, MATMUL_TARGETS):
        return None
    q_scaled = _scalar_operand(query)
    if scale is None and q_scaled:
        query, scale = q_scaled
    return SiteMatch(
        kind="eager",
        output=out,
        query=query,
        key=key_t.args[0],
        value=out.args[1],
        mask=mask,
        is_causal=False,
        scale=1.0 if scale is None else scale,
        softcap=softcap,
        sinks=sinks,
    )


class FindAttention(PassBase):
    """Sets node.meta["nsa_site"] = SiteMatch on each attention call's output node."""

    def call(self, graph_module: GraphModule) -> PassResult:
        for node in list(graph_module.graph.nodes):
            match = None
            if _is_call(node, SDPA_TARGETS):
                match = match_sdpa(node)
            elif _is_call(node, SOFTMAX_TARGETS):
                match = match_eager(node)
            if match is not None:
                match.output.meta[SITE_KEY] = match
        return PassResult(graph_module, False)


def site_matches(graph_module: GraphModule) -> list[SiteMatch]:
    return [node.meta[SITE_KEY] for node in graph_module.graph.nodes if SITE_KEY in node.meta]
