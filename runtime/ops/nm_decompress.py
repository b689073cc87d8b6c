"""`sparsecc::nm_decompress`: an N:M-compressed weight expanded to dense where an op needs it dense.

    dense[..., in_features] = decompress_nm(values [..., in_features*N/M], indices, n, m, in_features)

Used for stacked expert weights of `sparsecc::moe`: they stay compressed at rest
(in memory between calls and in saved programs) and are expanded per call. Layout:
`sparsecc.runtime.nm_format`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.checks import refuse
from ..nm_format import compress_nm, decompress_nm, nm_mask, nm_weight_problem
from .registry import OpDef, has_data


def nm_decompress_cpu(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    refuse("nm_decompress", nm_weight_problem(values, indices, n, m, in_features, check_data=True))
    return decompress_nm(values, indices, n, m, in_features)


def nm_decompress_cuda(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """The Triton decompression kernel over the rows of every leading index."""
    from ..kernels.triton.nm_linear import nm_decompress_triton
    refuse("nm_decompress", nm_weight_problem(values, indices, n, m, in_features, check_data=True))
    rows = values.reshape(-1, values.shape[-1])
    dense = nm_decompress_triton(rows, indices.reshape(-1, indices.shape[-1]), n, m, in_features)
    return dense.reshape(*values.shape[:-1], in_features)


@torch.library.custom_op("sparsecc::nm_decompress", mutates_args=(), device_types="cpu")
def nm_decompress(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    return nm_decompress_cpu(values, indices, n, m, in_features)


nm_decompress.register_kernel("cuda")(nm_decompress_cuda)


@nm_decompress.register_fake
def _(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    return values.new_empty(*values.shape[:-1], in_features)


def verify_nm_decompress(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Optional[str]:
    """None when the call is well formed, else why not (positions too when `indices` is a real constant)."""
    return nm_weight_problem(values, indices, n, m, in_features, check_data=has_data(indices))


def _samples() -> list[tuple]:
    calls = []
    for shape, (n, m) in (((4, 8, 32), (2, 4)), ((16, 64), (4, 8))):
        weight = torch.randn(*shape)
        values, indices = compress_nm(weight, n, m, mask=nm_mask(weight.abs(), n, m))
        calls.append((values, indices, n, m, shape[-1]))
    return calls


NM_DECOMPRESS = OpDef(name="nm_decompress", op=torch.ops.sparsecc.nm_decompress.default,
                      kernels={"torch": nm_decompress_cpu, "triton": nm_decompress_cuda},
                      verify=verify_nm_decompress, onnx_export="nm_decompress", attrs=("n", "m", "in_features"),
                      samples=_samples)
