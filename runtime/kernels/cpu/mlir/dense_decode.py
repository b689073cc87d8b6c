"""Launch the generated dense decode kernel (dense_codegen.py): y = x @ W.T + bias for 1..16 tokens.

Rows run in chunks on torch's OpenMP threads exactly as the N:M decode kernel's (nm_decode.run_rows).
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
from .nm_decode import DTYPE_NAMES, mlir_available, run_rows, zero_bias


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
    out_features = weight.shape[0]
    y = torch.empty(spec.tokens, out_features, dtype=x.dtype)
    tokens = x.reshape(spec.tokens, spec.k).contiguous()
    bias32 = zero_bias(out_features) if bias is None else bias.to(torch.float32).contiguous()
    run_rows(dense_kernel(spec), weight, tokens, bias32, y, out_rows=out_features)
    return y.reshape(*x.shape[:-1], out_features)
