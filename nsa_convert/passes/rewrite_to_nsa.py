"""Pass: replace each converted attention call by a call to its NSAttention module."""

from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from nsa_convert.nn.attention import NSAttention
from nsa_convert.passes.analyze_sites import FACTS_KEY
from nsa_convert.passes.check_support import PLAN_KEY

REWRITTEN_KEY = "nsa_rewritten"


def _widen(graph: Graph, linear: Node, hidden: Node, target: str, kind: str) -> None:
    """Append the compressed and selected branches' projections to a dense k (or v) projection's output."""
    with graph.inserting_after(linear):
        cmp = graph.call_module(f"{target}.{kind}_proj_cmp", (hidden,))
    with graph.inserting_after(cmp):
        slc = graph.call_module(f"{target}.{kind}_proj_slc", (hidden,))
    with graph.inserting_after(slc):
        widened = graph.call_function(torch.ops.aten.cat.default, ([linear, cmp, slc], -1))
    for node in (cmp, slc, widened):
        node.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
    linear.replace_all_uses_with(widened, delete_user_cb=lambda user: user is not widened)


class RewriteToNSA(PassBase):
    """Adds `<site>.nsa` submodules and routes each converted site's q, k, v and hidden state through them.

    The replaced nodes (and whatever only they used, such as repeat_kv and masks) are removed; the
    new call nodes carry node.meta["nsa_rewritten"] = the site's plan record.
    """

    def __init__(self, modules: dict[str, NSAttention]):
        super().__init__()
        self.modules = modules

    def call(self, graph_module: GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for node in list(graph.nodes):
            site = node.meta.get(PLAN_KEY)
            if site is None or not site.convert:
                continue
            facts = node.meta[FACTS_KEY]
            target = f"{site.module}.nsa"
            module = self.modules[site.module]
            graph_module.add_submodule(target, module)
            if module.independent:
                _widen(graph, facts.key_linear, facts.hidden, target, "k")
                _widen(graph, facts.value_linear, facts.hidden, target, "v")
            with graph.inserting_before(node):
                call = graph.call_module(target, (facts.query, facts.key, facts.value, facts.hidden))
            call.meta[REWRITTEN_KEY] = site
            call.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            modified = True
        if modified:
            graph.eliminate_dead_code()
            graph_module.recompile()
        return PassResult(graph_module, modified)


class RetargetDevice(PassBase):
    """Make tensors the graph creates itself (aranges, masks) land on `device` instead of meta,
    in nested graphs (autocast or no-grad regions) too."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)

    def _retarget(self, value: object) -> object:
        return self.device if isinstance(value, torch.device) else value

    def call(self, graph_module: GraphModule) -> PassResult:
        modified = False
        for module in graph_module.modules():
            if not isinstance(module, GraphModule):
                continue
            changed = False
            for node in module.graph.nodes:
                args, kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), self._retarget)
                if (args, kwargs) != (node.args, node.kwargs):
                    node.args, node.kwargs = args, kwargs
                    changed = True
            if changed:
                module.recompile()
                modified = True
        return PassResult(graph_module, modified)
