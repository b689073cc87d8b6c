"""`sparsecc::unroute`: the routed block's outputs put back among the tokens that skipped it.

    residual [B, S, *rest], rows [B, K, *rest], indices [B, K] int64 (from sparsecc::route)
    -> out [B, S, *rest],  out[b, indices[b, k]] = rows[b, k];  out[b, s] = residual[b, s] elsewhere

`rows` is the whole block output of the kept tokens (residual included), so
tokens that skipped the block ride the residual stream unchanged and, at
capacity 1, out is the dense block output bit for bit. rows are cast to
residual's dtype. CPU: one `index_copy_` into a copy of the residual; CUDA:
the Triton row-scatter kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.cpu.route import unroute_cpu, unroute_problem
from .registry import OpDef, has_data


def unroute_cuda(residual: Tensor, rows: Tensor, indices: Tensor) -> Tensor:
    from ..kernels.triton.route import unroute_triton
    return unroute_triton(residual, rows, indices)


@torch.library.custom_op("sparsecc::unroute", mutates_args=(), device_types="cpu")
def unroute(residual: Tensor, rows: Tensor, indices: Tensor) -> Tensor:
    return unroute_cpu(residual, rows, indices)


unroute.register_kernel("cuda")(unroute_cuda)


@unroute.register_fake
def _(residual, rows, indices):
    return residual.new_empty(residual.shape)


def verify_unroute(residual: Tensor, rows: Tensor, indices: Tensor) -> str | None:
    """Shapes always; a real (constant) indices tensor also has every index inside its sequence."""
    return unroute_problem(residual, rows, indices, check_data=has_data(indices))


def _samples() -> list[tuple]:
    sorted_pick = lambda b, s, k: torch.rand(b, s).argsort(-1)[:, :k].sort(-1).values
    return [(torch.randn(2, 9, 16), torch.randn(2, 4, 16), sorted_pick(2, 9, 4)),
            (torch.randn(3, 6, 8, dtype=torch.float16), torch.randn(3, 6, 8), sorted_pick(3, 6, 6))]


UNROUTE = OpDef(name="unroute", op=torch.ops.sparsecc.unroute.default,
                kernels={"torch": unroute_cpu, "triton": unroute_cuda},
                verify=verify_unroute, samples=_samples)
