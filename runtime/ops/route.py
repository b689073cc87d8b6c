"""`sparsecc::route`: which tokens of each sequence pass through a routed block.

    scores [B, S] (any float dtype) -> indices [B, K] int64
    K = ceil(capacity * S), clamped to 1..S (static for a given S)
    indices[b] = the positions of the K largest scores[b], in increasing order

Increasing order keeps the kept tokens in their original causal order, so a
routed attention layer can stay causal among them. NaN scores never win.
Same code on every device (topk + sort); `route_gather` / `unroute` move the rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.cpu.route import route_cpu, route_problem
from ..token_routing import kept_tokens
from .registry import OpDef


@torch.library.custom_op("sparsecc::route", mutates_args=())
def route(scores: Tensor, capacity: float) -> Tensor:
    return route_cpu(scores, capacity)


@route.register_fake
def _(scores, capacity):
    return scores.new_empty(scores.shape[0], kept_tokens(int(scores.shape[-1]), capacity), dtype=torch.int64)


def verify_route(scores: Tensor, capacity: float) -> str | None:
    return route_problem(scores, capacity)


def route_reference(scores: Tensor, capacity: float) -> Tensor:
    """The semantics above, one sequence at a time with a stable full sort (for tests)."""
    kept = kept_tokens(scores.shape[-1], capacity)
    rows = []
    for row in torch.nan_to_num(scores.float(), nan=-float("inf")):
        order = torch.sort(row, descending=True, stable=True).indices[:kept]
        rows.append(order.sort().values)
    return torch.stack(rows)


def _samples() -> list[tuple]:
    return [(torch.randn(2, 10), 0.5), (torch.randn(3, 7, dtype=torch.float16), 0.25),
            (torch.randn(1, 5), 1.0), (torch.randn(2, 3), 0.01)]


ROUTE = OpDef(name="route", op=torch.ops.sparsecc.route.default,
              kernels={"torch": route_cpu, "triton": route_cpu},
              verify=verify_route, attrs=("capacity",), samples=_samples)
