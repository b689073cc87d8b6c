"""`moe-dispatch`: rewrite mixture-of-experts blocks, in any form, into `sparsecc::moe`.

For every router selection (`topk`, or the sparsemixer's `max`), `regions.find_block`
finds the block around it, the routing (`routing.py`), expert weights (`experts.py`)
and expert form (`expert_form.py`) are read off the graph, and each structurally
possible reading (weight orientation, gate/up order, bias assignment, normalisation) is
confirmed by running the dispatch on the block's own inputs from the example
inputs and comparing with the block's output there. The first reading that
reproduces the block to tolerance replaces it; a block none reproduces is left
as it was, with the reason in the report. The rewrite is exact.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.moe_routing import capacity_mask, route
from sparsecc.runtime.ops.moe import moe_flops

from ..graph import layer_name, module_index
from ..manager import Pass, PassContext, PassResult
from ..options import Bounds, OptionBounds
from ..records import RewriteRecord
from ..region import RegionRule, rewrite_regions
from .block import MoEBlock
from .expert_form import bias_pairs, expert_biases, read_expert_form
from .experts import per_expert_candidates, per_expert_linears, shared_expert, stacked_candidates
from .reading import Reading, dispatch, insert_dispatch
from .regions import NoExpertWeights, NotAnMoE, block_form, find_block, find_output, region_constants
from .routing import read_routing, selection_nodes


@dataclass(frozen=True)
class MoEDispatch(Pass):
    name: ClassVar[str] = "moe-dispatch"
    capacity_factor: float = 0.0     # > 0: each expert takes at most ceil(cf * T * k / E) pairs
    tolerance: float = 1e-4          # relative error a confirmed reading may have (fp32; x100 for 16-bit)
    option_bounds: ClassVar[dict[str, OptionBounds]] = {"capacity_factor": Bounds(0), "tolerance": Bounds(0)}

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return rewrite_regions(gm, ctx, MoERule(self))


class MoERule(RegionRule):
    """Regions: MoE blocks, one per module around a router selection. Readings: the expert weight
    layouts and bias assignments the structure allows, each with and without top-k normalisation
    (and routed scaling). Exact."""
    options: MoEDispatch
    plans_from_shapes = True   # the dispatch and its record follow from the weights' shapes

    def find(self, gm: GraphModule, ctx: PassContext) -> tuple[list[MoEBlock], list[tuple[str, str]]]:
        blocks, misses, modules = {}, [], module_index(gm)
        for selection in selection_nodes(gm):
            try:
                block = analyse(gm, selection, modules)
            except NotAnMoE as err:
                if selection.target is torch.ops.aten.topk.default or not isinstance(err, NoExpertWeights):
                    misses.append((selection, str(err)))   # a max outside any MoE block is no candidate
                continue
            blocks.setdefault(block.path, block)   # one block per module, however many topks it has
        inside = {n for block in blocks.values() for n in block.nodes}
        # a group-limited router's inner topks, a sparsemixer's second max: part of a block, not misses
        return list(blocks.values()), [(layer_name(n), reason) for n, reason in misses if n not in inside]

    def recorded(self, block: MoEBlock) -> tuple[Node, ...]:
        return block.hidden, block.routing.router, block.output

    def readings(self, gm: GraphModule, block: MoEBlock, values: dict) -> Iterator[Reading]:
        for candidate in block.expert_candidates:
            for b_gate_up, b_down in bias_pairs(block.biases, candidate):
                for routing in routing_variants(block):
                    yield Reading(candidate.gate_up.contiguous(), candidate.down.contiguous(), candidate.gated,
                                  routing, b_gate_up, b_down, candidate.gate_up_from, candidate.down_from)

    def reproduce(self, gm: GraphModule, block: MoEBlock, reading: Reading, values: dict):
        hidden, logits, want = values[block.hidden], values[block.routing.router], values[block.output]
        got = dispatch(block, reading, hidden.to(reading.w_gate_up.dtype), logits, 0.0).to(want.dtype)
        return got, want.reshape(got.shape)   # structure is confirmed without capacity

    def unconfirmed(self, block: MoEBlock, best: float, tolerance: float) -> str:
        return (f"no dispatch of the recognised structure ({describe(block)}) reproduces the block "
                f"(closest relative error {best:.2e} > {tolerance:.0e})")

    def insert(self, gm: GraphModule, block: MoEBlock, reading: Reading, values: dict,
               error: float) -> tuple[Node, RewriteRecord]:
        capacity_factor = self.options.capacity_factor
        out, sources = insert_dispatch(gm, block, reading, capacity_factor)
        record = moe_record(block, reading, values, capacity_factor)
        record.details["sources"] = sources   # how each constant was built: compiler/reference.py inverts it
        return out, record


def describe(block: MoEBlock) -> str:
    """What was read of the block, as a skip reason says it: '8 experts, sigmoid top-3 in 2 of 4 groups, ...'."""
    routing, form = block.routing, block.expert_form
    groups = f" in {routing.topk_group} of {routing.n_group} groups" if routing.n_group > 1 else ""
    parts = [f"{block.num_experts} experts", f"{routing.scoring} top-{routing.top_k}{groups}",
             f"{form.activation} experts" + (" (gate/up interleaved)" if form.interleaved else "")]
    parts += ["expert biases"] * bool(block.biases) + ["shared expert"] * (block.shared is not None)
    return ", ".join(parts)


def routing_variants(block: MoEBlock) -> list:
    """The routing as read, then what the graph leaves open: the other normalisation, no scaling."""
    read = block.routing
    variants = [read, replace(read, normalize=not read.normalize)]
    if read.routed_scaling_factor != 1.0:
        variants += [replace(v, routed_scaling_factor=1.0) for v in variants]
    return variants


def analyse(gm: GraphModule, selection: Node, modules: Optional[dict[str, list[Node]]] = None) -> MoEBlock:
    path, region = find_block(gm, selection, modules)
    routing = read_routing(gm, selection)
    router = routing.router
    hidden = router.args[0]
    num_experts, width = router.meta["val"].shape[-1], hidden.meta["val"].shape[-1]
    consts = region_constants(gm, region)
    groups, others = per_expert_linears(region, path, router)
    if any(c.dim() == 3 for c in consts.values()):
        candidates, sources = stacked_candidates(consts, num_experts, width), []
    else:
        stacked, sources = per_expert_candidates(gm, groups, num_experts)
        candidates = [stacked]
    shared, shared_gate = shared_expert(gm, others, width)
    output = find_output(path, region, hidden, router)
    return MoEBlock(path, region, selection, routing, hidden, output, block_form(region, bool(not sources)),
                    candidates, read_expert_form(region), expert_biases(gm, region, num_experts), shared,
                    shared_gate, sources)


def moe_record(block: MoEBlock, reading: Reading, values: dict, capacity_factor: float) -> RewriteRecord:
    routing = reading.routing
    logits = values[routing.router]
    logits = logits.reshape(-1, logits.shape[-1])
    tokens, (num_experts, rows, width) = logits.shape[0], reading.w_gate_up.shape
    inner = reading.w_down.shape[2]
    dense_flops, dispatch_flops = moe_flops(tokens, width, inner, num_experts, routing.top_k, reading.gated)
    params = reading.w_gate_up.numel() + reading.w_down.numel()
    size = reading.w_gate_up.element_size()
    return RewriteRecord(
        layer=block.path or "<root>", op="sparsecc.moe", source_op=f"moe/{block.form}",
        pattern=f"E={num_experts},k={routing.top_k}", shape=[num_experts, rows, width], params_before=params,
        params_after=params, bytes_before=params * size, bytes_after=params * size,
        flops_before=dense_flops if block.form == "dense" else dispatch_flops, flops_after=dispatch_flops,
        details={**moe_details(block, reading), "capacity_factor": capacity_factor,
                 "pairs": tokens * routing.top_k, **routed_counts(block, reading, logits, capacity_factor)})


def routed_counts(block: MoEBlock, reading: Reading, logits: torch.Tensor, capacity_factor: float) -> dict:
    """Tokens per expert (min / median / max) and pairs over capacity on the example inputs; None for
    both when the logits are meta stand-ins (planned without weights: nothing was routed)."""
    if logits.is_meta:
        return {"tokens_per_expert": None, "dropped_pairs": None}
    routing = reading.routing
    _, experts = route(logits, routing.top_k, reading.normalize, routing.scoring, **routing.options())
    counts = torch.bincount(experts.flatten(), minlength=block.num_experts).tolist()
    dropped = int(capacity_mask(experts, block.num_experts, capacity_factor)[1]) if capacity_factor > 0 else 0
    return {"tokens_per_expert": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
            "dropped_pairs": dropped}


def moe_details(block: MoEBlock, reading: Reading) -> dict:
    """The report's view of what the block was read as: routing, expert form, shared expert."""
    routing, form = reading.routing, block.expert_form
    options = {k: v for k, v in routing.options().items() if not isinstance(v, torch.Tensor)}
    return {"form": block.form, "experts": block.num_experts, "top_k": routing.top_k, "scoring": routing.scoring,
            "normalize": reading.normalize, **options,
            "score_correction_bias": routing.score_correction_bias is not None,
            "activation": form.activation, "gated": reading.gated, "interleaved": form.interleaved, **form.options(),
            "expert_biases": reading.b_gate_up is not None or reading.b_down is not None,
            "shared_expert": block.shared is not None}


__all__ = ["MoEDispatch", "MoERule", "analyse", "describe", "moe_details", "moe_record", "routing_variants"]
