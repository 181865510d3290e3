"""nsa-convert: turn a dense GQA language model into a Native Sparse Attention model."""

__version__ = "0.1.0"

from nsa_convert.config import NSAConfig


def __getattr__(name: str):
    """Import the heavy API (transformers, torch.export) on first use, not at package import."""
    if name in ("convert", "load", "parameter_groups", "plan"):
        from nsa_convert import api

        return getattr(api, name)
    if name in ("enable_checkpointing", "enable_selection_distillation", "selection_distillation_loss"):
        from nsa_convert.nn import training

        return getattr(training, name)
    raise AttributeError(f"module 'nsa_convert' has no attribute {name!r}")


__all__ = [
    "NSAConfig",
    "__version__",
    "convert",
    "enable_checkpointing",
    "enable_selection_distillation",
    "load",
    "parameter_groups",
    "plan",
    "selection_distillation_loss",
]
