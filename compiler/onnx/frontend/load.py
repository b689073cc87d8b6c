"""Read an ONNX file for import: validation with clear errors, its real inputs, example inputs.

`load_model` fails on a corrupt or truncated file and on every op the importer
has no torch code for (`op_table`), naming the node; `onnx_module` then runs
the graph.
"""
from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch
from google.protobuf.message import DecodeError
from sparsecc.errors import SparseccError

from .op_table import OPS, supported_ops
from .tensors import torch_dtype


class OnnxImportError(SparseccError):
    """The ONNX file cannot be imported; the message names the op, node or problem."""


def load_model(path: str) -> onnx.ModelProto:
    """Read and validate an ONNX file: corrupt, truncated or unsupported models fail here."""
    try:
        model = onnx.load(path)
    except FileNotFoundError:
        raise OnnxImportError(f"{path}: no such file") from None
    except (DecodeError, ValueError, RuntimeError, OSError) as err:
        raise OnnxImportError(f"{path} is not a readable ONNX model (corrupt or truncated file?): {err}") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxImportError(f"{path} holds no graph (empty, corrupt or truncated file?)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise OnnxImportError(f"{path} is not a valid ONNX model: {str(err).splitlines()[0]}") from None
    check_supported(model)
    return model


def check_supported(model: onnx.ModelProto) -> None:
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            op_name = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            raise OnnxImportError(f"unsupported ONNX op '{op_name}' at node '{node.name or '#' + str(i)}' "
                                  f"(node {i}); supported ops: {', '.join(supported_ops())}")


def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (old files also list initializers as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """['batch=2', 'seq=16'] -> {'batch': 2, 'seq': 16}."""
    dims = {}
    for item in items:
        name, sep, size = item.partition("=")
        if not sep or not size.strip().isdigit():
            raise OnnxImportError(f"--dim expects NAME=SIZE, got {item!r}")
        dims[name.strip()] = int(size)
    return dims


def example_inputs(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs of the declared shapes (symbolic dims from `dims`, else 1): zeros for integers, randn for floats."""
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for value in graph_inputs(model):
        kind = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 1) for d in kind.shape.dim]
        dtype = torch_dtype(kind.elem_type)
        tensors.append(torch.randn(shape, generator=generator).to(dtype) if dtype.is_floating_point
                       else torch.zeros(shape, dtype=dtype))
    return tuple(tensors)
