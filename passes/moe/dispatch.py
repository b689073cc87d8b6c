"""`moe-dispatch`: rewrite mixture-of-experts blocks, in any form, into `sparsecc::moe`.

For every router `topk`, `regions.find_block` finds the block around it,
the router and expert weights are read off the graph, and each structurally
possible reading (weight orientation, gate/up order, normalisation) is
confirmed by running the dispatch on the block's own inputs from the example
inputs and comparing with the block's output there. The first reading that
reproduces the block to tolerance replaces it; a block none reproduces is left
as it was, with the reason in the report. The rewrite is exact.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.moe_routing import capacity_mask, route
from sparsecc.runtime.ops.moe import moe_flops

from ..graph import layer_name
from ..manager import Pass, PassContext, PassResult
from ..options import Bounds, OptionBounds
from ..records import RewriteRecord
from ..region import RegionRule, rewrite_regions
from .experts import per_expert_candidates, per_expert_linears, shared_expert, stacked_candidates
from .reading import Reading, dispatch, insert_dispatch
from .regions import (MoEBlock, NotAnMoE, block_form, find_activation, find_block, find_output, read_router,
                      region_constants, topk_nodes)


@dataclass(frozen=True)
class MoEDispatch(Pass):
    name: ClassVar[str] = "moe-dispatch"
    capacity_factor: float = 0.0     # > 0: each expert takes at most ceil(cf * T * k / E) pairs
    tolerance: float = 1e-4          # relative error a confirmed reading may have (fp32; x100 for 16-bit)
    option_bounds: ClassVar[dict[str, OptionBounds]] = {"capacity_factor": Bounds(0), "tolerance": Bounds(0)}

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return rewrite_regions(gm, ctx, MoERule(self))


class MoERule(RegionRule):
    """Regions: MoE blocks, one per module around a router topk. Readings: the expert weight
    layouts the structure allows, each with and without top-k normalisation. Exact."""
    options: MoEDispatch

    def find(self, gm: GraphModule, ctx: PassContext) -> tuple[list[MoEBlock], list[tuple[str, str]]]:
        blocks, misses = {}, []
        for topk in topk_nodes(gm):
            try:
                block = analyse(gm, topk)
            except NotAnMoE as err:
                misses.append((layer_name(topk), str(err)))
                continue
            blocks.setdefault(block.path, block)   # one block per module, however many topks it has
        return list(blocks.values()), misses

    def recorded(self, block: MoEBlock) -> tuple[Node, ...]:
        return block.hidden, block.router, block.output

    def readings(self, gm: GraphModule, block: MoEBlock, values: dict) -> Iterator[Reading]:
        for gate_up, down, gated in block.expert_candidates:
            for normalize in (block.normalize, not block.normalize):
                yield Reading(gate_up.contiguous(), down.contiguous(), gated, normalize)

    def reproduce(self, gm: GraphModule, block: MoEBlock, reading: Reading, values: dict):
        hidden, logits, want = values[block.hidden], values[block.router], values[block.output]
        got = dispatch(block, reading, hidden.to(reading.w_gate_up.dtype), logits, 0.0).to(want.dtype)
        return got, want.reshape(got.shape)   # structure is confirmed without capacity

    def unconfirmed(self, block: MoEBlock, best: float, tolerance: float) -> str:
        return (f"no dispatch of the recognised structure reproduces the block "
                f"(closest relative error {best:.2e} > {tolerance:.0e})")

    def insert(self, gm: GraphModule, block: MoEBlock, reading: Reading, values: dict,
               error: float) -> tuple[Node, RewriteRecord]:
        capacity_factor = self.options.capacity_factor
        out = insert_dispatch(gm, block, reading, capacity_factor)
        return out, moe_record(block, reading, values, capacity_factor)


def analyse(gm: GraphModule, topk: Node) -> MoEBlock:
    path, region = find_block(gm, topk)
    router, scoring, normalize = read_router(gm, topk)
    hidden = router.args[0]
    num_experts, width = router.meta["val"].shape[-1], hidden.meta["val"].shape[-1]
    consts = list(region_constants(gm, region).values())
    groups, others = per_expert_linears(region, path, router)
    if any(c.dim() == 3 for c in consts):
        candidates, sources = stacked_candidates(consts, num_experts, width), []
    else:
        stacked, sources = per_expert_candidates(gm, groups, num_experts)
        candidates = [stacked]
    shared, shared_gate = shared_expert(gm, others, width)
    output = find_output(path, region, hidden, router)
    return MoEBlock(path, region, topk, router, hidden, output, block_form(region, bool(not sources)),
                    int(topk.args[1]), scoring, normalize, candidates, find_activation(region),
                    shared, shared_gate, sources)


def moe_record(block: MoEBlock, reading: Reading, values: dict, capacity_factor: float) -> RewriteRecord:
    logits = values[block.router]
    logits = logits.reshape(-1, logits.shape[-1])
    _, experts = route(logits, block.top_k, reading.normalize, block.scoring)
    counts = torch.bincount(experts.flatten(), minlength=block.num_experts).tolist()
    dropped = int(capacity_mask(experts, block.num_experts, capacity_factor)[1]) if capacity_factor > 0 else 0
    tokens, (num_experts, rows, width) = logits.shape[0], reading.w_gate_up.shape
    inner = reading.w_down.shape[2]
    dense_flops, dispatch_flops = moe_flops(tokens, width, inner, num_experts, block.top_k, reading.gated)
    params = reading.w_gate_up.numel() + reading.w_down.numel()
    size = reading.w_gate_up.element_size()
    return RewriteRecord(
        layer=block.path or "<root>", op="sparsecc.moe", source_op=f"moe/{block.form}", pattern=f"E={num_experts},k={block.top_k}",
        shape=[num_experts, rows, width], params_before=params, params_after=params,
        bytes_before=params * size, bytes_after=params * size,
        flops_before=dense_flops if block.form == "dense" else dispatch_flops, flops_after=dispatch_flops,
        details={"form": block.form, "experts": num_experts, "top_k": block.top_k, "scoring": block.scoring,
                 "normalize": reading.normalize, "activation": block.activation, "gated": reading.gated,
                 "shared_expert": block.shared is not None, "capacity_factor": capacity_factor,
                 "dropped_pairs": dropped, "pairs": tokens * block.top_k,
                 "tokens_per_expert": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)}})


__all__ = ["MoEDispatch", "MoERule", "analyse", "moe_record"]
