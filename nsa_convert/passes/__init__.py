"""The compiler: FX passes over the exported graph, listed in the order they run.

FindAttention  → node.meta["nsa_site"]   every attention call (SDPA or eager)
AnalyzeSites   → node.meta["nsa_facts"]  owner, Hq/Hkv/G, head dims, scale, mask, projections
CheckSupport   → node.meta["nsa_plan"]   the verdict: convert, or stay dense with a reason
RewriteToNSA   → `<site>.nsa` call nodes  in place of the converted calls
"""

from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager
from transformers import PretrainedConfig

from nsa_convert.config import NSAConfig
from nsa_convert.nn.attention import NSAttention
from nsa_convert.passes.analyze_sites import AnalyzeSites
from nsa_convert.passes.check_support import CheckSupport, planned_sites
from nsa_convert.passes.find_attention import FindAttention
from nsa_convert.passes.rewrite_to_nsa import RetargetDevice, RewriteToNSA
from nsa_convert.sites import AttentionSite

__all__ = ["RetargetDevice", "plan_sites", "rewrite_sites"]


def plan_sites(
    graph_module: GraphModule, model_config: PretrainedConfig, config: NSAConfig
) -> list[AttentionSite]:
    """Run the analysis passes; returns one plan record per attention site, in graph order."""
    PassManager([FindAttention(), AnalyzeSites(model_config), CheckSupport(config)])(graph_module)
    return planned_sites(graph_module)


def rewrite_sites(graph_module: GraphModule, modules: dict[str, NSAttention]) -> GraphModule:
    """Rewrite an analysed graph in place: converted sites call their NSAttention module (keyed by site path)."""
    RewriteToNSA(modules)(graph_module)
    return graph_module
