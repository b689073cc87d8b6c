"""A small builder for ONNX FunctionProto bodies: standard ops only, names generated."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

DOMAIN = "sparsecc"


class Body:
    """Nodes of one function body; `op` returns the output name (or names) of the node it adds."""

    def __init__(self, name: str, overload: str, inputs: Sequence[str], attributes: Sequence[str], opset: int):
        self.name, self.overload, self.inputs = name, overload, list(inputs)
        self.attributes, self.opset = list(attributes), opset
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: Any) -> str | list[str]:
        names = [self._fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A Constant node holding `value` (a scalar stays 0-d)."""
        array = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=numpy_helper.from_array(array, self._fresh("c")))

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def finish(self, outputs: Sequence[str]) -> onnx.FunctionProto:
        return helper.make_function(DOMAIN, self.name, self.inputs, list(outputs), self.nodes,
                                    [helper.make_opsetid("", self.opset)], attributes=self.attributes,
                                    overload=self.overload)
