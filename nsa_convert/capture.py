"""Build a model from its config on the meta device and capture its graph with torch.export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from nsa_convert.errors import ConfigError, UnsupportedModelError

EXAMPLE_SEQ_LEN = 16


@dataclass
class Captured:
    """A model built without weights, and its exported graph as a GraphModule (parameters as get_attr)."""

    config: PretrainedConfig
    model: nn.Module
    graph_module: torch.fx.GraphModule
    attn_implementation: str


def read_config(model_dir: Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """config.json → transformers config, with one clear error per way it can be wrong."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError("config.json not found", path.parent)
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"not valid JSON ({err})", path) from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError("no 'model_type' field: not a transformers model config", path)
    if raw.get("auto_map") and not trust_remote_code:
        raise ConfigError(
            "the model needs its own remote code (auto_map); pass --trust-remote-code to run it", path
        )
    try:
        return AutoConfig.from_pretrained(str(path.parent), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"transformers cannot read this config: {first}", path) from None


def build_meta_model(config: PretrainedConfig, attn_implementation: str, *, trust_remote_code: bool = False):
    """The causal-LM model of `config` with every parameter on the meta device (no memory, no weights)."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
            )
    except ValueError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"transformers has no causal language model for this config: {first}") from None
    return model.eval()


def choose_attn_implementation(config: PretrainedConfig, *, trust_remote_code: bool = False) -> str:
    """SDPA when the architecture offers it (the graph then shows one node per site), else eager."""
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return "sdpa"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def export_model(model: nn.Module, vocab_size: int) -> torch.fx.GraphModule:
    """torch.export (non-strict) with dynamic batch and sequence; returns the unlifted GraphModule.

    Dim.AUTO lets the model bound the sequence (e.g. by its position table) instead of failing.
    """
    input_ids = torch.randint(0, max(vocab_size, 2), (2, EXAMPLE_SEQ_LEN), device="meta")
    try:
        program = torch.export.export(
            model,
            (),
            {"input_ids": input_ids, "use_cache": False},
            dynamic_shapes={
                "input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},
                "use_cache": None,
            },
            strict=False,
        )
    except Exception as err:  # torch.export raises many types; the user needs the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(f"torch.export could not capture the model: {first}") from None
    return program.module()


def capture(config: PretrainedConfig, *, trust_remote_code: bool = False) -> Captured:
    """Meta-device model + exported graph, ready for the passes."""
    attn_implementation = choose_attn_implementation(config, trust_remote_code=trust_remote_code)
    model = build_meta_model(config, attn_implementation, trust_remote_code=trust_remote_code)
    vocab_size = getattr(config.get_text_config(), "vocab_size", 2)
    graph_module = export_model(model, vocab_size)
    return Captured(config, model, graph_module, attn_implementation)
