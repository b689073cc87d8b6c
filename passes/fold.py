"""The `fold-constants` pass: compute at compile time what depends only on constants and static shapes.

A `call_function` node is foldable when its op is a deterministic, functional
ATen or prims op (or a sparsecc layout op), every input is a constant (a
`get_attr` tensor that is not program state, a literal, or another foldable
node), its result has a static shape, and the result's total bytes are at most
`max_bytes`. Foldable nodes run once, for real, on the constants' own devices
and dtypes, so a folded value equals what the program would compute. Only the
frontier is stored: a foldable node some non-foldable node (or the output)
reads becomes a program constant (`Rewriter.add_constant`, saved in the
artifact like a weight); the folded nodes behind it are erased.

Never folded: ops tagged `nondeterministic_seeded` (rand*, dropout, bernoulli,
normal, ...), `empty*` (uninitialised memory), mutating or impure ops
(`node.is_impure()`: asserts, profiler ranges), sparsecc ops other than the
layout ones, custom ops of other libraries, and anything reading meta or fake
data, program state or a constant a rewrite record names, and values the
program returns (the caller owns what it gets). A result over
`max_bytes` (an S x S mask) stays in the program; the inputs it reads may
still fold. An `_assert_tensor_metadata` whose tensor is folded is checked
once here and dropped: a constant's dtype, device and layout never change.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves, tree_map

from .fake import resolve_attr
from .graph import module_path
from .manager import Pass, PassContext, PassResult, PassStats
from .options import Bounds, OptionBounds
from .rewriter import Rewriter
from .state import state_targets

FOLDABLE_NAMESPACES = ("aten", "prims")
# sparsecc ops that compute which blocks attention visits: program data. The others run per call on purpose
# (nm_decompress expands compressed weights: folding it would store them dense).
FOLDABLE_SPARSECC_OPS = ("block_layout", "rule_layout")
# ops whose result is whatever memory held: folding would store garbage as a constant
UNINITIALISED = ("empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided")
LITERALS = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
CHECKED_ASSERT = torch.ops.aten._assert_tensor_metadata.default


def foldable_op(node: Node) -> bool:
    """Whether `node`'s op may run at compile time: deterministic, functional, known to the runtime."""
    if node.op != "call_function" or node.is_impure():
        return False
    if node.target is operator.getitem:
        return True
    op = node.target
    if not isinstance(op, torch._ops.OpOverload):
        return False
    name = op._schema.name.split("::")[-1]
    if op.namespace not in FOLDABLE_NAMESPACES and not (op.namespace == "sparsecc" and name in FOLDABLE_SPARSECC_OPS):
        return False
    return (torch.Tag.nondeterministic_seeded not in op.tags and not op._schema.is_mutable
            and name not in UNINITIALISED and not name.startswith("_assert"))


def static_bytes(val: Any) -> int | None:
    """Total bytes of a static tensor (or tuple of them) from its fake value; None when not static tensors."""
    leaves = tree_leaves(val)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        return None
    if not all(isinstance(d, int) for t in leaves for d in t.shape):
        return None
    return sum(t.numel() * t.element_size() for t in leaves)


def recorded_constants(records: list) -> set[str]:
    """Constants rewrite records name (compressed weights): the report and the pruned reference read them back."""
    return {leaf for record in records for leaf in tree_leaves(getattr(record, "details", {})) if isinstance(leaf, str)}


def constant_source(gm: GraphModule, node: Node, kept: set[str], meta: bool = False) -> torch.Tensor | None:
    """The real tensor a `get_attr` node reads, unless it is `kept` as it is (program state, recorded
    constants) or not real data; with `meta` (planning without weights) a meta tensor counts: folding on
    it computes the folded constants' shapes, which is all a plan reports."""
    value = resolve_attr(gm, node.target)
    if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or (value.is_meta and not meta):
        return None
    return None if node.target in kept else value


@dataclass
class Folding:
    """What one run found: real values of constant nodes, and the nodes that were evaluated."""
    values: dict[Node, Any] = field(default_factory=dict)
    evaluated: list[Node] = field(default_factory=list)
    too_large: int = 0

    def constant_inputs(self, node: Node) -> bool:
        """Every input of `node` is a constant node or a literal."""
        leaves = tree_leaves((node.args, node.kwargs))
        return all(leaf in self.values if isinstance(leaf, Node) else isinstance(leaf, LITERALS) for leaf in leaves)

    def evaluate(self, node: Node) -> None:
        args, kwargs = tree_map(self.real, (tuple(node.args), dict(node.kwargs)))
        try:
            with torch.no_grad():
                self.values[node] = node.target(*args, **kwargs)
        except Exception as err:
            raise RuntimeError(f"fold-constants: evaluating %{node.name} ({node.target}) on its constant "
                               f"inputs failed: {err}") from err
        self.evaluated.append(node)

    def real(self, arg: Any) -> Any:
        return self.values[arg] if isinstance(arg, Node) else arg


def returned(node: Node) -> bool:
    """The program returns `node`'s value, or a view of it: it stays computed per call, since the caller owns
    (and may write) it."""
    return any(user.op == "output" or (is_view(user) and user.args[:1] == (node,) and returned(user))
               for user in node.users)


def is_view(node: Node) -> bool:
    """An op whose output aliases its first input (view, expand, t, slice, ...), by its schema."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and bool(schema.returns) and \
        schema.returns[0].alias_info is not None


def fold_values(gm: GraphModule, max_bytes: int, kept: set[str], meta: bool = False) -> Folding:
    """Evaluate every foldable node of `gm` in graph order, reading no constant in `kept` (the graph is unchanged)."""
    folding = Folding()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            source = constant_source(gm, node, kept, meta)
            if source is not None and node.users:   # an unread constant is cleanup's to remove
                folding.values[node] = source
        elif foldable_op(node) and folding.constant_inputs(node) and not returned(node):
            size = static_bytes(node.meta.get("val"))
            if size is not None and size > max_bytes:
                folding.too_large += 1
            elif size is not None:
                folding.evaluate(node)
    return folding


def frontier(folding: Folding) -> list[Node]:
    """Evaluated tensor nodes that a node outside the folding reads: the values the program needs."""
    return [n for n in folding.evaluated if isinstance(folding.values[n], torch.Tensor)
            and any(u not in folding.values for u in n.users)]


def stored_value(value: torch.Tensor, taken: set[int]) -> torch.Tensor:
    """`value` as a program constant: contiguous, detached, sharing no storage with a weight or another
    constant (`taken`: their storages; the artifact refuses shared tensors)."""
    stored = value.detach().contiguous()
    if stored.untyped_storage().data_ptr() in taken:
        stored = stored.clone()
    taken.add(stored.untyped_storage().data_ptr())
    return stored


def check_asserts(folding: Folding) -> int:
    """Run each metadata assert on a folded tensor once, now, and drop it; returns how many went."""
    checked = [u for n in list(folding.values) for u in n.users
               if u.target is CHECKED_ASSERT and folding.constant_inputs(u)]
    for node in checked:
        folding.evaluate(node)
        node.graph.erase_node(node)
    return len(checked)


def replace_frontier(gm: GraphModule, folding: Folding) -> tuple[int, int]:
    """Swap each frontier node for a new program constant; returns (constants made, their bytes)."""
    taken = {v.untyped_storage().data_ptr() for n, v in folding.values.items() if n.op == "get_attr"}
    made, stored_bytes = 0, 0
    for node in frontier(folding):
        value = stored_value(folding.values[node], taken)
        path = module_path(node)
        constant = Rewriter(gm, node).add_constant(f"{path}.{node.name}_folded" if path else f"{node.name}_folded",
                                                   value)
        node.replace_all_uses_with(constant)
        made, stored_bytes = made + 1, stored_bytes + value.numel() * value.element_size()
    return made, stored_bytes


def erase_folded(gm: GraphModule, folding: Folding) -> int:
    """Erase the folded nodes (and constants read only by them) nothing reads any more."""
    erased = 0
    for node in reversed(list(gm.graph.nodes)):
        if node in folding.values and not node.users:
            gm.graph.erase_node(node)
            erased += 1
    return erased


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate constant subgraphs at compile time; store results of at most `max_bytes` as constants."""
    name: ClassVar[str] = "fold-constants"
    option_bounds: ClassVar[dict[str, OptionBounds]] = {"max_bytes": Bounds(low=0, whole=True, noun="a byte count")}
    max_bytes: int = 1 << 20

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        kept = set(state_targets(gm)) | recorded_constants(ctx.records)   # written per call, or read back by name
        folding = fold_values(gm, self.max_bytes, kept, meta=ctx.shapes_only)
        asserts = check_asserts(folding)
        made, stored_bytes = replace_frontier(gm, folding)
        erased = erase_folded(gm, folding)
        stats = PassStats(matched=len(folding.evaluated) - asserts, rewritten=made,   # matched: nodes computed
                          extra={"folded_bytes": stored_bytes, "nodes_removed": erased + asserts,
                                 "left_too_large": folding.too_large})
        return PassResult(gm, modified=bool(made or erased or asserts), stats=stats)


__all__ = ["FoldConstants", "constant_source", "foldable_op", "fold_values", "static_bytes"]
