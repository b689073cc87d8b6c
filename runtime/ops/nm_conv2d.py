"""`sparsecc::nm_conv2d`: a 2-D convolution (groups=1) whose weight is stored N:M-compressed.

    y = conv2d(x, W, bias, stride, padding, dilation),
    W = decompress_nm(values, indices).reshape(out, C, kh, kw)

`values [out, in_features*N/M]`, `indices [out, nm_index_bytes]` compress
W.reshape(out, C*kh*kw) in the layout of `sparsecc.runtime.nm_format`
(in_features = C*kh*kw, the im2col reduction dim). x is [B, C, H, W] or
[C, H, W]; y has x's dtype. CPU runs im2col + the blocked N:M linear; CUDA
runs im2col + the nm_linear CUDA path. Inference only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.cpu.nm_conv2d import conv_out_size, nm_conv2d_cpu, nm_conv2d_with, nm_conv2d_problem
from .nm_linear import nm_linear_triton
from .registry import OpDef, has_data


def nm_conv2d_triton(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                     in_features: int, kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int]) -> Tensor:
    """im2col + the nm_linear CUDA/Triton path."""
    return nm_conv2d_with(nm_linear_triton, x, values, indices, bias, n, m, in_features,
                          kernel_size, stride, padding, dilation)


@torch.library.custom_op("sparsecc::nm_conv2d", mutates_args=(), device_types="cpu")
def nm_conv2d(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
              in_features: int, kernel_size: list[int], stride: list[int], padding: list[int],
              dilation: list[int]) -> Tensor:
    return nm_conv2d_cpu(x, values, indices, bias, n, m, in_features, kernel_size, stride, padding, dilation)


nm_conv2d.register_kernel("cuda")(nm_conv2d_triton)


@nm_conv2d.register_fake
def _(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int, in_features: int,
      kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    spatial = [conv_out_size(x.shape[-2 + d], kernel_size[d], stride[d], padding[d], dilation[d]) for d in (0, 1)]
    return x.new_empty(*x.shape[:-3], values.shape[0], *spatial)


def verify_nm_conv2d(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                     in_features: int, kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int]) -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found (positions of a real `indices`)."""
    return nm_conv2d_problem(x, values, indices, bias, n, m, in_features, kernel_size, stride, padding, dilation,
                             check_data=has_data(indices))


def _samples() -> list[tuple]:
    from ..nm_format import compress_nm, nm_mask
    calls = []
    for (n, m), x_shape, kernel, stride, padding, dilation, has_bias in [
            ((2, 4), (2, 4, 9, 9), [3, 3], [1, 1], [1, 1], [1, 1], True),
            ((1, 4), (8, 7, 6), [1, 2], [2, 1], [0, 1], [1, 2], False)]:
        weight = torch.randn(6, x_shape[-3] * kernel[0] * kernel[1])
        values, indices = compress_nm(weight, n, m, mask=nm_mask(weight.abs(), n, m))
        bias = torch.randn(6) if has_bias else None
        calls.append((torch.randn(*x_shape), values, indices, bias, n, m, weight.shape[1],
                      kernel, stride, padding, dilation))
    return calls


NM_CONV2D = OpDef(name="nm_conv2d", op=torch.ops.sparsecc.nm_conv2d.default,
                  kernels={"torch": nm_conv2d_cpu, "triton": nm_conv2d_triton},
                  verify=verify_nm_conv2d, attrs=("n", "m", "in_features", "kernel_size", "stride", "padding",
                                                  "dilation"), samples=_samples)
