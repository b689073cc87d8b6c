"""Threshold decisions: a token runs a routed block when its router score reaches the block's threshold.

    s    = router(n)                                        [B, S]
    idx  = transpose(nonzero(view(s, [-1]) >= t))           [1, N]   token numbers b*S + s, increasing
    rows = f'(route_gather(view(h, [1, -1, H]), idx), ...)  [1, N, H]   f': the body copied for N tokens
    out  = view(unroute(view(h, [1, -1, H]), rows, idx), h's shape)

Each token's decision depends on its own score only (causal, no coupling between the sequences of a
batch), so it fits decode (one token per sequence) and a prefill of any length; N is data-dependent.
The copy runs the tokens that pass as one sequence: shape literals `[B, S, ...]` become `[1, N, ...]`
and `[B*S, ...]` become `[N, ...]`, so only blocks that act token by token (`where="mlp"`) qualify.

A block's threshold is calibrated as the score `capacity` of the calibration tokens reach: with M
scores (every token of every batch, of the dense model), the K-th largest, K = kept_tokens(M, capacity);
ties at the threshold all pass. The generator calibrates on the prefill program and hands the
thresholds to the decode program (the pass option `thresholds`, one per routed block in graph order).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from sparsecc.runtime.token_routing import kept_tokens

from ..calibration import calibration_batches
from ..manager import PassContext
from ..region import record_values
from ..rewriter import Rewriter
from .blocks import NotRoutable, ResidualBlock, routed_body
from .body_copy import copy_nodes, emitter, standalone_graph
from .routers import Probe, insert_scores, scores

aten = torch.ops.aten
ops = torch.ops.sparsecc


@dataclass(frozen=True)
class ThresholdCopy:
    """A block's body copied to run on the tokens whose score reaches `threshold`."""
    block: ResidualBlock      # inputs moved past the blocks routed before it
    threshold: float


def calibrated_threshold(token_scores: Tensor, capacity: float) -> float:
    """The K-th largest of the scores, K = kept_tokens(#scores, capacity): `capacity` of them reach it."""
    flat = torch.nan_to_num(token_scores.float().reshape(-1), nan=-float("inf"))
    return float(flat.topk(kept_tokens(flat.numel(), capacity)).values[-1])


def passing_tokens(token_scores: Tensor, threshold: float) -> Tensor:
    """[1, N] int64: the flat numbers b*S + s of the tokens whose score >= threshold, increasing (NaN fails)."""
    return torch.nonzero(token_scores.reshape(-1) >= threshold).T


def calibrate_thresholds(gm: GraphModule, ctx: PassContext, blocks: list[ResidualBlock], router: str,
                         probes: dict[str, Probe], capacity: float) -> tuple[dict[str, float], str]:
    """Per block path, the threshold from the scores of the calibration batches (the example inputs without)."""
    batches, source = calibration_batches(ctx, "token-routing")
    collected: dict[str, list[Tensor]] = {b.path: [] for b in blocks}
    for index, batch in enumerate(batches):
        try:
            values = record_values(gm, batch, [b.source for b in blocks])
        except Exception as err:  # the graph's own error, re-raised naming the batch
            raise ValueError(f"token-routing: calibration batch {index} does not run through the captured "
                             f"graph: {err}") from err
        for b in blocks:
            collected[b.path].append(scores(router, values[b.source], probes.get(b.path)).reshape(-1))
    return {path: calibrated_threshold(torch.cat(s), capacity) for path, s in collected.items()}, source


def _size_of(value: Any) -> Any:
    """A shape literal entry's size: an int, or the SymInt of a size node."""
    return value.meta.get("val") if isinstance(value, Node) else value


def _same_size(value: Any, want: Any) -> bool:
    size = _size_of(value)
    if isinstance(size, torch.SymInt) or isinstance(want, torch.SymInt):
        return isinstance(size, (int, torch.SymInt)) and str(size) == str(want)
    return isinstance(size, int) and not isinstance(size, bool) and size == want


def rescale_flat(shape: Any, batch: Any, seq: Any, count: Any) -> Any:
    """A literal `[B, S, ...]` becomes `[1, N, ...]`, else a leading `B*S` becomes `N`; other literals stay.
    `[B, S, ...]` is tried first: at B = S = 1 (decode, one row) a leading 1 is also B*S."""
    if not isinstance(shape, (list, tuple)) or not shape:
        return shape
    if len(shape) >= 2 and _same_size(shape[0], batch) and _same_size(shape[1], seq):
        return [1, count, *shape[2:]]
    if _same_size(shape[0], batch * seq):
        return [count, *shape[1:]]
    return list(shape)


def copy_flat_body(body: list[Node], env: dict[Node, Any], emit: Callable[[Node, tuple, dict], Node],
                   batch: Any, seq: Any, count: Any) -> Node:
    """Re-emit `body` in order through `emit` for N tokens as one sequence; returns the last copy."""
    return copy_nodes(body, env, emit, lambda shape: rescale_flat(shape, batch, seq, count))


def token_dims(block: ResidualBlock) -> tuple[Any, Any, list[int]]:
    """(B, S, rest) of the residual [B, S, *rest]; rest must be static and B or S too."""
    shape = list(block.residual.meta["val"].shape)
    if len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
        raise NotRoutable(f"residual {shape} is not [B, S, H] with static feature dims")
    if not (isinstance(shape[0], int) or isinstance(shape[1], int)):
        raise NotRoutable(f"residual {shape}: threshold routing needs a static batch or sequence length")
    if block.where != "mlp" or any(kind != "rows" for kind in block.extra_kinds):
        raise NotRoutable("threshold routing runs the passing tokens as one sequence: `mlp` blocks only")
    return shape[0], shape[1], [int(d) for d in shape[2:]]


def run_flat(gm: GraphModule, block: ResidualBlock, values: dict, tokens: Tensor) -> Tensor:
    """The body copy on the flat tokens [1, N] (eager, on recorded values): [1, N, ...] block outputs."""
    batch, seq = values[block.residual].shape[:2]
    nodes, inputs = routed_body(block)
    inputs = [*inputs, *block.extra_inputs]
    count = int(tokens.shape[1])
    body = standalone_graph(gm, nodes, inputs,
                            lambda b, env, emit: copy_flat_body(b, env, emit, int(batch), int(seq), count))
    gathered = [ops.route_gather(_flat(values[n]), tokens) for n in inputs]
    with torch.no_grad():
        return body(*gathered)


def _flat(value: Tensor) -> Tensor:
    return value.reshape(1, value.shape[0] * value.shape[1], *value.shape[2:])


def reproduce_flat(gm: GraphModule, copy: ThresholdCopy, values: dict) -> tuple[Tensor, Tensor]:
    """(the copy on a fixed random half of the tokens, the dense block there): is it token by token?"""
    want = _flat(values[copy.block.output])
    total = want.shape[1]
    generator = torch.Generator().manual_seed(0)
    trial = torch.rand(total, generator=generator).argsort()[:max(1, total // 2)].sort().values[None]
    try:
        got = run_flat(gm, copy.block, values, trial.to(want.device))
    except Exception as err:  # noqa: BLE001 -- whatever the copied ops raise, the block stays dense, with the reason
        raise NotRoutable("the block's body does not run on a subset of the tokens (a size inside it is fixed to "
                          f"the tokens it was captured with): {type(err).__name__}: {err}") from err
    return got, ops.route_gather(want, trial.to(want.device))


def threshold_routed(gm: GraphModule, block: ResidualBlock, values: dict, router: str, probe: Probe | None,
                     threshold: float) -> tuple[Tensor, int]:
    """(the routed block's output on the recorded values, how many tokens passed)."""
    passed = values[block.residual]
    for term in block.bypass:   # a parallel block's attention: what the tokens not routed still get
        passed = passed + values[term]
    tokens = passing_tokens(scores(router, values[block.source], probe), threshold)
    out = ops.unroute(_flat(passed), run_flat(gm, block, values, tokens), tokens)
    return out.reshape(passed.shape), int(tokens.shape[1])


def insert_threshold_routing(gm: GraphModule, copy: ThresholdCopy, router: str,
                             probe: Probe | None) -> tuple[Node, list[Node]]:
    """Insert scores -> passing tokens -> gathers -> body copy -> unroute; returns (out node, nodes made)."""
    block = copy.block
    batch, seq, rest = token_dims(block)
    rw = Rewriter(gm, block.output)
    flat_scores = rw.call(aten.view.default, insert_scores(rw, block, router, probe), [-1])
    picked = rw.call(aten.nonzero.default, rw.call(aten.ge.Scalar, flat_scores, copy.threshold))
    tokens = rw.call(aten.transpose.int, picked, 0, 1)
    count = rw.call(aten.sym_size.int, tokens, 1)
    torch._check(count.meta["val"] <= batch * seq)   # N <= B*S: lets the route ops' shape checks decide
    flat = lambda node: rw.call(aten.reshape.default, node, [1, -1, *rest])
    nodes, inputs = routed_body(block)
    env = {node: rw.call(ops.route_gather.default, flat(node), tokens) for node in [*inputs, *block.extra_inputs]}

    rows = copy_flat_body(nodes, env, emitter(rw.call), batch, seq, count)
    passed = block.residual
    for term in block.bypass:
        passed = rw.call(aten.add.Tensor, passed, term)
    out = rw.call(ops.unroute.default, flat(passed), rows, tokens)
    shape = [batch, -1, *rest] if isinstance(batch, int) else [-1, seq, *rest]
    return rw.call(aten.view.default, out, shape), list(rw.created)


__all__ = ["ThresholdCopy", "calibrate_thresholds", "calibrated_threshold", "copy_flat_body",
           "insert_threshold_routing", "passing_tokens", "reproduce_flat", "rescale_flat", "run_flat",
           "threshold_routed", "token_dims"]
