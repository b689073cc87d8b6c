"""CPU kernel for sparsecc::nm_conv2d: im2col (`F.unfold`), then the N:M matmul of nm_linear.

cols [B, C*kh*kw, L] from unfold has the reduction dim in the order of
W.reshape(out, -1) (channel, kernel row, kernel column), so the compressed
weight multiplies it directly: y[B, L, out] = cols^T @ W^T + b, then
y is laid out as [B, out, H_out, W_out].
"""
from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ...nm_format import nm_weight_problem
from ..checks import refuse
from .nm_linear import nm_linear_cpu, operand_dtype_problem


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def nm_conv2d_unfolded(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                       dilation: list[int]) -> tuple[Tensor, Tensor, list[int]]:
    """(x as a batch, its im2col rows [B*L, C*kh*kw], output spatial size [H_out, W_out])."""
    batch = x if x.dim() == 4 else x.unsqueeze(0)
    cols = F.unfold(batch, kernel_size, dilation=dilation, padding=padding, stride=stride)
    spatial = [conv_out_size(batch.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d]) for d in (0, 1)]
    return batch, cols.transpose(1, 2), spatial


def nm_conv2d_with(linear, x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                   in_features: int, kernel_size: list[int], stride: list[int], padding: list[int],
                   dilation: list[int]) -> Tensor:
    """The conv as im2col + `linear` (an nm_linear kernel), for any backend's linear."""
    refuse("nm_conv2d", nm_conv2d_problem(x, values, indices, bias, n, m, in_features, kernel_size, stride,
                                          padding, dilation, check_data=True))
    batch, rows, spatial = nm_conv2d_unfolded(x, kernel_size, stride, padding, dilation)
    y = linear(rows, values, indices, bias, n, m, in_features)            # [B, L, out]
    y = y.transpose(1, 2).reshape(batch.shape[0], values.shape[0], *spatial).contiguous()
    return y if x.dim() == 4 else y.squeeze(0)


def nm_conv2d_cpu(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                  in_features: int, kernel_size: list[int], stride: list[int], padding: list[int],
                  dilation: list[int]) -> Tensor:
    """conv2d(x, decompress_nm(values, indices).reshape(out, C, kh, kw), bias, stride, padding, dilation)."""
    return nm_conv2d_with(nm_linear_cpu, x, values, indices, bias, n, m, in_features,
                          kernel_size, stride, padding, dilation)


def _conv_arguments_problem(kernel_size: list[int], stride: list[int], padding: list[int],
                            dilation: list[int]) -> Optional[str]:
    for name, pair, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                            ("dilation", dilation, 1)):
        if len(pair) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < low for v in pair):
            return f"{name} {list(pair)} must be two {'non-negative' if low == 0 else 'positive'} ints"
    return None


def nm_conv2d_problem(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                      in_features: int, kernel_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], check_data: bool) -> Optional[str]:
    """None when nm_conv2d's operands fit together (positions decoded once when `check_data`), else why not."""
    problem = nm_weight_problem(values, indices, n, m, in_features, check_data)
    if problem is None and values.dim() != 2:
        problem = f"values {list(values.shape)} must be [out, in_features*N/M]"
    problem = problem or _conv_arguments_problem(kernel_size, stride, padding, dilation)
    if problem:
        return problem
    if x.dim() not in (3, 4):
        return f"x {list(x.shape)} must be [B, C, H, W] or [C, H, W]"
    if x.shape[-3] * math.prod(kernel_size) != in_features:
        return f"x has {x.shape[-3]} channels; C*kh*kw = {x.shape[-3] * math.prod(kernel_size)} != in_features={in_features}"
    if any(conv_out_size(x.shape[-2 + d], kernel_size[d], stride[d], padding[d], dilation[d]) < 1 for d in (0, 1)):
        return f"x {list(x.shape)} is smaller than the dilated kernel {list(kernel_size)} (padding {list(padding)})"
    return operand_dtype_problem(x, values, bias)
