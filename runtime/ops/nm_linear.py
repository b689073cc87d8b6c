"""`sparsecc::nm_linear`: a linear layer whose weight is stored N:M-compressed.

    y[..., out] = x[..., in_features] @ decompress_nm(values, indices).T + bias

`values [out, in_features*N/M]` and `indices [out, nm_index_bytes]` are the
layout defined in `sparsecc.runtime.nm_format`. y has x's dtype. `keep`
("memory" | "speed") says whether the runtime may keep a dense copy of the
weight where that measures faster (CPU; "memory": never). CPU tensors run the
path measured fastest per layer and token bucket (`kernels/cpu/nm_paths.py`:
the MLIR-generated decode kernel, the whole weight or 256-row tiles decompressed
into a workspace + MKL, or the dense copy);
CUDA tensors run the path autotuned for the shape (`kernels/nm_autotune.py`): the Triton launcher (the fused kernel up to 16
tokens, Triton decompression + cuBLAS above), cuSPARSELt's 2:4 GEMM called
directly, torch's 2:4 semi-structured GEMM, or (keep="speed") a dense copy. Inference only: no autograd formula is registered.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.cpu.nm_linear import instruction_call, nm_linear_cpu, nm_linear_problem
from .registry import OpDef, has_data


def nm_linear_triton(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                     n: int, m: int, in_features: int, keep: str = "memory") -> Tensor:
    """The CUDA path: Triton, cuSPARSELt, torch's 2:4 semi-structured or a dense copy, autotuned per shape
    (kernels/nm_autotune.py);
    the Triton kernel alone on CPU tensors (TRITON_INTERPRET=1). Imported on first call to keep the registry cheap."""
    if x.is_cuda:
        from ..kernels.nm_autotune import nm_linear_cuda
        return nm_linear_cuda(x, values, indices, bias, n, m, in_features, keep)
    from ..kernels.triton.nm_linear import nm_linear_triton as launch
    return launch(x, values, indices, bias, n, m, in_features)


@torch.library.custom_op("sparsecc::nm_linear", mutates_args=(), device_types="cpu")
def nm_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
              n: int, m: int, in_features: int, keep: str = "memory") -> Tensor:
    return nm_linear_cpu(x, values, indices, bias, n, m, in_features, keep)


nm_linear.register_kernel("cuda")(nm_linear_triton)


@nm_linear.register_fake
def _(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
      n: int, m: int, in_features: int, keep: str = "memory") -> Tensor:
    return x.new_empty(*x.shape[:-1], values.shape[0])


def verify_nm_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                     n: int, m: int, in_features: int, keep: str = "memory") -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found; a real `indices` constant
    also has its packed positions checked (every one < M, distinct per group)."""
    return nm_linear_problem(x, values, indices, bias, n, m, in_features, check_data=has_data(indices), keep=keep)


def _samples() -> list[tuple]:
    from ..nm_format import compress_nm, nm_mask
    calls = []
    for (n, m), x_shape, dtype, has_bias in [((2, 4), (5, 32), torch.float32, True),
                                              ((1, 8), (2, 3, 32), torch.float32, False),
                                              ((4, 16), (1, 32), torch.bfloat16, True)]:
        weight = torch.randn(24, 32, dtype=dtype)
        values, indices = compress_nm(weight, n, m, mask=nm_mask(weight.abs(), n, m))
        bias = torch.randn(24, dtype=dtype) if has_bias else None
        calls.append((torch.randn(*x_shape, dtype=dtype), values, indices, bias, n, m, 32))
    return calls


NM_LINEAR = OpDef(name="nm_linear", op=torch.ops.sparsecc.nm_linear.default,
                  kernels={"torch": nm_linear_cpu, "triton": nm_linear_triton},
                  verify=verify_nm_linear, onnx_export="nm_linear", attrs=("n", "m", "in_features"),
                  samples=_samples, instruction_kernels={"torch": instruction_call})
