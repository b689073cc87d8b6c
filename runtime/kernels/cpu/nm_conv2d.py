"""CPU kernel for sparsecc::nm_conv2d: im2col (`F.unfold`), then the N:M matmul of nm_linear.

cols [B, C*kh*kw, L] from unfold has the reduction dim in the order of
W.reshape(out, -1) (channel, kernel row, kernel column), so the compressed
weight multiplies it directly: y[B, L, out] = cols^T @ W^T + b, then
y is laid out as [B, out, H_out, W_out].
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .nm_linear import nm_linear_cpu


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
