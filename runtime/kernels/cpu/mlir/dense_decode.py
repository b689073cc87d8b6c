"""Launch the generated dense decode kernel (dense_codegen.py): y = x @ W.T + bias for 1..16 tokens.

Rows run in chunks on torch's OpenMP threads exactly as the N:M decode kernel's (nm_decode.bind_rows).
`dense_linear_mlir` returns None where no kernel applies (no torch-mlir, host features, dtype, shape,
token count, a weight that is not a contiguous 2-D CPU tensor of x's dtype), so the caller falls back.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .dense_codegen import DenseSpec, unsupported
from .host import missing_features
from .jit import dense_kernel
from .nm_decode import DTYPE_NAMES, LayerCall, bind_rows, mlir_available, zero_bias


@functools.lru_cache(maxsize=None)
def runnable_dense_spec(dtype: str, k: int, tokens: int) -> Optional[DenseSpec]:
    """DenseSpec(dtype, k, tokens) where this host can generate and run it, else None."""
    spec = DenseSpec(dtype, k, tokens)
    if not mlir_available() or missing_features(dtype) or unsupported(spec):
        return None
    return spec


def dense_spec(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Optional[DenseSpec]:
    """The kernel spec for F.linear(x, weight, bias), or None when no generated kernel can run it here."""
    dtype = DTYPE_NAMES.get(x.dtype)
    if dtype is None or weight.dtype != x.dtype or weight.dim() != 2 or x.device.type != "cpu":
        return None
    if weight.device.type != "cpu" or not weight.is_contiguous() or x.dim() < 1 or x.numel() == 0:
        return None
    in_features = weight.shape[1]
    if x.shape[-1] != in_features or in_features == 0:
        return None
    if bias is not None and (list(bias.shape) != [weight.shape[0]] or bias.device.type != "cpu"):
        return None
    return runnable_dense_spec(dtype, in_features, x.numel() // in_features)


def dense_linear_mlir(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """F.linear(x, weight, bias) by the generated kernel, or None (unsupported here)."""
    spec = dense_spec(x, weight, bias)
    return None if spec is None else run_dense(spec, x, weight, bias)


def run_dense(spec: DenseSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The kernel of `spec` on operands `dense_spec` accepted."""
    return DenseCall(spec, weight, bias)(x)


class DenseCall(LayerCall):
    """The dense decode kernel of `spec` bound to one layer's weight and bias (see nm_decode.LayerCall)."""

    def __init__(self, spec: DenseSpec, weight: Tensor, bias: Optional[Tensor]):
        out_features = weight.shape[0]
        bias32 = zero_bias(out_features) if bias is None else bias.to(torch.float32).contiguous()
        self._kept = (bias, bias32)
        self.out_features = out_features
        self.call = bind_rows(dense_kernel(spec), weight, [(None, spec.tokens * spec.k),
                                                           (bias32.data_ptr(), out_features),
                                                           (None, spec.tokens * out_features)],
                              out_rows=out_features)
