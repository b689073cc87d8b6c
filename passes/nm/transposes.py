"""The spellings of W.T that reach a captured graph, and a pattern for "a 2-D constant, transposed".

`x @ W.T` (Falcon's FalconLinear) exports as `aten.numpy_T(W)`; `W.t()` as
`aten.t`; `W.transpose(0, 1)`, `W.mT` and `W.permute(1, 0)` as transpose /
permute with the two dims swapped. On a 2-D weight they all read W as
[in, out], so the linear rules treat them as one form.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from ..match import Match, Pattern

aten = torch.ops.aten
# Ops that, applied to a 2-D tensor with their listed arguments, swap its two dims.
_NO_ARGUMENT = (aten.t.default, aten.numpy_T.default)
_SWAPPED_DIMS = ({0, 1}, {-2, -1}, {0, -1}, {-2, 1})


def _is_matrix(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 2


def is_transpose(node: Node) -> bool:
    """Whether `node` swaps the two dims of a 2-D input, in any of the spellings above."""
    if node.op != "call_function" or not node.args or not _is_matrix(node.args[0]):
        return False
    if node.target in _NO_ARGUMENT:
        return True
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    if node.target is aten.transpose.int:
        return set(node.args[1:3]) in _SWAPPED_DIMS
    return False


class TransposedConst(Pattern):
    """A transpose (any spelling) of a 2-D `get_attr` node; captures the constant under `name`."""

    def __init__(self, name: str):
        self.name = name

    def bind(self, value: Any, m: Match) -> bool:
        if not (isinstance(value, Node) and is_transpose(value) and value.args[0].op == "get_attr"):
            return False
        if self.name in m.captures and m.captures[self.name] is not value.args[0]:
            return False
        m.captures[self.name] = value.args[0]
        m.nodes.append(value)
        return True

    def __repr__(self) -> str:
        return f"TransposedConst({self.name!r})"
