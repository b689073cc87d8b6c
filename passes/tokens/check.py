"""Confirm a routed block before it replaces the dense one, and measure what routing costs.

The reading token routing confirms (`RoutedCopy`) is the block's body copied to
run on the kept tokens. `mlp` blocks must act token by token: the copy, run on
a random subset of the tokens, must reproduce those tokens' dense outputs (the
region driver's tolerance). `layer` blocks mix tokens by design; their copy
must reproduce the dense layer when every token is kept (this checks the
gathered rotary tables and mask), and must run at the routed token count.
`routed_error` is the relative L2 error of the routed block against the dense
one on the example inputs (the block's dense inputs), which the report shows per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from ..numerics import relative_error
from .blocks import NotRoutable, ResidualBlock, routed_body
from .body_copy import gather_input, standalone_body
from .routers import scores

ops = torch.ops.sparsecc


def _eager(target, *args):
    return target(*args)


def gathered_inputs(block: ResidualBlock, values: dict, indices: torch.Tensor) -> list[torch.Tensor]:
    """The copy's inputs restricted to `indices`: residual (and feature) rows, then each extra input."""
    batch, kept = indices.shape
    inputs = [ops.route_gather(values[node], indices) for node in routed_body(block)[1]]
    for extra, kind in zip(block.extra_inputs, block.extra_kinds):
        value = values[extra]
        inputs.append(gather_input(_eager, kind, value, indices, list(value.shape), batch, kept))
    return inputs


def run_routed(gm: GraphModule, block: ResidualBlock, values: dict, indices: torch.Tensor) -> torch.Tensor:
    """The body copy on the tokens in `indices`: [B, K, ...] block outputs."""
    batch, seq = values[block.residual].shape[:2]
    nodes, inputs = routed_body(block)
    body = standalone_body(gm, nodes, [*inputs, *block.extra_inputs], batch, seq, indices.shape[1])
    with torch.no_grad():
        return body(*gathered_inputs(block, values, indices))


@dataclass(frozen=True)
class RoutedCopy:
    """A block's body copied to run on `kept` of its `seq` tokens, per sequence of the batch."""
    block: ResidualBlock      # inputs moved past the blocks routed before it
    batch: int
    seq: int
    kept: int


def trial_tokens(copy: RoutedCopy) -> torch.Tensor:
    """[B, T] the tokens the copy is confirmed on: all of them (layer), else a fixed random subset."""
    batch, seq, kept = copy.batch, copy.seq, copy.kept
    if copy.block.where == "layer":
        return torch.arange(seq).expand(batch, seq).contiguous()
    trial = kept if kept < seq else max(1, seq // 2)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, seq, generator=generator).argsort(-1)[:, :trial].sort(-1).values


def reproduce(gm: GraphModule, copy: RoutedCopy, values: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the copy's outputs on the trial tokens, the dense block's outputs there)."""
    block, want = copy.block, values[copy.block.output]
    indices = trial_tokens(copy).to(want.device)
    try:
        got = run_routed(gm, block, values, indices)
        if block.where == "layer" and copy.kept < copy.seq:
            run_routed(gm, block, values, indices[:, :copy.kept])
    except Exception as err:  # noqa: BLE001 -- whatever the copied ops raise, the block stays dense, with the reason
        raise NotRoutable("the block's body does not run on a subset of the tokens (a size inside it is fixed to "
                          f"the {copy.batch}x{copy.seq} tokens it was captured with): {type(err).__name__}: {err}") \
            from err
    return got, ops.route_gather(want, indices)


def unconfirmed_reason(block: ResidualBlock, error: float, tolerance: float) -> str:
    if block.where == "layer":
        return f"the layer copy with every token kept differs from the layer by {error:.2e} (> {tolerance:.0e})"
    return (f"the block does not act token by token: on a subset of tokens it differs from the dense "
            f"block by {error:.2e} (> {tolerance:.0e})")


def routed_error(gm: GraphModule, block: ResidualBlock, values: dict, router: str, probe,
                 capacity: float) -> float:
    """Relative error of the routed block against the dense block on the example inputs."""
    passed = values[block.residual]
    for term in block.bypass:   # a parallel block's attention: what the tokens not routed still get
        passed = passed + values[term]
    indices = ops.route(scores(router, values[block.source], probe), capacity)
    got = ops.unroute(passed, run_routed(gm, block, values, indices), indices)
    return relative_error(got, values[block.output])


__all__ = ["RoutedCopy", "gathered_inputs", "reproduce", "routed_error", "run_routed", "trial_tokens",
           "unconfirmed_reason"]
