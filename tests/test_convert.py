"""End to end: convert tiny checkpoints of real architectures, load them, compare with the dense model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import nsa_convert
from nsa_convert.api import nsa_modules, plan, rewritten_graph
from nsa_convert.config import NSAConfig
from tests.models import ARCHITECTURES, VOCAB, dense_model, make_checkpoint, relative_error

# T ≤ window and T ≤ top_n · block_size keep NSA equal to dense; LONG exceeds both.
SMALL = NSAConfig(window=64, block_size=16, top_n=4, compress_block=8, compress_stride=4)
SHORT, LONG = 48, 200


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    source = make_checkpoint(root / "dense", request.param)
    report = nsa_convert.convert(source, root / "nsa", SMALL)
    return source, root / "nsa", report


def test_every_site_is_converted(converted):
    _, out, report = converted
    assert report.sites and all(site.convert for site in report.sites)
    section = json.loads((out / "config.json").read_text())["nsa"]
    assert section["config"] == SMALL.to_dict()
    assert [site["module"] for site in section["sites"]] == [site.module for site in report.sites]


def test_original_tensors_are_unchanged(converted):
    source, out, _ = converted
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(source / "model.safetensors", framework="pt") as src:
        for name in src.keys():  # noqa: SIM118  (safe_open is not iterable)
            with safe_open(out / index[name], framework="pt") as dst:
                original, copied = src.get_tensor(name), dst.get_tensor(name)
                assert copied.dtype == original.dtype and torch.equal(copied, original), name


def test_logits_match_dense_within_window(converted):
    source, out, _ = converted
    model, dense = nsa_convert.load(out, dtype=torch.float32).eval(), dense_model(source)
    ids = torch.randint(0, VOCAB, (2, SHORT))
    with torch.no_grad():
        error = relative_error(model(ids, use_cache=False).logits, dense(ids, use_cache=False).logits)
    assert error <= 1e-3


def test_long_context_differs_and_trains(converted):
    source, out, _ = converted
    model, dense = nsa_convert.load(out, dtype=torch.float32).train(), dense_model(source)
    ids = torch.randint(0, VOCAB, (1, LONG))
    output = model(ids, labels=ids, use_cache=False)
    with torch.no_grad():
        reference = dense(ids, use_cache=False).logits
    assert torch.isfinite(output.logits).all()
    assert relative_error(output.logits.detach(), reference) > 1e-3
    output.loss.backward()
    new_params = {
        f"{path}.nsa.{name}": param
        for path, module in nsa_modules(model).items()
        for name, param in module.named_parameters()
    }
    assert new_params
    for name, param in new_params.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_rewritten_graph_computes_the_loaded_model(converted):
    source, out, _ = converted
    model = nsa_convert.load(out, dtype=torch.float32).eval()
    graph = rewritten_graph(plan(source, SMALL), model)
    called = {node.target for node in graph.graph.nodes if node.op == "call_module"}
    assert {f"{path}.nsa" for path in nsa_modules(model)} <= called
    assert not [n for n in graph.graph.nodes if "scaled_dot_product" in str(n.target)]
    ids = torch.randint(0, VOCAB, (2, LONG))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        actual = graph(input_ids=ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-5


def test_independent_branch_kv(tmp_path):
    source = make_checkpoint(tmp_path / "dense", "llama-g4", attention_bias=True)
    config = NSAConfig(**(SMALL.to_dict() | {"branch_kv": "independent"}))
    nsa_convert.convert(source, tmp_path / "nsa", config)
    model, dense = nsa_convert.load(tmp_path / "nsa", dtype=torch.float32), dense_model(source)
    module = next(iter(nsa_modules(model).values()))
    assert torch.equal(module.k_proj_slc.weight, model.model.layers[0].self_attn.k_proj.weight)
    ids = torch.randint(0, VOCAB, (1, SHORT))
    with torch.no_grad():
        assert relative_error(model(ids, use_cache=False).logits, dense(ids, use_cache=False).logits) <= 1e-3
    model(
        torch.randint(0, VOCAB, (1, LONG)), labels=ids.new_zeros(1, LONG).random_(VOCAB), use_cache=False
    ).loss.backward()
    assert module.k_proj_cmp.weight.grad.abs().sum() > 0 and module.v_proj_slc.weight.grad.abs().sum() > 0


def test_sharded_source_and_output(tmp_path):
    source = make_checkpoint(tmp_path / "dense", "llama-g4", max_shard_size="60KB")
    assert len(list(source.glob("*.safetensors"))) > 1
    report = nsa_convert.convert(source, tmp_path / "nsa", SMALL, max_shard_bytes=80_000)
    assert len(report.shards) > 1
    model, dense = nsa_convert.load(tmp_path / "nsa", dtype=torch.float32), dense_model(source)
    ids = torch.randint(0, VOCAB, (1, SHORT))
    with torch.no_grad():
        assert relative_error(model(ids, use_cache=False).logits, dense(ids, use_cache=False).logits) <= 1e-3


def test_sliding_window_layers_stay_dense(tmp_path):
    source = make_checkpoint(
        tmp_path / "dense",
        "qwen2-tied-g7",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=24,
        max_window_layers=1,
    )
    report = nsa_convert.convert(source, tmp_path / "nsa", SMALL)
    verdicts = [(site.layer, site.convert) for site in report.sites]
    assert verdicts == [(0, True), (1, False), (2, False)]
    assert "sliding-window" in report.sites[1].reason
    model, dense = nsa_convert.load(tmp_path / "nsa", dtype=torch.float32), dense_model(source)
    ids = torch.randint(0, VOCAB, (1, SHORT))
    with torch.no_grad():
        assert relative_error(model(ids, use_cache=False).logits, dense(ids, use_cache=False).logits) <= 1e-3


def test_module_tree_is_the_original_plus_nsa_children(converted):
    source, out, _ = converted
    loaded = {name for name, _ in nsa_convert.load(out).named_modules()}
    original = {name for name, _ in dense_model(source).named_modules()}
    assert original <= loaded
    assert all(".nsa" in name for name in loaded - original)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    source = make_checkpoint(tmp_path / "dense", "llama-g4")
    nsa_convert.convert(source, tmp_path / "nsa", SMALL)
    ids = torch.randint(0, VOCAB, (1, LONG))
    grads = []
    for checkpointing in (False, True):
        model = nsa_convert.load(tmp_path / "nsa", dtype=torch.float32).train()
        if checkpointing:
            nsa_convert.enable_checkpointing(model)
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if ".nsa." in name})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
