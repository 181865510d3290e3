"""Checkpoint I/O that never holds a whole model: a lazy reader, a shard-by-shard writer, staged output."""

from nsa_convert.checkpoint.reader import SAFETENSORS_DTYPES, CheckpointReader, StoredTensor, TensorInfo
from nsa_convert.checkpoint.staging import check_output, install_sigterm_as_interrupt, staged_output
from nsa_convert.checkpoint.writer import ShardWriter, TensorSpec

__all__ = [
    "SAFETENSORS_DTYPES",
    "CheckpointReader",
    "ShardWriter",
    "StoredTensor",
    "TensorInfo",
    "TensorSpec",
    "check_output",
    "install_sigterm_as_interrupt",
    "staged_output",
]
