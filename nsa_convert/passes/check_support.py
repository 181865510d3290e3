"""Pass: decide, per site, whether NSA can take it; the verdicts form the conversion plan."""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from nsa_convert.config import NSAConfig
from nsa_convert.passes.analyze_sites import SiteFacts, linear_module_path, site_facts
from nsa_convert.sites import AttentionSite

PLAN_KEY = "nsa_plan"


def refusal(facts: SiteFacts, config: NSAConfig) -> str | None:
    """Why the site must stay dense, or None when NSA can take it."""
    match = facts.match
    if match.softcap:
        return "attention logit soft-capping (NSA's softmax has no cap)"
    if match.sinks:
        return "attention sinks (extra softmax logits NSA does not model)"
    if facts.mask.kind == "sliding":
        return f"already sliding-window attention (window {facts.mask.window})"
    if facts.layer_type not in (None, "full_attention"):
        return f"layer type '{facts.layer_type}' in config.json is not full attention"
    if facts.mask.kind == "bidirectional":
        return "not causal (bidirectional attention)"
    if facts.mask.kind == "other":
        return "the attention mask is neither causal nor sliding-window"
    if facts.mask.kind == "unknown":
        return "the attention mask could not be shown to be causal"
    if facts.query_linear is None or facts.key_linear is None or facts.value_linear is None:
        return "no linear projection found for the query, key or value"
    if facts.key_linear.args[0] is not facts.hidden or facts.value_linear.args[0] is not facts.hidden:
        return "cross-attention (keys and values do not come from the query's hidden state)"
    if facts.num_kv_heads < 1 or facts.num_q_heads % facts.num_kv_heads:
        return f"{facts.num_q_heads} query heads are not a multiple of {facts.num_kv_heads} KV heads"
    if (
        config.branch_kv == "independent"
        and len(
            {
                linear_module_path(facts.query_linear),
                linear_module_path(facts.key_linear),
                linear_module_path(facts.value_linear),
            }
        )
        < 3
    ):
        return "branch_kv='independent' needs separate k and v projections (this model fuses them)"
    return None


def to_site(facts: SiteFacts, config: NSAConfig) -> AttentionSite:
    reason = refusal(facts, config)
    return AttentionSite(
        module=facts.module,
        layer=facts.layer,
        kind=facts.match.kind,
        num_q_heads=facts.num_q_heads,
        num_kv_heads=facts.num_kv_heads,
        head_dim=facts.head_dim,
        v_head_dim=facts.v_head_dim,
        scale=facts.scale,
        hidden_size=facts.hidden_size,
        query_proj=linear_module_path(facts.query_linear),
        key_proj=linear_module_path(facts.key_linear),
        value_proj=linear_module_path(facts.value_linear),
        convert=reason is None,
        reason=reason,
    )


class CheckSupport(PassBase):
    """Sets node.meta["nsa_plan"] = AttentionSite (with its verdict) next to each SiteFacts."""

    def __init__(self, config: NSAConfig):
        super().__init__()
        self.config = config

    def call(self, graph_module: GraphModule) -> PassResult:
        for facts in site_facts(graph_module):
            facts.match.output.meta[PLAN_KEY] = to_site(facts, self.config)
        return PassResult(graph_module, False)


def planned_sites(graph_module: GraphModule) -> list[AttentionSite]:
    return [node.meta[PLAN_KEY] for node in graph_module.graph.nodes if PLAN_KEY in node.meta]
