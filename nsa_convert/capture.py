"""Build a model from its config on the meta device and capture its graph with torch.export."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from nsa_convert.errors import ConfigError, UnsupportedModelError, one_line

EXAMPLE_SEQ_LEN = 16
# torch.export keeps process-wide tracing state: one capture at a time, whatever the thread.
_EXPORT_LOCK = threading.Lock()


@dataclass
class Captured:
    """A model built without weights, and its exported graph as a GraphModule (parameters as get_attr)."""

    config: PretrainedConfig
    model: nn.Module
    graph_module: torch.fx.GraphModule
    attn_implementation: str


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' warnings (e.g. about using an encoder as a decoder) off the user's terminal."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_config(model_dir: Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """config.json → transformers config, with one clear error per way it can be wrong."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError("config.json not found", path.parent)
    try:
        raw = json.loads(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror or err}", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"not valid JSON ({one_line(err)})", path) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"holds a JSON {type(raw).__name__}, not an object: not a model config", path)
    if "model_type" not in raw:
        raise ConfigError("no 'model_type' field: not a transformers model config", path)
    model_type = raw["model_type"]
    if not isinstance(model_type, str):
        raise ConfigError(f"'model_type' is {model_type!r}, not a string", path)
    if raw.get("auto_map"):
        if not trust_remote_code:
            raise ConfigError(
                "the model needs its own code (auto_map); pass --trust-remote-code if you trust its source",
                path,
            )
    elif model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"model_type '{model_type}' is not an architecture transformers {transformers.__version__} "
            "knows (a newer transformers may)",
            path,
        )
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(path.parent), trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers validates fields with many exception types
        raise ConfigError(f"transformers cannot read this config: {one_line(err)}", path) from None


def has_causal_lm(config: PretrainedConfig, *, trust_remote_code: bool = False) -> bool:
    """Whether transformers (or, trusted, the model's own code) has a causal-LM class for `config`."""
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    return type(config) in AutoModelForCausalLM._model_mapping


def build_meta_model(config: PretrainedConfig, attn_implementation: str, *, trust_remote_code: bool = False):
    """The causal-LM model of `config` with every parameter on the meta device (no memory, no weights)."""
    if not has_causal_lm(config, trust_remote_code=trust_remote_code):
        raise UnsupportedModelError(
            f"'{config.model_type}' has no causal language model in transformers "
            "(an encoder or encoder-decoder model): NSA converts decoders"
        )
    try:
        with torch.device("meta"), quiet_transformers():
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
            )
    except Exception as err:  # whatever a model's constructor raises on values it cannot take
        raise ConfigError(f"transformers cannot build the model from this config: {one_line(err)}") from None
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
        with _EXPORT_LOCK:
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
        raise UnsupportedModelError(f"torch.export could not capture the model: {one_line(first)}") from None
    return program.module()


def capture(config: PretrainedConfig, *, trust_remote_code: bool = False) -> Captured:
    """Meta-device model + exported graph, ready for the passes."""
    attn_implementation = choose_attn_implementation(config, trust_remote_code=trust_remote_code)
    model = build_meta_model(config, attn_implementation, trust_remote_code=trust_remote_code)
    vocab_size = getattr(config.get_text_config(), "vocab_size", 2)
    graph_module = export_model(model, vocab_size)
    return Captured(config, model, graph_module, attn_implementation)
