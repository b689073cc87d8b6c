"""`sparsecc::route_gather`: the rows of the kept tokens, as a shorter sequence.

    x [B, S, *rest] (or [1, S, *rest], shared by every sequence), indices [B, K] int64
    -> out [B, K, *rest],  out[b, k] = x[b, indices[b, k]]   (x[0, ...] when x's batch is 1)

CPU tensors run an `index_select` over the [B*S, D] rows; CUDA tensors the Triton
row-copy kernel (`kernels/triton/route.py`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.cpu.route import route_gather_cpu, route_gather_problem
from .registry import OpDef, has_data


def route_gather_cuda(x: Tensor, indices: Tensor) -> Tensor:
    from ..kernels.triton.route import route_gather_triton
    return route_gather_triton(x, indices)


@torch.library.custom_op("sparsecc::route_gather", mutates_args=(), device_types="cpu")
def route_gather(x: Tensor, indices: Tensor) -> Tensor:
    return route_gather_cpu(x, indices)


route_gather.register_kernel("cuda")(route_gather_cuda)


@route_gather.register_fake
def _(x, indices):
    return x.new_empty(indices.shape[0], indices.shape[1], *x.shape[2:])


def verify_route_gather(x: Tensor, indices: Tensor) -> str | None:
    """Shapes always; a real (constant) indices tensor also has every index inside its sequence."""
    return route_gather_problem(x, indices, check_data=has_data(indices))


def _samples() -> list[tuple]:
    sorted_pick = lambda b, s, k: torch.rand(b, s).argsort(-1)[:, :k].sort(-1).values
    return [(torch.randn(2, 9, 16), sorted_pick(2, 9, 4)),
            (torch.randn(1, 6, 8, dtype=torch.float16), sorted_pick(3, 6, 2)),
            (torch.randn(2, 5, 2, 3), sorted_pick(2, 5, 5))]


ROUTE_GATHER = OpDef(name="route_gather", op=torch.ops.sparsecc.route_gather.default,
                     kernels={"torch": route_gather_cpu, "triton": route_gather_cuda},
                     verify=verify_route_gather, samples=_samples)
