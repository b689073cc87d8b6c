"""`moe-dispatch`: rewrite mixture-of-experts blocks, in any form, into `sparsecc::moe`.

For every router `topk`, `moe_regions.find_block` finds the block around it,
the router and expert weights are read off the graph, and each structurally
possible reading (weight orientation, gate/up order, normalisation) is
confirmed by running the dispatch on the block's own inputs from the example
inputs and comparing with the block's output there. The first reading that
reproduces the block to tolerance replaces it; a block none reproduces is left
as it was, with the reason in the report. The rewrite is exact.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.moe_routing import capacity_mask, route
from sparsecc.runtime.ops.moe import moe_flops

from .graph import module_path
from .manager import Pass, PassContext, PassResult, PassStats, Skip
from .moe_experts import per_expert_candidates, per_expert_linears, shared_expert, stacked_candidates
from .moe_regions import (MoEBlock, NotAnMoE, _region_constants, block_form, find_activation, find_block,
                          find_output, read_router, topk_nodes)
from .moe_rewrite import erase_region, insert_dispatch
from .numerics import relative_error
from .options import Bounds, OptionBounds
from .records import RewriteRecord
from .recording import record_values


@dataclass(frozen=True)
class MoEDispatch(Pass):
    name: ClassVar[str] = "moe-dispatch"
    capacity_factor: float = 0.0     # > 0: each expert takes at most ceil(cf * T * k / E) pairs
    tolerance: float = 1e-4          # relative error a confirmed reading may have (fp32; x100 for 16-bit)
    option_bounds: ClassVar[dict[str, OptionBounds]] = {"capacity_factor": Bounds(0), "tolerance": Bounds(0)}

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        stats, blocks = PassStats(), []
        for topk in topk_nodes(gm):
            try:
                blocks.append(analyse(gm, topk))
            except NotAnMoE as err:
                stats.skipped.append(Skip(_where(topk), "moe-dispatch", str(err)))
        blocks = _unique(blocks)
        stats.matched = len(blocks)
        values = record_values(gm, ctx, [n for b in blocks for n in (b.hidden, b.router, b.output)])
        for block in blocks:
            self._rewrite(gm, block, values, ctx, stats)
        return PassResult(gm, stats.rewritten > 0, stats)

    def _rewrite(self, gm, block: MoEBlock, values: dict, ctx: PassContext, stats: PassStats) -> None:
        reading, error = confirm(block, values, self.tolerance)   # structure is confirmed without capacity
        if reading is None:
            stats.skipped.append(Skip(block.path, "moe-dispatch", error))
            return
        insert_dispatch(gm, block, reading, self.capacity_factor)
        erase_region(gm, block)
        ctx.records.append(moe_record(block, reading, values, self.capacity_factor))
        stats.rewritten += 1


def _where(node: Node) -> str:
    return module_path(node) or node.name


def _unique(blocks: list[MoEBlock]) -> list[MoEBlock]:
    seen, out = set(), []
    for block in blocks:
        if block.path not in seen:
            seen.add(block.path)
            out.append(block)
    return out


def analyse(gm: GraphModule, topk: Node) -> MoEBlock:
    path, region = find_block(gm, topk)
    router, scoring, normalize = read_router(gm, topk)
    hidden = router.args[0]
    num_experts, width = router.meta["val"].shape[-1], hidden.meta["val"].shape[-1]
    consts = list(_region_constants(gm, region).values())
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


@dataclass(frozen=True)
class Reading:
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    gated: bool
    normalize: bool


def dispatch(block: MoEBlock, reading: Reading, hidden: torch.Tensor, logits: torch.Tensor,
             capacity_factor: float) -> torch.Tensor:
    shared = block.shared
    return torch.ops.sparsecc.moe(
        hidden.reshape(-1, hidden.shape[-1]), logits.reshape(-1, logits.shape[-1]),
        reading.w_gate_up, reading.w_down,
        shared.gate_up if shared else None, shared.down if shared else None, block.shared_gate,
        block.top_k, reading.normalize, block.scoring, block.activation, reading.gated, capacity_factor)


def confirm(block: MoEBlock, values: dict, tolerance: float) -> tuple[Optional[Reading], str]:
    """The first reading whose dispatch reproduces the block output, or None and the closest error."""
    hidden, logits, want = values[block.hidden], values[block.router], values[block.output]
    if hidden.dtype in (torch.float16, torch.bfloat16):
        tolerance *= 100
    best = float("inf")
    for gate_up, down, gated in block.expert_candidates:
        for normalize in (block.normalize, not block.normalize):
            reading = Reading(gate_up.contiguous(), down.contiguous(), gated, normalize)
            got = dispatch(block, reading, hidden.to(gate_up.dtype), logits, 0.0).to(want.dtype)
            error = relative_error(got, want.reshape(got.shape))
            if error <= tolerance:
                return reading, ""
            best = min(best, error)
    return None, (f"no dispatch of the recognised structure reproduces the block "
                  f"(closest relative error {best:.2e} > {tolerance:.0e})")


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
