"""Model-level training switches: non-reentrant activation checkpointing and selection distillation.

    nsa_convert.enable_checkpointing(model)
    nsa_convert.enable_selection_distillation(model, queries=128)
    loss = model(**batch).loss + weight * nsa_convert.selection_distillation_loss(model)

Selection distillation (nsa_convert.nn.distill) works with activation checkpointing when it is
non-reentrant: transformers 4 defaulted to the reentrant kind, which runs the forward pass without
gradients, so no term would be computed.
"""

from __future__ import annotations

import torch
from torch import nn

from nsa_convert.nn.attention import nsa_modules


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model, under either of its names for it
    (the newer one, or the older one that defaulted to the reentrant kind)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_selection_distillation(model: nn.Module, queries: int = 128, pool: int = 1) -> None:
    """Make every NSA layer score its selection against full attention in forward passes with gradients.

    queries: positions scored per batch row and layer (shared by the documents packed into a row);
    0 turns distillation off.  pool: draw pool times as many positions and score the queries × rows most
    retrieval-like of them, wherever they lie in the batch (nsa_convert.nn.distill.retrieval_focus);
    1 scores uniformly drawn ones.
    """
    if queries < 0:
        raise ValueError(f"queries must be ≥ 0, got {queries}")
    if pool < 1:
        raise ValueError(f"pool must be ≥ 1, got {pool}")
    layers = list(nsa_modules(model).values())
    if not layers:
        raise ValueError("the model has no NSA layers: load a converted checkpoint with nsa_convert.load")
    for layer in layers:
        layer.distill_queries = queries
        layer.distill_pool = pool
        layer.distill_term = None


def selection_distillation_loss(model: nn.Module) -> torch.Tensor:
    """The mean over NSA layers of the terms the last forward pass computed; takes them (a second call
    without a forward in between fails)."""
    layers = list(nsa_modules(model).values())
    terms = [layer.distill_term for layer in layers if layer.distill_queries]
    if not terms:
        raise RuntimeError("selection distillation is off: call enable_selection_distillation(model) first")
    if any(term is None for term in terms):
        raise RuntimeError(
            "no selection-distillation term from the last forward pass: it runs only with gradients "
            "enabled (reentrant activation checkpointing disables them; use enable_checkpointing(model))"
        )
    for layer in layers:
        layer.distill_term = None
    return torch.stack(terms).mean()
