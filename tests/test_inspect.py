"""`nsa-convert inspect`: facts from the config alone, checked against independent arithmetic and the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from safetensors import safe_open

import nsa_convert
from nsa_convert.config import NSAConfig
from tests.models import make_checkpoint

SMALL = [
    "--window",
    "64",
    "--block-size",
    "16",
    "--top-n",
    "4",
    "--compress-block",
    "8",
    "--compress-stride",
    "4",
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsa_convert", "inspect", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("inspect") / "dense", "llama-g4")


def test_json_facts_for_a_dense_directory(dense_dir):
    result = run(str(dense_dir), "--json", "--context", "65536")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == "nsa-convert.inspect/1" and not data["converted"]
    assert [site["convert"] for site in data["sites"]] == [True, True]
    # Paper defaults at 64k: each query reads (64k − 32)/16 + 1 compressed + 16·64 selected + 512 window keys.
    keys = (65536 - 32) // 16 + 1 + 16 * 64 + 512
    assert data["cost_per_token"]["dense_over_nsa"]["kv_bytes_read"] == pytest.approx(65536 / keys, rel=1e-3)
    dense_flops = 2 * 2 * 8 * 65536 * (8 + 8)  # layers · 2 · Hq · T · (Dk + Dv)
    assert data["cost_per_token"]["dense"]["attention_flops"] == dense_flops
    layer = data["layer"]
    assert any(line["changed"] and "scaled_dot_product_attention" in line["text"] for line in layer["before"])
    assert [line["text"] for line in layer["after"] if line["changed"]] == [
        line["text"] for line in layer["after"] if "self_attn.nsa(" in line["text"]
    ]


def test_converted_directory_reports_its_own_config_and_parameter_count(dense_dir, tmp_path):
    config = NSAConfig(window=64, block_size=16, top_n=4, compress_block=8, compress_stride=4)
    out = tmp_path / "nsa"
    nsa_convert.convert(dense_dir, out, config)
    result = run(str(out), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["converted"] and data["nsa"] == config.to_dict()
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    stored = 0
    for name, shard in weight_map.items():
        if ".nsa." in name:
            with safe_open(out / shard, framework="pt") as f:
                stored += _numel(f.get_slice(name).get_shape())
    assert data["added_parameters"]["total_count"] == stored


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def test_onnx_export_has_the_nsa_node_with_its_hyperparameters(dense_dir, tmp_path):
    path = tmp_path / "model.onnx"
    result = run(str(dense_dir), "--onnx", str(path), *SMALL)
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    nodes = [node for node in model.graph.node if node.domain == "nsa_convert"]
    assert len(nodes) == 2 and all(node.op_type == "NSAttention" for node in nodes)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes == {
        "block_size": 16,
        "top_n": 4,
        "window": 64,
        "compress_block": 8,
        "compress_stride": 4,
        "scale": pytest.approx(8**-0.5),
    }


def test_rich_output_and_bad_layer(dense_dir):
    result = run(str(dense_dir), "--layer", "1")
    assert result.returncode == 0, result.stderr
    assert "model.layers.1.self_attn: before" in result.stderr and "self_attn.nsa(" in result.stderr
    bad = run(str(dense_dir), "--layer", "7")
    assert bad.returncode == 2 and "--layer 7" in bad.stderr and "Traceback" not in bad.stderr
