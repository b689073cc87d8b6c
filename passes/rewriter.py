"""`Rewriter`: what a rule's `replace` uses to build the nodes that replace a match.

Every node it makes is inserted just before the matched root, carries the
root's `nn_module_stack` and `stack_trace`, and gets its `meta["val"]` by
running the target on FakeTensors under the graph's own fake mode.

New constants (`add_constant`) are registered as buffers on the submodule the
name hint names: `add_constant("layers.0.fc1.weight_nm_values", t)` becomes
buffer `weight_nm_values` of `layers.0.fc1` (target
`layers.0.fc1.weight_nm_values`), with `_1`, `_2`, ... appended when taken.
Missing submodules on the path are created as empty `nn.Module`s.
"""
from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .fake import fake_args_of, graph_fake_mode, resolve_attr, run_fake, to_fake


class RewriteError(RuntimeError):
    """A rule built an invalid replacement (bad op call, wrong result type)."""


def _overload(target: Any) -> Any:
    """Packets (`aten.mm`) resolve to their `.default` overload; graphs hold overloads only.

    `.default` is not always the tensor overload (`aten.add.default` adds Scalars); a
    wrong pick fails the fake run and the error says to name the overload."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        if "default" not in target.overloads():
            raise RewriteError(f"{target} has no .default overload; pass one of {target.overloads()}")
        return target.default
    return target


def _attr_name(text: str) -> str:
    name = re.sub(r"\W", "_", text)
    return name if name and not name[0].isdigit() else f"_{name}"


class Rewriter:
    """Builds replacement nodes before `root` in `gm`."""

    def __init__(self, gm: GraphModule, root: Node):
        self.gm, self.root, self.graph = gm, root, gm.graph
        self.fake_mode = graph_fake_mode(gm)
        self.created: list[Node] = []

    def _new_node(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None) -> Node:
        name = getattr(target, "_opname", None) or getattr(target, "__name__", None)  # `mm`, not `mm_default`
        with self.graph.inserting_before(self.root):
            node = self.graph.create_node(op, target, args, kwargs or {}, name=name)
        self.created.append(node)
        return node

    def call(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        """A `call_function` node `target(*args, **kwargs)` with its fake `meta["val"]`."""
        node = self._new_node("call_function", _overload(target), args, kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.root.meta:
                node.meta[key] = self.root.meta[key]
        fake_args, fake_kwargs = fake_args_of(self.gm, node, self.fake_mode)
        try:
            node.meta["val"] = run_fake(node.target, fake_args, fake_kwargs, self.fake_mode)
        except Exception as err:  # report which call the rule got wrong, whatever the op raised
            self.graph.erase_node(self.created.pop())
            hint = " (a packet resolves to .default; name the overload, e.g. aten.add.Tensor)" \
                if isinstance(target, torch._ops.OpOverloadPacket) else ""
            raise RewriteError(f"{node.target} does not accept the arguments a rule gave it{hint}: {err}") from err
        return node

    def getitem(self, node: Node, index: int) -> Node:
        """Element `index` of a node that returns a tuple."""
        return self.call(operator.getitem, node, index)

    def constant(self, node: Node) -> torch.Tensor:
        """The real tensor behind a `get_attr` node (read it; never modify it in place)."""
        value = resolve_attr(self.gm, node.target) if node.op == "get_attr" else None
        if not isinstance(value, torch.Tensor):
            raise RewriteError(f"%{node.name} is not a tensor constant")
        return value

    def get_constant(self, target: str) -> Node:
        """A new `get_attr` node for an existing tensor attribute (cleanup merges duplicates)."""
        value = resolve_attr(self.gm, target)
        if not isinstance(value, torch.Tensor):
            raise RewriteError(f"'{target}' is not a tensor attribute of the module")
        node = self._new_node("get_attr", target)
        node.meta["val"] = to_fake(value, self.fake_mode)
        return node

    def add_constant(self, name_hint: str, tensor: torch.Tensor) -> Node:
        """Register `tensor` as a buffer (see the module docstring) and return its `get_attr` node."""
        owner_path, _, leaf = name_hint.rpartition(".")
        owner = self._owner(owner_path)
        if owner is None:
            owner_path, owner, leaf = "", self.gm, name_hint
        attr = _unique_attr(owner, _attr_name(leaf))
        owner.register_buffer(attr, tensor.detach())
        return self.get_constant(f"{owner_path}.{attr}" if owner_path else attr)

    def _owner(self, path: str) -> nn.Module | None:
        """The submodule at `path`, creating empty ones; None when a step is not a module."""
        owner: nn.Module = self.gm
        for part in path.split(".") if path else []:
            child = getattr(owner, part, None)
            if child is None and re.fullmatch(r"\w+", part):
                child = nn.Module()
                owner.add_module(part, child)
            if not isinstance(child, nn.Module):
                return None
            owner = child
        return owner


def _unique_attr(owner: nn.Module, name: str) -> str:
    candidate, index = name, 1
    while hasattr(owner, candidate):
        candidate, index = f"{name}_{index}", index + 1
    return candidate


__all__ = ["RewriteError", "Rewriter"]
