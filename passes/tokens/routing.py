"""`token-routing`: let only the top `capacity` fraction of tokens through residual blocks.

    out = h + f(h)   becomes   s   = router(n)                 [B, S]   n: the block's normalised input
                               idx = sparsecc.route(s, capacity) [B, K]  K = ceil(capacity * S)
                               out = sparsecc.unroute(h, f'(gather(h, idx)), idx)

where f' is a copy of the block's body (the residual add included) running on
K tokens, and tokens that were not picked ride the residual stream unchanged
(Mixture-of-Depths / token-wise pruning, without training). Lossy: each block
is first confirmed to act token by token (its copy on a random subset of
tokens must reproduce those tokens' outputs), then its error against the dense
block on the example inputs is reported. At capacity 1 the result is the dense
model bit for bit. Blocks are found by `token_routing_regions`; routers are in
`token_routing_routers`. By default the first and last blocks stay dense.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from sparsecc.runtime.kernels.cpu.route import kept_tokens
from torch.fx import GraphModule, Node

from .manager import Pass, PassContext, PassResult, PassStats, Skip
from .options import Bounds, OptionBounds
from .recording import record_values
from .records import RewriteRecord
from .rewriter import Rewriter
from .token_routing_check import confirm, routed_error
from .token_routing_copy import copy_body, gather_input
from .token_routing_flops import body_flops
from .token_routing_regions import ASSERTS, ResidualBlock, find_mlp_blocks, routed_body
from .token_routing_routers import (
    ROUTERS,
    Probe,
    fit_probes,
    insert_scores,
    load_probes,
)

ops = torch.ops.sparsecc


@dataclass(frozen=True)
class TokenRouting(Pass):
    name: ClassVar[str] = "token-routing"
    capacity: float = 0.5
    where: Literal["mlp", "layer"] = "mlp"
    router: Literal["norm", "calibrated", "weights"] = "norm"
    layers: tuple[str, ...] | None = None   # block indices ("2", "-1") or module globs; None: all but first/last
    weights_file: str = ""                     # router "weights": safetensors with <block>.router.weight/bias
    tolerance: float = 1e-4                    # token-wise confirmation (fp32; x100 for 16-bit)
    option_bounds: ClassVar[dict[str, OptionBounds]] = {
        "capacity": Bounds(0, 1, low_open=True), "tolerance": Bounds(0)}

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        found, misses = self._find(gm)
        stats = PassStats(skipped=[Skip(where, self.name, reason) for where, reason in misses])
        blocks = self._select(found, stats)
        stats.matched = len(blocks)
        probes, source = self._probes(gm, ctx, blocks)
        if source:
            stats.extra["router_data"] = source
        wanted = [n for b in blocks for n in (b.residual, b.output, b.source, *b.extra_inputs)]
        values = record_values(gm, ctx, wanted)
        replaced: dict[Node, Node] = {}   # a routed block's output -> its unroute (the next block's input)
        first_record = len(ctx.records)
        for block in blocks:
            self._rewrite(gm, block, values, probes.get(block.path), ctx, stats, replaced)
        for record in ctx.records[first_record:]:
            record.details["router_data"] = source
        return PassResult(gm, stats.rewritten > 0, stats)

    def options_problem(self) -> str | None:
        if self.router not in ROUTERS:
            return f"unknown router {self.router!r} (available: {', '.join(ROUTERS)})"
        if self.where not in ("mlp", "layer"):
            return f"where must be mlp or layer, got {self.where!r}"
        if self.router == "weights" and not self.weights_file:
            return "router 'weights' needs weights_file (a .safetensors file)"
        return None

    def _find(self, gm: GraphModule) -> tuple[list[ResidualBlock], list[tuple[str, str]]]:
        if self.where == "layer":
            from .token_routing_layers import find_layer_blocks
            return find_layer_blocks(gm)
        return find_mlp_blocks(gm)

    def _select(self, found: list[ResidualBlock], stats: PassStats) -> list[ResidualBlock]:
        chosen = [b for i, b in enumerate(found) if self._wanted(i, len(found), b.path)]
        for block in found:
            if block not in chosen:
                why = "first/last block, kept dense by default (set layers to route it)" if self.layers is None \
                    else "not selected by layers"
                stats.skipped.append(Skip(block.path, self.name, why))
        return chosen

    def _wanted(self, index: int, count: int, path: str) -> bool:
        if self.layers is None:
            return 0 < index < count - 1
        for entry in self.layers:
            text = str(entry).strip()
            by_index = text.lstrip("-").isdigit() and int(text) % count == index
            if by_index or (not text.lstrip("-").isdigit() and fnmatch.fnmatchcase(path, text)):
                return True
        return False

    def _probes(self, gm, ctx, blocks: list[ResidualBlock]) -> tuple[dict[str, Probe], str]:
        if not blocks or self.router == "norm":
            return {}, ""
        if self.router == "weights":
            return load_probes(self.weights_file, blocks), f"weights: {self.weights_file}"
        return fit_probes(gm, ctx, blocks)

    def _rewrite(self, gm, block: ResidualBlock, values: dict, probe: Probe | None, ctx: PassContext,
                 stats: PassStats, replaced: dict[Node, Node]) -> None:
        shape = block.residual.meta["val"].shape
        if len(shape) < 3 or not all(isinstance(d, int) for d in shape[:2]):
            stats.skipped.append(Skip(block.path, self.name, f"residual {list(shape)} is not [B, S, H] with a "
                                                             "static batch and sequence length"))
            return
        batch, seq = int(shape[0]), int(shape[1])
        kept = kept_tokens(seq, self.capacity)
        block = dataclasses.replace(block, residual=replaced.get(block.residual, block.residual),
                                    source=replaced.get(block.source, block.source))
        for old, new in replaced.items():   # values were recorded before earlier blocks were routed
            values.setdefault(new, values.get(old))
        problem = confirm(gm, block, values, kept, self.tolerance)
        if problem:
            stats.skipped.append(Skip(block.path, self.name, problem))
            return
        error = routed_error(gm, block, values, self.router, probe, self.capacity)
        flops_before = body_flops(block.body)
        replaced[block.output], created = insert_routing(gm, block, self.router, probe, self.capacity, batch, seq,
                                                         kept)
        record = self._record(block, probe, batch, seq, kept, error, flops_before, body_flops(created))
        ctx.records.append(record)
        stats.rewritten += 1

    def _record(self, block: ResidualBlock, probe, batch: int, seq: int, kept: int, error: float,
                flops: int, routed_flops: int) -> RewriteRecord:
        """FLOPs: the dense body's vs the nodes routing made (body copy at K tokens, probe linear)
        plus, for the norm router, 2*B*S*H for the scores."""
        width = int(block.source.meta["val"].shape[-1])
        flops_after = routed_flops + (2 * batch * seq * width if self.router == "norm" else 0)
        params = 0 if probe is None else width + 1
        details = {"router": self.router, "capacity": self.capacity, "where": self.where, "tokens": seq,
                   "kept": kept, "batch": batch, "block_error": error, "reference": "unavailable",
                   "flops_saved": flops - flops_after}
        if probe is not None and probe.fit_r2 is not None:
            details["probe_r2"] = probe.fit_r2
        return RewriteRecord(
            layer=block.path or "<root>", op="sparsecc.route", source_op=f"residual/{self.where}",
            pattern=f"capacity={self.capacity:g}", shape=[batch, seq, width], params_before=0,
            params_after=params, bytes_before=0, bytes_after=params * 4, flops_before=flops,
            flops_after=flops_after, details=details)


def insert_routing(gm, block: ResidualBlock, router: str, probe, capacity: float, batch: int, seq: int,
                   kept: int) -> tuple[Node, list[Node]]:
    """Insert scores -> route -> gathers -> body copy -> unroute; returns (unroute node, nodes made)."""
    rw = Rewriter(gm, block.output)
    indices = rw.call(ops.route.default, insert_scores(rw, block, router, probe), capacity)
    nodes, inputs = routed_body(block)
    env = {node: rw.call(ops.route_gather.default, node, indices) for node in inputs}
    for extra, kind in zip(block.extra_inputs, block.extra_kinds):   # layer: rotary tables, mask
        shape = [int(d) for d in extra.meta["val"].shape]
        env[extra] = gather_input(rw.call, kind, extra, indices, shape, batch, kept)

    def emit(node: Node, args: tuple, kwargs: dict) -> Node:
        copy = rw.call(node.target, *args, **kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                copy.meta[key] = node.meta[key]
        return copy

    rows = copy_body(nodes, env, emit, batch, seq, kept)
    out = rw.call(ops.unroute.default, block.residual, rows, indices)
    block.output.replace_all_uses_with(out)
    _erase(gm, block)
    return out, list(rw.created)


def _erase(gm: GraphModule, block: ResidualBlock) -> None:
    """Erase the dense body (shape asserts on it included); nothing outside reads it any more."""
    inside = set(block.body)
    for node in reversed(block.body):
        for user in [u for u in node.users if u.target in ASSERTS]:
            gm.graph.erase_node(user)
        if not node.users and node in inside:
            gm.graph.erase_node(node)


__all__ = ["TokenRouting", "insert_routing"]
