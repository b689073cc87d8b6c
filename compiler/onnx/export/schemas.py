"""ONNX schemas for the `sparsecc` domain, derived from each custom op's torch schema.

The torch exporter's translation functions can only emit ops with a registered
schema, so each sparse op gets one here: Tensor arguments become inputs
(Optional[Tensor] optional), int/float/bool/str arguments attributes (bool as
int). The schema only names the node; what it computes is the local function
attached to the model after export.
"""
from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema

from .body import DOMAIN

_TENSOR_TYPES = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "double", "uint8", "int8", "int32",
                                          "int64", "bool")]
_ATTR_TYPES = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT,
               "bool": OpSchema.AttrType.INT, "str": OpSchema.AttrType.STRING,
               "List[int]": OpSchema.AttrType.INTS, "List[float]": OpSchema.AttrType.FLOATS}


def split_arguments(op: torch._ops.OpOverload) -> tuple[list, list]:
    """(tensor arguments, attribute arguments) of a custom op's schema, in order."""
    tensors, attrs = [], []
    for arg in op._schema.arguments:
        (tensors if "Tensor" in str(arg.type) else attrs).append(arg)
    return tensors, attrs


def _attr_type(arg) -> str:
    text = str(arg.type)
    if text not in _ATTR_TYPES:
        raise TypeError(f"argument '{arg.name}' of type {text} cannot be an ONNX attribute")
    return text


def onnx_schema(name: str, op: torch._ops.OpOverload) -> OpSchema:
    tensors, attrs = split_arguments(op)
    inputs = [OpSchema.FormalParameter(a.name, f"T{i}", param_option=(
        OpSchema.FormalParameterOption.Optional if isinstance(a.type, torch.OptionalType) else OpSchema.FormalParameterOption.Single))
        for i, a in enumerate(tensors)]
    outputs = [OpSchema.FormalParameter(f"out{i}", f"R{i}") for i in range(len(op._schema.returns))]
    constraints = [(p.type_str, _TENSOR_TYPES, "") for p in inputs + outputs]
    attributes = [OpSchema.Attribute(a.name, _ATTR_TYPES[_attr_type(a)], required=not a.has_default_value())
                  for a in attrs]
    return OpSchema(name, DOMAIN, 1, inputs=inputs, outputs=outputs, type_constraints=constraints,
                    attributes=attributes)


def ensure_registered(name: str, op: torch._ops.OpOverload) -> None:
    """Register the schema once per process (onnx keeps a global schema table)."""
    if not onnx.defs.has(name, DOMAIN):
        onnx.defs.register_schema(onnx_schema(name, op))
