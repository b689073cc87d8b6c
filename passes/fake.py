"""FakeTensor plumbing shared by the Rewriter and the verifier.

Captured graphs carry FakeTensors in `meta["val"]`, all from one
FakeTensorMode (with the ShapeEnv that owns the symbolic dims). New vals must
come from that same mode, or symbolic dims would not compare and ops would
mix modes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_map

_MISSING = object()


def graph_fake_mode(gm: GraphModule) -> FakeTensorMode:
    """The fake mode of the first FakeTensor in the graph; a fresh static one if there is none."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for leaf in val if isinstance(val, (list, tuple)) else (val,):
            if isinstance(leaf, FakeTensor):
                return leaf.fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def resolve_attr(gm: GraphModule, target: str) -> Optional[Any]:
    """The object at dotted path `target` on `gm`, or None when any step is missing."""
    owner: Any = gm
    for part in target.split("."):
        owner = getattr(owner, part, _MISSING)
        if owner is _MISSING:
            return None
    return owner


def to_fake(value: Any, mode: FakeTensorMode) -> Any:
    """A real tensor as a FakeTensor of `mode` (static shape); anything else unchanged."""
    if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
        return mode.from_tensor(value, static_shapes=True)
    return value


def node_fake(gm: GraphModule, node: Node, mode: FakeTensorMode) -> Any:
    """The fake value a node stands for: constants from the real attribute, others from meta."""
    if node.op == "get_attr":
        attr = resolve_attr(gm, node.target)
        if isinstance(attr, torch.Tensor):
            return to_fake(attr, mode)
    return node.meta.get("val")


def fake_args_of(gm: GraphModule, node: Node, mode: FakeTensorMode) -> tuple[tuple, dict]:
    """(args, kwargs) of `node` with every input node replaced by its fake value."""
    def convert(arg: Any) -> Any:
        return node_fake(gm, arg, mode) if isinstance(arg, Node) else to_fake(arg, mode)
    return tree_map(convert, tuple(node.args)), tree_map(convert, dict(node.kwargs))


def run_fake(target: Any, args: tuple, kwargs: dict, mode: FakeTensorMode) -> Any:
    """`target(*args, **kwargs)` evaluated on fakes under `mode`."""
    with mode:
        return target(*args, **kwargs)


__all__ = ["fake_args_of", "graph_fake_mode", "node_fake", "resolve_attr", "run_fake", "to_fake"]
