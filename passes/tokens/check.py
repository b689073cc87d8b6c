"""Confirm a routed block before it replaces the dense one, and measure what routing costs.

`mlp` blocks must act token by token: the body copy, run on a random subset of
the tokens, must reproduce those tokens' dense outputs (1e-4 relative; x100 in
16-bit). `layer` blocks mix tokens by design; their copy must reproduce the
dense layer when every token is kept (this checks the gathered rotary tables
and mask), and must run at the routed token count. `routed_error` is the
relative L2 error of the routed block against the dense one on the example
inputs (the block's dense inputs), which the report shows per block.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from .numerics import relative_error
from .token_routing_copy import gather_input, standalone_body
from .token_routing_regions import ResidualBlock, routed_body
from .token_routing_routers import scores

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


def confirm(gm: GraphModule, block: ResidualBlock, values: dict, kept: int, tolerance: float) -> str | None:
    """None when the copy is faithful (see the module docstring), else the reason."""
    h, want = values[block.residual], values[block.output]
    batch, seq = h.shape[:2]
    if h.dtype in (torch.float16, torch.bfloat16):
        tolerance *= 100
    if block.where == "layer":
        trial, indices = seq, torch.arange(seq).expand(batch, seq).contiguous()
    else:
        trial = kept if kept < seq else max(1, seq // 2)
        generator = torch.Generator().manual_seed(0)
        indices = torch.rand(batch, seq, generator=generator).argsort(-1)[:, :trial].sort(-1).values
    try:
        got = run_routed(gm, block, values, indices.to(h.device))
        if block.where == "layer" and kept < seq:
            run_routed(gm, block, values, indices[:, :kept].to(h.device))
    except Exception as err:  # noqa: BLE001 -- whatever the copied ops raise, the block stays dense, with the reason
        return f"the block's body does not run on a subset of the tokens: {type(err).__name__}: {err}"
    error = relative_error(got, ops.route_gather(want, indices.to(want.device)))
    if error <= tolerance:
        return None
    if block.where == "layer":
        return f"the layer copy with every token kept differs from the layer by {error:.2e} (> {tolerance:.0e})"
    return (f"the block does not act token by token: on a subset of tokens it differs from the dense "
            f"block by {error:.2e} (> {tolerance:.0e})")


def routed_error(gm: GraphModule, block: ResidualBlock, values: dict, router: str, probe,
                 capacity: float) -> float:
    """Relative error of the routed block against the dense block on the example inputs."""
    h = values[block.residual]
    indices = ops.route(scores(router, values[block.source], probe), capacity)
    got = ops.unroute(h, run_routed(gm, block, values, indices), indices)
    return relative_error(got, values[block.output])


__all__ = ["confirm", "gathered_inputs", "routed_error", "run_routed"]
