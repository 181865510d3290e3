"""Export a rewritten graph to ONNX with the NSA op as one node of its own domain (for Netron and friends)."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

DOMAIN = "nsa_convert"
OP_NAME = "NSAttention"
INT_ATTRIBUTES = ("block_size", "top_n", "window", "compress_block", "compress_stride")


def _schema() -> OpSchema:
    """The contract of the ONNX node: the custom op's tensors as inputs, its hyperparameters as attributes."""
    tensor = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [tensor(name, "T") for name in ("q", "k", "v", "k_cmp", "v_cmp", "gates")]
    inputs += [tensor(name, "T", param_option=optional) for name in ("k_win", "v_win")]
    return OpSchema(
        OP_NAME,
        DOMAIN,
        1,
        doc="Native Sparse Attention (see NSA_SPEC.md): gated sum of compressed, selected and window attention.",
        inputs=inputs,
        outputs=[tensor("out", "T"), tensor("lse", "tensor(float)"), tensor("indices", "tensor(int64)")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "q, k, v dtype")
        ],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, name) for name in INT_ATTRIBUTES]
        + [OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale")],
    )


_NSA_OP = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), OP_NAME, _schema())


def _translate_nsa_attention(
    q,
    k,
    v,
    k_cmp,
    v_cmp,
    gates,
    k_win,
    v_win,
    block_size,
    top_n,
    window,
    compress_block,
    compress_stride,
    scale,
    backend,
):
    """torch.ops.nsa_convert.nsa_attention → one nsa_convert::NSAttention node (the backend is not a graph fact)."""
    return _NSA_OP(
        q,
        k,
        v,
        k_cmp,
        v_cmp,
        gates,
        k_win,
        v_win,
        block_size=block_size,
        top_n=top_n,
        window=window,
        compress_block=compress_block,
        compress_stride=compress_stride,
        scale=scale,
    )


def export_onnx(graph_module: torch.nn.Module, path: Path, *, vocab_size: int, seq_len: int = 64) -> Path:
    """Export a (meta or real) rewritten model graph to `path`; weights become graph inputs, not data.

    The file holds the structure only, so it stays small for any model size; it passes onnx.checker.
    """
    device = next((t.device for t in graph_module.parameters()), torch.device("cpu"))
    input_ids = torch.randint(0, max(vocab_size, 2), (1, seq_len), device=device)
    program = torch.onnx.export(
        graph_module,
        (),
        kwargs={"input_ids": input_ids, "use_cache": False},
        dynamo=True,
        custom_translation_table={torch.ops.nsa_convert.nsa_attention.default: _translate_nsa_attention},
        dynamic_shapes={"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}, "use_cache": None},
        optimize=False,
        verbose=False,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), include_initializers=False, keep_initializers_as_inputs=True)
    onnx.checker.check_model(onnx.load(str(path)))
    return path
