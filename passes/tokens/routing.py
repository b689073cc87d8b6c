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
model bit for bit. Blocks are found by `blocks` (and `layers`); routers are in
`routers`; the copy is confirmed by `check`. By default the first and last blocks stay dense.
`decision="threshold"` routes each token whose score reaches a calibrated threshold instead
(causal, per token: decode), see `threshold`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.token_routing import kept_tokens

from ..manager import Pass, PassContext, PassResult
from ..numerics import relative_error
from ..options import Bounds, OptionBounds, OptionProblem
from ..records import RewriteRecord
from ..region import RegionRule, rewrite_regions
from ..rewriter import Rewriter
from .blocks import NotRoutable, ResidualBlock, routed_body
from .body_copy import copy_body, emitter, gather_input
from .check import RoutedCopy, reproduce, routed_error, unconfirmed_reason
from .flops import body_flops
from .layers import find_layer_blocks
from .parallel import find_mlp_blocks
from .routers import Probe, fit_probes, insert_scores, load_probes
from .threshold import (ThresholdCopy, calibrate_thresholds, insert_threshold_routing, reproduce_flat,
                        threshold_routed, token_dims)

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
    decision: Literal["topk", "threshold"] = "topk"   # top `capacity` of a call's tokens, or score >= threshold
    thresholds: tuple[float, ...] | None = None  # threshold: one per routed block in graph order; None: calibrate
    option_bounds: ClassVar[dict[str, OptionBounds]] = {
        "capacity": Bounds(0, 1, low_open=True), "tolerance": Bounds(0)}
    always_spelled: ClassVar[tuple[str, ...]] = ("capacity", "where", "router")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rule = RoutingRule(self)
        result = rewrite_regions(gm, ctx, rule)
        if rule.router_data:
            result.stats.extra["router_data"] = rule.router_data
        if rule.thresholds:   # every selected block's, routed or not: what a decode program is given
            result.stats.extra["thresholds"] = list(rule.thresholds.values())
        return result

    def options_problem(self) -> OptionProblem | None:
        if self.router == "weights" and not self.weights_file:
            return OptionProblem("weights_file", "router 'weights' needs weights_file (a .safetensors file)")
        if self.decision == "threshold" and self.where != "mlp":
            return OptionProblem("decision", "decision 'threshold' routes `mlp` blocks only (tokens run as one "
                                             "sequence; a routed layer would leave holes in the KV cache)")
        if self.thresholds is not None and self.decision != "threshold":
            return OptionProblem("thresholds", "thresholds need decision 'threshold'")
        return None

    def wanted(self, index: int, count: int, path: str) -> bool:
        """Whether `layers` selects the block at `index` of `count` (module path `path`)."""
        if self.layers is None:
            return 0 < index < count - 1
        for entry in self.layers:
            text = str(entry).strip()
            by_index = text.lstrip("-").isdigit() and int(text) % count == index
            if by_index or (not text.lstrip("-").isdigit() and fnmatch.fnmatchcase(path, text)):
                return True
        return False


class RoutingRule(RegionRule):
    """Regions: residual blocks `h + f(h)` the options select. Reading: the body copied to run on the
    kept tokens. The confirmed copy is inserted behind a router; blocks are routed in graph order,
    each reading the routed output of the one before."""
    options: TokenRouting

    def __init__(self, options: TokenRouting):
        super().__init__(options)
        self.probes: dict[str, Probe] = {}
        self.router_data = ""                 # where the probes' data came from, for the report
        self.replaced: dict[Node, Node] = {}  # a routed block's output -> its unroute (the next block's input)
        self.thresholds: dict[str, float] = {}   # decision threshold: per block path

    def find(self, gm: GraphModule, ctx: PassContext) -> tuple[list[ResidualBlock], list[tuple[str, str]]]:
        found, misses = find_layer_blocks(gm) if self.options.where == "layer" else find_mlp_blocks(gm)
        chosen = [b for i, b in enumerate(found) if self.options.wanted(i, len(found), b.path)]
        for block in found:
            if block not in chosen:
                why = "first/last block, kept dense by default (set layers to route it)" \
                    if self.options.layers is None else "not selected by layers"
                misses.append((block.path, why))
        self.probes, self.router_data = self._probes(gm, ctx, chosen)
        if self.options.decision == "threshold":
            self.thresholds = self._thresholds(gm, ctx, chosen)
        return chosen, misses

    def _thresholds(self, gm: GraphModule, ctx: PassContext, blocks: list[ResidualBlock]) -> dict[str, float]:
        """The given thresholds by block (graph order), else calibrated at `capacity` on the calibration data."""
        given = self.options.thresholds
        if given is not None:
            if len(given) != len(blocks):
                raise ValueError(f"token-routing: {len(given)} thresholds for {len(blocks)} routed blocks "
                                 f"({', '.join(b.path for b in blocks) or 'none'})")
            return {b.path: float(t) for b, t in zip(blocks, given)}
        if not blocks or ctx.shapes_only or (self.options.router != "norm" and not self.probes):
            return {}
        thresholds, source = calibrate_thresholds(gm, ctx, blocks, self.options.router, self.probes,
                                                  self.options.capacity)
        self.router_data = self.router_data or source
        return thresholds

    def _probes(self, gm: GraphModule, ctx: PassContext, blocks: list[ResidualBlock]) -> tuple[dict[str, Probe], str]:
        router = self.options.router
        if not blocks or router == "norm" or ctx.shapes_only:   # a plan fits no router: its blocks are skipped
            return {}, ""
        if router == "weights":
            return load_probes(self.options.weights_file, blocks), f"weights: {self.options.weights_file}"
        return fit_probes(gm, ctx, blocks)

    def recorded(self, block: ResidualBlock) -> tuple[Node, ...]:
        return block.residual, block.output, block.source, *block.extra_inputs

    def readings(self, gm: GraphModule, block: ResidualBlock, values: dict) -> Iterator[RoutedCopy | ThresholdCopy]:
        if self.options.decision == "threshold":
            yield self._threshold_reading(block, values)
            return
        shape = block.residual.meta["val"].shape
        if len(shape) < 3 or not all(isinstance(d, int) for d in shape[:2]):
            raise NotRoutable(f"residual {list(shape)} is not [B, S, H] with a static batch and sequence length")
        yield RoutedCopy(self._moved(block, values), int(shape[0]), int(shape[1]),
                         kept_tokens(int(shape[1]), self.options.capacity))

    def _moved(self, block: ResidualBlock, values: dict) -> ResidualBlock:
        """The block reading the routed outputs of the blocks before it."""
        moved = dataclasses.replace(block, residual=self.replaced.get(block.residual, block.residual),
                                    source=self.replaced.get(block.source, block.source))
        for old, new in self.replaced.items():   # values were recorded before earlier blocks were routed
            values.setdefault(new, values.get(old))
        return moved

    def _threshold_reading(self, block: ResidualBlock, values: dict) -> ThresholdCopy:
        token_dims(block)
        if block.path not in self.thresholds:
            raise NotRoutable("no threshold for the block (none given, none calibrated)")
        return ThresholdCopy(self._moved(block, values), self.thresholds[block.path])

    def reproduce(self, gm: GraphModule, block: ResidualBlock, copy: RoutedCopy | ThresholdCopy, values: dict):
        if isinstance(copy, ThresholdCopy):
            return reproduce_flat(gm, copy, values)
        return reproduce(gm, copy, values)

    def unconfirmed(self, block: ResidualBlock, best: float, tolerance: float) -> str:
        return unconfirmed_reason(block, best, tolerance)

    def insert(self, gm: GraphModule, block: ResidualBlock, copy: RoutedCopy, values: dict,
               error: float) -> tuple[Node, RewriteRecord]:
        options, probe = self.options, self.probes.get(block.path)
        if isinstance(copy, ThresholdCopy):
            return self._insert_threshold(gm, block, copy, values)
        error = routed_error(gm, copy.block, values, options.router, probe, options.capacity)
        flops_before = body_flops(block.body)
        out, created = insert_routing(gm, copy, options.router, probe, options.capacity)
        self.replaced[block.output] = out
        return out, self.record(copy, probe, error, flops_before, body_flops(created))

    def _insert_threshold(self, gm: GraphModule, block: ResidualBlock, copy: ThresholdCopy,
                          values: dict) -> tuple[Node, RewriteRecord]:
        """Threshold decisions: the record's `kept` / `tokens` count every token of the batch."""
        probe = self.probes.get(block.path)
        routed, passed = threshold_routed(gm, copy.block, values, self.options.router, probe, copy.threshold)
        error = relative_error(routed, values[block.output])
        flops_before = body_flops(block.body)
        out, _ = insert_threshold_routing(gm, copy, self.options.router, probe)
        self.replaced[block.output] = out
        shape = values[block.residual].shape
        batch, seq, total = int(shape[0]), int(shape[1]), int(shape[0]) * int(shape[1])
        routed_flops = flops_before * passed // max(1, total) + (0 if probe is None else 2 * total * shape[-1])
        record = self.record(RoutedCopy(copy.block, batch, seq, passed), probe, error, flops_before, routed_flops)
        record.pattern = f"threshold={copy.threshold:.4g}"
        record.details.update(decision="threshold", threshold=copy.threshold, tokens=total,
                              routed_fraction=passed / max(1, total))
        return out, record

    def record(self, copy: RoutedCopy, probe: Probe | None, error: float, flops: int,
               routed_flops: int) -> RewriteRecord:
        """FLOPs: the dense body's vs the nodes routing made (body copy at K tokens, probe linear)
        plus, for the norm router, 2*B*S*H for the scores."""
        options, block, batch, seq = self.options, copy.block, copy.batch, copy.seq
        width = int(block.source.meta["val"].shape[-1])
        flops_after = routed_flops + (2 * batch * seq * width if options.router == "norm" else 0)
        params = 0 if probe is None else width + 1
        details = {"router": options.router, "capacity": options.capacity, "where": options.where, "tokens": seq,
                   "kept": copy.kept, "batch": batch, "block_error": error, "reference": "unavailable",
                   "flops_saved": flops - flops_after}
        if probe is not None and probe.fit_r2 is not None:
            details["probe_r2"] = probe.fit_r2
        details["router_data"] = self.router_data
        return RewriteRecord(
            layer=block.path or "<root>", op="sparsecc.route", source_op=f"residual/{options.where}",
            pattern=f"capacity={options.capacity:g}", shape=[batch, seq, width], params_before=0,
            params_after=params, bytes_before=0, bytes_after=params * 4, flops_before=flops,
            flops_after=flops_after, details=details)


def insert_routing(gm: GraphModule, copy: RoutedCopy, router: str, probe: Probe | None,
                   capacity: float) -> tuple[Node, list[Node]]:
    """Insert scores -> route -> gathers -> body copy -> unroute; returns (unroute node, nodes made)."""
    block, batch, seq, kept = copy.block, copy.batch, copy.seq, copy.kept
    rw = Rewriter(gm, block.output)
    indices = rw.call(ops.route.default, insert_scores(rw, block, router, probe), capacity)
    nodes, inputs = routed_body(block)
    env = {node: rw.call(ops.route_gather.default, node, indices) for node in inputs}
    for extra, kind in zip(block.extra_inputs, block.extra_kinds):   # layer: rotary tables, mask
        shape = [int(d) for d in extra.meta["val"].shape]
        env[extra] = gather_input(rw.call, kind, extra, indices, shape, batch, kept)

    rows = copy_body(nodes, env, emitter(rw.call), batch, seq, kept)
    passed = block.residual
    for term in block.bypass:   # a parallel block's attention: what the tokens not routed still get
        passed = rw.call(torch.ops.aten.add.Tensor, passed, term)
    out = rw.call(ops.unroute.default, passed, rows, indices)
    return out, list(rw.created)


__all__ = ["RoutingRule", "TokenRouting", "insert_routing"]
