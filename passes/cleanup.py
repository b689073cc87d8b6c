"""The `cleanup` pass: dead code elimination, constant de-duplication, unused attribute removal.

1. Dead nodes go: no users, not a placeholder or the output, not impure
   (`node.is_impure()` keeps asserts and in-place ops).
2. `get_attr` nodes with the same target merge into the first one.
3. Constants with equal dtype, shape, device and content merge into the one
   used first (a content hash narrows candidates, `torch.equal` decides).
   Program state (constants the graph writes, `passes/state.py`) never merges:
   two caches equal at compile time diverge at the first call.
4. Parameters, buffers and tensor attributes no `get_attr` reads any more are
   deleted from their owning module (empty submodules stay).

Tensor data is never modified in place.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .fake import resolve_attr
from .manager import Pass, PassContext, PassResult, PassStats
from .state import state_targets


def eliminate_dead_nodes(gm: GraphModule) -> int:
    """Erase unused pure nodes, consumers before producers; returns how many went."""
    dead = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users and not node.is_impure():
            gm.graph.erase_node(node)
            dead += 1
    return dead


def _merge_into(keep: Node, duplicate: Node) -> None:
    duplicate.replace_all_uses_with(keep)
    duplicate.graph.erase_node(duplicate)


def merge_same_target(gm: GraphModule) -> int:
    """Merge `get_attr` nodes reading the same attribute; returns the number merged."""
    first: dict[str, Node] = {}
    merged = 0
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        if node.target in first:
            _merge_into(first[node.target], node)
            merged += 1
        else:
            first[node.target] = node
    return merged


def _mergeable(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.layout == torch.strided
            and not value.is_meta and not value.is_quantized and type(value) in (torch.Tensor, nn.Parameter))


def content_hash(tensor: torch.Tensor) -> str:
    """A hash of a tensor's bytes (dtype and shape are compared separately)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(flat.numpy(), digest_size=16).hexdigest()


def _constant_groups(gm: GraphModule) -> Iterator[list[tuple[Node, torch.Tensor]]]:
    """Groups of constants of equal dtype/shape/device/hash, in graph order; singletons skipped."""
    by_type: dict[tuple, list[tuple[Node, torch.Tensor]]] = defaultdict(list)
    state = set(state_targets(gm))
    for node in (n for n in gm.graph.nodes if n.op == "get_attr" and n.target not in state):
        value = resolve_attr(gm, node.target)
        if _mergeable(value):
            by_type[(value.dtype, tuple(value.shape), value.device)].append((node, value))
    for group in (g for g in by_type.values() if len(g) > 1):  # hash only where a twin may exist
        by_hash: dict[str, list[tuple[Node, torch.Tensor]]] = defaultdict(list)
        for node, value in group:
            by_hash[content_hash(value)].append((node, value))
        yield from (g for g in by_hash.values() if len(g) > 1)


def merge_equal_constants(gm: GraphModule) -> int:
    """Merge distinct constants with identical content; returns the number merged.

    Only constants of one kind merge: a parameter (requires_grad) never stands in for a
    buffer, since ops such as batch norm refuse a running statistic that requires grad.
    """
    merged = 0
    for group in list(_constant_groups(gm)):
        kept: list[tuple[Node, torch.Tensor]] = []
        for node, value in group:
            twin = next((k for k, v in kept if v is value or (v.requires_grad == value.requires_grad
                                                               and torch.equal(v, value))), None)
            if twin is None:
                kept.append((node, value))
            else:
                _merge_into(twin, node)
                merged += 1
    return merged


def _tensor_attrs(module: nn.Module) -> list[str]:
    plain = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
    return list(module._parameters) + list(module._buffers) + plain


def _owned_modules(module: nn.Module) -> Iterator[nn.Module]:
    """`module` and its submodules, not descending into nested GraphModules (they own their attrs)."""
    yield module
    for child in module.children():
        if not isinstance(child, GraphModule):
            yield from _owned_modules(child)


def remove_unused_attrs(gm: GraphModule) -> int:
    """Delete tensor attributes no `get_attr` node reads; returns how many went."""
    used = set()
    for node in (n for n in gm.graph.nodes if n.op == "get_attr"):
        owner_path, _, attr = node.target.rpartition(".")
        used.add((id(resolve_attr(gm, owner_path) if owner_path else gm), attr))
    removed = 0
    for module in {id(m): m for m in _owned_modules(gm)}.values():
        for attr in [a for a in _tensor_attrs(module) if (id(module), a) not in used]:
            delattr(module, attr)
            removed += 1
    return removed


@dataclass(frozen=True)
class Cleanup(Pass):
    """Remove dead nodes, merge duplicate constants, drop attributes nothing reads."""
    name: ClassVar[str] = "cleanup"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        dead = eliminate_dead_nodes(gm)
        merged = merge_same_target(gm) + merge_equal_constants(gm)
        removed = remove_unused_attrs(gm)
        stats = PassStats(extra={"dead_nodes": dead, "constants_merged": merged, "constants_removed": removed})
        return PassResult(gm, modified=bool(dead or merged or removed), stats=stats)


__all__ = ["Cleanup", "content_hash", "eliminate_dead_nodes", "merge_equal_constants",
           "merge_same_target", "remove_unused_attrs"]
