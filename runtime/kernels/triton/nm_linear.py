"""Triton kernel for sparsecc::nm_linear: N:M weights decompressed inside the tile.

Each program computes y[BLOCK_M tokens, BLOCK_N out features]. Per K step it
loads the dense x tile and rebuilds the dense weight tile W[BLOCK_N, BLOCK_K]
from the compressed layout of `sparsecc.runtime.nm_format`: column c lies in
group g = c // M at position p = c % M, and for each of the N slots s of that
group, W[r, c] += values[r, g*N + s] if position(r, g*N + s) == p. A position
is read from the packed stream at bit o = (g*N + s) * BITS: bytes o//8 (and
o//8 + 1 when BITS does not divide 8) shifted right by o % 8. The tile then
goes through `tl.dot` with fp32 accumulation; y is written in x's dtype.

`nm_linear_kernel` is the module-level JIT function; `aot_specialization`
gives the signature and constexprs to cross-compile it with `triton.compile`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...nm_format import check_nm, index_bits

TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def nm_linear_kernel(x_ptr, values_ptr, indices_ptr, bias_ptr, y_ptr,
                     tokens, out_features, in_features,
                     stride_x, stride_values, stride_indices, stride_y,
                     N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = token < tokens
    row_ok = row < out_features
    index_bytes = (in_features // M * N * BITS + 7) // 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        col = k0 + tl.arange(0, BLOCK_K)
        col_ok = col < in_features
        x_tile = tl.load(x_ptr + token[:, None] * stride_x + col[None, :],
                         mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        w_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=x_ptr.dtype.element_ty)
        for s in tl.static_range(N):
            slot = col // M * N + s
            ok = row_ok[:, None] & col_ok[None, :]
            value = tl.load(values_ptr + row[:, None] * stride_values + slot[None, :], mask=ok, other=0.0)
            bit = slot * BITS
            byte_ptr = indices_ptr + row[:, None] * stride_indices + (bit // 8)[None, :]
            word = tl.load(byte_ptr, mask=ok, other=0).to(tl.int32)
            if 8 % BITS != 0:  # 3-bit positions can straddle two bytes
                hi_ok = ok & ((bit // 8 + 1) < index_bytes)[None, :]
                word = word | (tl.load(byte_ptr + 1, mask=hi_ok, other=0).to(tl.int32) << 8)
            position = (word >> (bit % 8)[None, :]) & (M - 1)
            hit = position == (col % M)[None, :]
            w_tile += tl.where(hit, value.to(x_ptr.dtype.element_ty), 0.0)
        acc += tl.dot(x_tile, tl.trans(w_tile), input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + token[:, None] * stride_y + row[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=token_ok[:, None] & row_ok[None, :])


def default_blocks(tokens: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): few tokens get a small BLOCK_M; BLOCK_K is a multiple of M."""
    block_m = 16 if tokens <= 16 else 32 if tokens <= 32 else 64
    return block_m, 64, max(64, m)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul precision setting, so it matches F.linear's default (ieee)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def nm_linear_triton(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                     n: int, m: int, in_features: int, *, block_m: Optional[int] = None,
                     block_n: Optional[int] = None, block_k: Optional[int] = None,
                     num_warps: int = 4, num_stages: int = 3) -> Tensor:
    """y[..., out] = x[..., in] @ decompress_nm(values, indices).T + bias, in x's dtype."""
    check_nm(n, m)
    tokens = x.reshape(-1, in_features).contiguous()
    values, indices = values.contiguous(), indices.contiguous()
    out_features = values.shape[0]
    y = tokens.new_empty(tokens.shape[0], out_features)
    bm, bn, bk = default_blocks(tokens.shape[0], m)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    if bk % m:
        raise ValueError(f"block_k={bk} must be a multiple of M={m}")
    grid = (triton.cdiv(tokens.shape[0], bm), triton.cdiv(out_features, bn))
    nm_linear_kernel[grid](
        tokens, values, indices, bias if bias is not None else y, y,
        tokens.shape[0], out_features, in_features,
        tokens.stride(0), values.stride(0), indices.stride(0), y.stride(0),
        N=n, M=m, BITS=index_bits(m), HAS_BIAS=bias is not None,
        INPUT_PRECISION=_input_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=num_warps, num_stages=num_stages)
    return y.reshape(*x.shape[:-1], out_features)


def aot_specialization(dtype: torch.dtype, n: int, m: int, has_bias: bool,
                       block_m: int = 64, block_n: int = 64, block_k: int = 64) -> tuple[dict, dict]:
    """(signature, constexprs) for `triton.compile(ASTSource(jit_function(), signature, constexprs))`."""
    ty = TRITON_DTYPES[dtype]
    constexprs = {"N": n, "M": m, "BITS": index_bits(m), "HAS_BIAS": has_bias,
                  "INPUT_PRECISION": _input_precision(dtype),
                  "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    pointers = {"x_ptr": f"*{ty}", "values_ptr": f"*{ty}", "indices_ptr": "*u8",
                "bias_ptr": f"*{ty}", "y_ptr": f"*{ty}"}
    scalars = dict.fromkeys(["tokens", "out_features", "in_features", "stride_x",
                             "stride_values", "stride_indices", "stride_y"], "i32")
    return {**pointers, **scalars, **dict.fromkeys(constexprs, "constexpr")}, constexprs


def jit_function() -> triton.runtime.JITFunction:
    """`nm_linear_kernel` as a compilable JITFunction, also when TRITON_INTERPRET=1 wrapped it."""
    if isinstance(nm_linear_kernel, triton.runtime.JITFunction):
        return nm_linear_kernel
    return triton.runtime.JITFunction(nm_linear_kernel.fn)
