"""The analysis passes on exported graphs: what they find, what they refuse, and why."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, Gemma2Config, GptOssConfig, LlamaConfig

import nsa_convert
from nsa_convert.capture import build_meta_model, capture, export_model
from nsa_convert.config import NSAConfig
from nsa_convert.errors import UnsupportedModelError
from nsa_convert.passes import plan_sites
from nsa_convert.passes.analyze_sites import MaskFacts, classify_mask
from tests.models import tiny_config


def test_sdpa_sites_report_gqa_shape_scale_and_projections():
    config = tiny_config("qwen2-tied-g7")
    sites = plan_sites(capture(config).graph_module, config, NSAConfig())
    assert [site.module for site in sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    site = sites[0]
    assert (site.kind, site.num_q_heads, site.num_kv_heads, site.group_size) == ("sdpa", 14, 2, 7)
    assert (site.head_dim, site.v_head_dim, site.hidden_size) == (8, 8, 64)
    assert site.scale == pytest.approx(8**-0.5)
    assert (site.query_proj, site.key_proj, site.value_proj) == tuple(
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv"
    )
    assert site.convert and site.reason is None


def test_eager_attention_is_found_with_its_scale():
    config = tiny_config("llama-g4", head_dim=16)
    graph = export_model(build_meta_model(config, "eager"), config.vocab_size)
    sites = plan_sites(graph, config, NSAConfig())
    assert len(sites) == 2 and all(site.kind == "eager" and site.convert for site in sites)
    assert sites[0].scale == pytest.approx(0.25)
    assert (sites[0].num_q_heads, sites[0].num_kv_heads) == (8, 2)


def test_soft_capping_is_refused():
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attn_logit_softcapping=50.0,
        sliding_window=16,
    )
    graph = export_model(build_meta_model(config, "eager"), config.vocab_size)
    reasons = [site.reason for site in plan_sites(graph, config, NSAConfig())]
    assert len(reasons) == 2 and all("soft-capping" in reason for reason in reasons)


def test_attention_sinks_are_refused():
    config = GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention", "full_attention"],
    )
    graph = export_model(build_meta_model(config, "eager"), config.vocab_size)
    reasons = [site.reason for site in plan_sites(graph, config, NSAConfig())]
    assert reasons and all("sinks" in reason for reason in reasons)


def test_bidirectional_model_is_refused(tmp_path):
    BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="not causal"):
        nsa_convert.plan(tmp_path)


def test_independent_branches_need_separate_projections():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    sites = plan_sites(capture(config).graph_module, config, NSAConfig(branch_kv="independent"))
    assert sites[0].convert


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        (torch.ones(9, 9, dtype=torch.bool).tril(), MaskFacts("causal")),
        (torch.ones(9, 9, dtype=torch.bool), MaskFacts("bidirectional")),
        (
            torch.ones(9, 9, dtype=torch.bool).tril() & torch.ones(9, 9, dtype=torch.bool).triu(-2),
            MaskFacts("sliding", 3),
        ),
        (torch.eye(9, dtype=torch.bool), MaskFacts("sliding", 1)),
        (torch.ones(9, 9, dtype=torch.bool).tril(-1), MaskFacts("other")),
    ],
)
def test_mask_classification(allowed, expected):
    assert classify_mask(allowed) == expected
