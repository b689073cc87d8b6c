"""Region rewrites: one driver for rewrites whose unit is a region of the graph.

The local-rule driver (`rewrite.py`) replaces what one pattern matches. A
region rewrite replaces a whole region (an MoE block, an attention site, a
residual block) whose structure alone does not say what it computes, so every
replacement is first confirmed on numbers. A `RegionRule` says what is specific
to it; `rewrite_regions` does the rest, the same way for every rule:

    find      rule.find(gm, ctx) -> regions, and (where, reason) for candidates that are not regions
    record    the values of every region's `rule.recorded(region)` nodes on the example inputs, one run
    confirm   for each reading in rule.readings(...): (got, want) = rule.reproduce(...); the first with
              relative_error(got, want) <= confirmation_tolerance(rule.tolerance, want.dtype) is taken
    replace   rule.insert(...) builds the replacement and its report record; the driver points the
              region's users at it, erases the region's dead nodes and appends the record

A region that raises NotARegion, or that no reading reproduces, is left as it
was, with `Skip(region.layer, rule.name, reason)` in the pass's stats.

Planning without weights (`ctx.shapes_only`, constants on the meta device) has
no values to record or confirm on. A rule whose replacement and record follow
from shapes (`plans_from_shapes`) gets meta stand-ins of its recorded values
(`shape_values`): its first reading is taken unconfirmed, and the record says
so (`details["confirmed"]`); the regions of any other rule are skipped with
`NOT_PLANNED` as the reason.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol

import math

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from .manager import Pass, PassContext, PassResult, PassStats, Skip
from .numerics import relative_error
from .records import RewriteRecord

aten = torch.ops.aten
# Runtime shape checks on a region's values; they go with the values they check.
ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
SIXTEEN_BIT_SLACK = 100   # 16-bit rounding is ~1e3 x fp32's; x100 still refuses a wrong reading
NOT_PLANNED = "not planned: this rewrite is decided on the example values, and the model was planned without weights"
UNCONFIRMED = "not confirmed: planned without weights (the first structural reading is taken)"


class NotARegion(ValueError):
    """The candidate cannot be replaced; the message is the skip reason the report shows."""


class Region(Protocol):
    """What the driver reads of a rule's region."""
    layer: str          # the layer skip reasons name
    output: Node        # the value the replacement takes over
    nodes: list[Node]   # the region's own nodes, graph order; erased once nothing reads them


class RegionRule(ABC):
    """A region rewrite: how to find its regions, read them and replace them (see the module docstring)."""
    same_nans: ClassVar[bool] = False   # confirm with NaNs required in the same places (and left out)
    plans_from_shapes: ClassVar[bool] = False   # `insert` works on meta stand-ins of the recorded values

    def __init__(self, options: Pass):
        self.options = options

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def tolerance(self) -> float:
        return self.options.tolerance

    @abstractmethod
    def find(self, gm: GraphModule, ctx: PassContext) -> tuple[list[Region], list[tuple[str, str]]]:
        """(regions in graph order, (where, reason) for each candidate that is not one)."""

    @abstractmethod
    def recorded(self, region: Region) -> Iterable[Node]:
        """The nodes whose example values `readings`, `reproduce` and `insert` read."""

    @abstractmethod
    def readings(self, gm: GraphModule, region: Region, values: dict) -> Iterable[Any]:
        """The candidate readings of the region, most likely first; may raise NotARegion."""

    @abstractmethod
    def reproduce(self, gm: GraphModule, region: Region, reading: Any,
                  values: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the reading computes on the recorded values, what the region computed there)."""

    @abstractmethod
    def unconfirmed(self, region: Region, best: float, tolerance: float) -> str:
        """The skip reason when no reading comes within `tolerance` (closest error `best`)."""

    @abstractmethod
    def insert(self, gm: GraphModule, region: Region, reading: Any, values: dict,
               error: float) -> tuple[Node, RewriteRecord]:
        """Insert the confirmed reading before the region's output; (its result node, the report record)."""


def confirmation_tolerance(tolerance: float, dtype: torch.dtype) -> float:
    """The relative error a confirmed reading may have: `tolerance`, x100 when the region's output is 16-bit."""
    return tolerance * SIXTEEN_BIT_SLACK if dtype in SIXTEEN_BIT else tolerance


def record_values(gm: GraphModule, inputs: tuple, wanted: list[Node]) -> dict[Node, torch.Tensor]:
    """The values of `wanted` nodes when the graph runs on `inputs` (flat tensors in placeholder order)."""
    if not wanted:
        return {}
    recorder = _Recorder(gm, set(wanted))
    with torch.no_grad():
        recorder.run(*pytree.tree_leaves(inputs))
    return recorder.values


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule, wanted: set[Node]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, node: Node):
        result = super().run_node(node)
        if node in self.wanted:
            self.values[node] = result
        return result


def ancestors(nodes: Iterable[Node]) -> set[Node]:
    """`nodes` and every node they read, directly or through others."""
    stack = list(nodes)
    seen = set(stack)
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return seen


def confirm(gm: GraphModule, rule: RegionRule, region: Region, values: dict) -> tuple[Any, float]:
    """The first reading that reproduces the region, and its error; NotARegion when none does."""
    tolerance = confirmation_tolerance(rule.tolerance, values[region.output].dtype)
    best = float("inf")
    for reading in rule.readings(gm, region, values):
        got, want = rule.reproduce(gm, region, reading, values)
        error = relative_error(got, want, same_nans=rule.same_nans)
        if error <= tolerance:
            return reading, error
        best = min(best, error)
    raise NotARegion(rule.unconfirmed(region, best, tolerance))


def erase_region(gm: GraphModule, nodes: list[Node]) -> None:
    """Erase the region's nodes nothing reads any more, last first, with the shape asserts on them.

    In-place ops inside a region only write tensors the region made, and the
    replacement was confirmed against the region's output, so its dead nodes
    (dropout and SDPA included, which dead-code elimination keeps as impure)
    have no effect left."""
    erased: set[Node] = set()
    for node in reversed(nodes):
        if node in erased or node.graph is not gm.graph:
            continue
        checks = [u for u in node.users if u.target in ASSERTS]
        if len(checks) < len(node.users):
            continue   # still read by the graph (a router feeding the new op): keeps its shape asserts
        for check in checks:
            gm.graph.erase_node(check)
            erased.add(check)
        if not node.users:
            gm.graph.erase_node(node)
            erased.add(node)


def shape_values(wanted: Iterable[Node]) -> dict[Node, torch.Tensor]:
    """Meta tensors of the shapes and dtypes of `wanted` nodes (symbolic sizes at their example hint):
    what a region rule reads in place of recorded values when the model has no weights."""
    values = {}
    for node in wanted:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = [int(d) if isinstance(d, int) else int(d.node.hint) for d in val.shape]
            values[node] = torch.empty(shape, dtype=val.dtype, device="meta")
    return values


def _first_reading(gm: GraphModule, rule: RegionRule, region: Region, values: dict) -> tuple[Any, float]:
    """Shapes only: the rule's first reading, unconfirmed, with a NaN error (nothing was measured)."""
    for reading in rule.readings(gm, region, values):
        return reading, math.nan
    raise NotARegion(f"{rule.name}: no structural reading of this region")


def rewrite_regions(gm: GraphModule, ctx: PassContext, rule: RegionRule) -> PassResult:
    """Find, record, confirm and replace `rule`'s regions in `gm` (see the module docstring)."""
    regions, misses = rule.find(gm, ctx)
    stats = PassStats(matched=len(regions), skipped=[Skip(where, rule.name, reason) for where, reason in misses])
    if ctx.shapes_only and not rule.plans_from_shapes:
        stats.skipped += [Skip(region.layer, rule.name, NOT_PLANNED) for region in regions]
        return PassResult(gm, False, stats)
    wanted = [n for r in regions for n in rule.recorded(r)]
    values = shape_values(wanted) if ctx.shapes_only else record_values(gm, ctx.example_inputs, wanted)
    for region in regions:
        try:
            reading, error = (_first_reading if ctx.shapes_only else confirm)(gm, rule, region, values)
        except NotARegion as err:
            stats.skipped.append(Skip(region.layer, rule.name, str(err)))
            continue
        out, record = rule.insert(gm, region, reading, values, error)
        if ctx.shapes_only:
            record.details["confirmed"] = UNCONFIRMED
        region.output.replace_all_uses_with(out)
        erase_region(gm, region.nodes)
        ctx.records.append(record)
        stats.rewritten += 1
    return PassResult(gm, stats.rewritten > 0, stats)


__all__ = ["ASSERTS", "NOT_PLANNED", "UNCONFIRMED", "NotARegion", "Region", "RegionRule", "ancestors", "confirm",
           "confirmation_tolerance", "erase_region", "record_values", "rewrite_regions", "shape_values"]
