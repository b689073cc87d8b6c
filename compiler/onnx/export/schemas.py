"""ONNX schemas for the `sparsecc` domain, derived from each custom op's torch schema.

The torch exporter's translation functions can only emit ops with a registered
schema, so each sparse op gets one here: Tensor arguments become inputs
(Optional[Tensor] optional), sequence-length arguments (`LENGTH_INPUTS`) int64
scalar inputs (a dynamic length is a value of the graph, not an attribute), int/float/bool/str arguments
attributes (bool as int). Tensor[] arguments come last, flattened in order into
one variadic input (ONNX allows one, at the end). The schema only names the
node; what it computes is the local function attached to the model after export.
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


def is_tensor_list(arg) -> bool:
    return isinstance(arg.type, torch.ListType) and "Tensor" in str(arg.type)


# SymInt arguments that are sequence lengths: int64 scalar inputs, since a dynamic length is a value of
# the graph (torch infers SymInt for every int argument, so the schema alone cannot tell them apart)
LENGTH_INPUTS = {"rule_layout": ("seq", "keys")}


def is_length(op: torch._ops.OpOverload, arg) -> bool:
    return arg.name in LENGTH_INPUTS.get(op._schema.name.split("::")[-1], ())


def split_arguments(op: torch._ops.OpOverload) -> tuple[list, list]:
    """(input arguments, attribute arguments) of a custom op's schema: inputs are the Tensor and SymInt
    arguments in order, then the Tensor[] ones (flattened into the node's last, variadic, input)."""
    inputs, lists, attrs = [], [], []
    for arg in op._schema.arguments:
        if is_tensor_list(arg):
            lists.append(arg)
        else:
            (inputs if "Tensor" in str(arg.type) or is_length(op, arg) else attrs).append(arg)
    return inputs + lists, attrs


def variadic_name(op: torch._ops.OpOverload) -> str:
    """The name of the node's variadic input: the op's Tensor[] arguments joined ('' when none)."""
    return "_".join(arg.name for arg in split_arguments(op)[0] if is_tensor_list(arg))


def formal_inputs(op: torch._ops.OpOverload, bound: dict) -> dict[str, object]:
    """The node's inputs by formal parameter of a call whose arguments are `bound` by name: the
    Tensor[] arguments joined, in order, into one tuple under `variadic_name`."""
    inputs, lists = {}, []
    for arg in split_arguments(op)[0]:
        if is_tensor_list(arg):
            lists += [*bound[arg.name]]
        else:
            inputs[arg.name] = bound.get(arg.name)
    return inputs | ({variadic_name(op): tuple(lists)} if lists else {})


def node_inputs(op: torch._ops.OpOverload, bound: dict) -> list[tuple[str, object]]:
    """(input name, value) per node input: Tensor[] arguments flattened as name_0, name_1, ...; an
    omitted optional input keeps its slot (None)."""
    flat = []
    for arg in split_arguments(op)[0]:
        value = bound.get(arg.name)
        if is_tensor_list(arg):
            flat += [(f"{arg.name}_{i}", item) for i, item in enumerate(value)]
        else:
            flat.append((arg.name, value))
    return flat


def _attr_type(arg) -> str:
    text = str(arg.type)
    if text not in _ATTR_TYPES:
        raise TypeError(f"argument '{arg.name}' of type {text} cannot be an ONNX attribute")
    return text


def _input(i: int, arg) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption
    return OpSchema.FormalParameter(arg.name, f"T{i}", param_option=(
        option.Optional if isinstance(arg.type, torch.OptionalType) else option.Single))


def onnx_schema(name: str, op: torch._ops.OpOverload) -> OpSchema:
    tensors, attrs = split_arguments(op)
    singles = [a for a in tensors if not is_tensor_list(a)]
    lists = [a for a in tensors if is_tensor_list(a)]
    # the Tensor[] arguments share one variadic input, named after them all
    inputs = [_input(i, a) for i, a in enumerate(singles)]
    if lists:
        inputs.append(OpSchema.FormalParameter(variadic_name(op), f"T{len(singles)}",
                                               param_option=OpSchema.FormalParameterOption.Variadic,
                                               is_homogeneous=False))
    outputs = [OpSchema.FormalParameter(f"out{i}", f"R{i}") for i in range(len(op._schema.returns))]
    lengths = {p.type_str for p, a in zip(inputs, singles) if is_length(op, a)}
    constraints = [(p.type_str, ["tensor(int64)"] if p.type_str in lengths else _TENSOR_TYPES, "")
                   for p in inputs + outputs]
    attributes = [OpSchema.Attribute(a.name, _ATTR_TYPES[_attr_type(a)], required=not a.has_default_value())
                  for a in attrs]
    return OpSchema(name, DOMAIN, 1, inputs=inputs, outputs=outputs, type_constraints=constraints,
                    attributes=attributes)


def ensure_registered(name: str, op: torch._ops.OpOverload) -> None:
    """Register the schema once per process (onnx keeps a global schema table)."""
    if not onnx.defs.has(name, DOMAIN):
        onnx.defs.register_schema(onnx_schema(name, op))
