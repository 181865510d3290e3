"""Tiny random checkpoints of real transformers architectures, written as the hub writes them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 97

SMALL_NSA = dict(window=64, block_size=16, top_n=4, compress_block=8, compress_stride=4)
"""An NSA geometry whose branches all take part within the short inputs tiny models get."""

ARCHITECTURES = {
    # name: (config class, heads q/kv, extra config)
    "llama-g4": (LlamaConfig, 8, 2, {}),
    "qwen2-tied-g7": (Qwen2Config, 14, 2, {"tie_word_embeddings": True}),
    "qwen3-g1": (Qwen3Config, 4, 4, {}),
    "mistral-mqa": (MistralConfig, 8, 1, {"sliding_window": None}),
}


def tiny_config(arch: str, **overrides):
    config_class, n_q, n_kv, extra = ARCHITECTURES[arch]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=n_q,
        num_key_value_heads=n_kv,
        head_dim=8,
        max_position_embeddings=4096,
    )
    return config_class(**(kwargs | extra | overrides))


def make_checkpoint(
    directory: Path, arch: str, *, seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """Random float32 weights (scaled up so attention patterns are not flat) saved with save_pretrained."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def dense_model(directory: Path):
    return AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())
