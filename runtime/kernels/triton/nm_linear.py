"""Triton kernels for sparsecc::nm_linear: N:M weights decompressed inside the tile.

`nm_linear_kernel` computes y[BLOCK_M tokens, BLOCK_N out features] over one
of SPLIT_K slices of K. Per K step it loads the x tile, rebuilds the dense
weight tile W[BLOCK_N, BLOCK_K] from the compressed layout of
`sparsecc.runtime.nm_format` and runs `tl.dot` (fp32 accumulation); y is
written in x's dtype, or added atomically to an fp32 buffer when SPLIT_K > 1
(few tokens: more programs). `nm_decompress_kernel` writes the same tiles to
a dense weight, for token counts where cuBLAS on the dense weight wins.

A tile covers GROUPS = BLOCK_K / M groups; group g keeps N slots, slot j =
g*N + s holding values[r, j] at in-group position p(j) (BITS-bit field at
bit j*BITS of the row's packed stream), and W[r, g*M + p(j)] = values[r, j].
Two ways to build it:
- packed (BITS divides 8, N a power of two): one contiguous load of the
  tile's values [BLOCK_N, GROUPS*N] and of its index bytes, positions
  unpacked by shifting each byte, then W = sum over s of
  where(p == arange(M), value). Contiguous loads are what Triton can
  software-pipeline (cp.async needs >= 4 contiguous bytes).
- per slot (3-bit positions, or N not a power of two): for each s, load
  slot s of every group and its byte(s) (o = j*BITS: byte o // 8, plus
  o // 8 + 1 when a 3-bit field straddles bytes), shift right by o % 8.

Cross-compile what a call launches (recorded by `launch.use_launcher`; see
`sparsecc.build`) in a process without TRITON_INTERPRET=1 (under the interpreter
the JIT functions are interpreter objects, and triton 3.9 leaves
triton.language patched after a kernel calls a JIT helper).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ...nm_format import index_bits, nm_weight_problem
from ..checks import refuse
from ..cpu.nm_linear import nm_linear_problem
from .launch import input_precision, jit, launcher

# H200, 2:4 fp16, shapes of bench/nm_linear.py: at 1 token the fused kernel took 35-76 us, decompress +
# cuBLAS 64-112 us; at 64 tokens the best fused tiles took 117-294 us, decompress + cuBLAS 46-115 us. Up to
# one BLOCK_M=16 tile of tokens the fused kernel costs what it costs at 1 token: it serves up to 16 tokens.
FUSED_MAX_TOKENS = 16


@triton.jit
def _tile_packed(values_ptr, indices_ptr, row, row_ok, group0, stride_values, stride_indices,
                 N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUPS: tl.constexpr, DTYPE: tl.constexpr):
    """Dense W[BLOCK_N, GROUPS*M] from contiguous loads (BITS divides 8, N a power of two).

    Rows are contiguous, so a row's length is its stride: bounding by the stride (which
    Triton specialises as divisible by 16) keeps the loads eligible for cp.async pipelining.
    """
    slot = tl.multiple_of(group0 * N, GROUPS * N) + tl.arange(0, GROUPS * N)
    value = tl.load(values_ptr + row[:, None] * stride_values + slot[None, :],
                    mask=row_ok[:, None] & (slot < stride_values)[None, :], other=0.0)
    tile_bytes: tl.constexpr = GROUPS * N * BITS // 8
    byte = tl.multiple_of(group0 * N * BITS // 8, tile_bytes) + tl.arange(0, tile_bytes)
    code = tl.load(indices_ptr + row[:, None] * stride_indices + byte[None, :],
                   mask=row_ok[:, None] & (byte < stride_indices)[None, :], other=0)
    shift = tl.arange(0, 8 // BITS) * BITS
    position = (code.to(tl.int32)[:, :, None] >> shift[None, None, :]) & (M - 1)
    position = tl.reshape(position, (BLOCK_N, GROUPS, N))
    value = tl.reshape(value.to(DTYPE), (BLOCK_N, GROUPS, N))
    hit = position[:, :, :, None] == tl.arange(0, M)[None, None, None, :]
    dense = tl.sum(tl.where(hit, value[:, :, :, None], 0.0), axis=2)
    return tl.reshape(dense.to(DTYPE), (BLOCK_N, GROUPS * M))


@triton.jit
def _tile_per_slot(values_ptr, indices_ptr, row, row_ok, group0, groups, stride_values, stride_indices,
                   N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                   GROUPS: tl.constexpr, DTYPE: tl.constexpr):
    """Dense W[BLOCK_N, GROUPS*M] slot by slot (any N; 3-bit positions may straddle bytes)."""
    group = group0 + tl.arange(0, GROUPS)
    ok = row_ok[:, None] & (group < groups)[None, :]
    dense = tl.full((BLOCK_N, GROUPS, M), 0.0, dtype=DTYPE)
    for s in tl.static_range(N):
        slot = group * N + s
        value = tl.load(values_ptr + row[:, None] * stride_values + slot[None, :], mask=ok, other=0.0)
        bit = slot * BITS
        byte_ptr = indices_ptr + row[:, None] * stride_indices + (bit // 8)[None, :]
        code = tl.load(byte_ptr, mask=ok, other=0).to(tl.int32)
        if 8 % BITS != 0:
            straddles = ok & ((bit % 8 + BITS) > 8)[None, :]
            code = code | (tl.load(byte_ptr + 1, mask=straddles, other=0).to(tl.int32) << 8)
        position = (code >> (bit % 8)[None, :]) & (M - 1)
        hit = position[:, :, None] == tl.arange(0, M)[None, None, :]
        dense += tl.where(hit, value.to(DTYPE)[:, :, None], 0.0)
    return tl.reshape(dense, (BLOCK_N, GROUPS * M))


@triton.jit
def _weight_tile(values_ptr, indices_ptr, row, row_ok, k0, in_features, stride_values, stride_indices,
                 N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PACKED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    if PACKED:
        tile = _tile_packed(values_ptr, indices_ptr, row, row_ok, k0 // M, stride_values, stride_indices,
                            N, M, BITS, BLOCK_N, BLOCK_K // M, DTYPE)
    else:
        tile = _tile_per_slot(values_ptr, indices_ptr, row, row_ok, k0 // M, in_features // M, stride_values,
                              stride_indices, N, M, BITS, BLOCK_N, BLOCK_K // M, DTYPE)
    return tile


@jit(per_call=("tokens",))
def nm_linear_kernel(x_ptr, values_ptr, indices_ptr, bias_ptr, y_ptr,
                     tokens, out_features, in_features,
                     stride_x, stride_values, stride_indices, stride_y,
                     N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PACKED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    token_ok = token < tokens
    row_ok = row < out_features
    k_slice = tl.cdiv(tl.cdiv(in_features, BLOCK_K), SPLIT_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * k_slice, tl.minimum(in_features, (split + 1) * k_slice), BLOCK_K):
        col = k0 + tl.arange(0, BLOCK_K)
        x_tile = tl.load(x_ptr + token[:, None] * stride_x + col[None, :],
                         mask=token_ok[:, None] & (col < in_features)[None, :], other=0.0)
        w_tile = _weight_tile(values_ptr, indices_ptr, row, row_ok, k0, in_features, stride_values,
                              stride_indices, N, M, BITS, PACKED, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty)
        acc += tl.dot(x_tile, tl.trans(w_tile), input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias_rows = tl.where(split == 0, out_features, 0)  # only the first K slice adds the bias
        acc += tl.load(bias_ptr + row, mask=row < bias_rows, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + token[:, None] * stride_y + row[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None] & row_ok[None, :])
    else:
        tl.atomic_add(y_ptrs, acc, mask=token_ok[:, None] & row_ok[None, :])


@jit()
def nm_decompress_kernel(values_ptr, indices_ptr, dense_ptr, rows, in_features,
                         stride_values, stride_indices, stride_dense,
                         N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PACKED: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    col = k0 + tl.arange(0, BLOCK_K)
    w_tile = _weight_tile(values_ptr, indices_ptr, row, row < rows, k0, in_features, stride_values,
                          stride_indices, N, M, BITS, PACKED, BLOCK_N, BLOCK_K, dense_ptr.dtype.element_ty)
    tl.store(dense_ptr + row[:, None] * stride_dense + col[None, :], w_tile,
             mask=(row < rows)[:, None] & (col < in_features)[None, :])


def packed_tiles(n: int, m: int, block_k: int) -> bool:
    """Whether a BLOCK_K tile can be built from contiguous loads (see the module docstring)."""
    bits = index_bits(m)
    return 8 % bits == 0 and n & (n - 1) == 0 and (block_k // m * n * bits) % 8 == 0


def default_blocks(tokens: int, m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps) of the fused kernel, best measured on an H200."""
    if tokens <= 16:
        return 16, 32, 256, 1, 4
    return (64, 64, 64, 1, 4) if tokens <= 64 else (128, 128, 128, 1, 8)


def nm_decompress_triton(values: Tensor, indices: Tensor, n: int, m: int, in_features: int,
                         dtype: Optional[torch.dtype] = None, *, block_n: int = 32, block_k: int = 256,
                         num_warps: int = 4) -> Tensor:
    """Dense [rows, in_features] weight (values' dtype unless given), same result as `decompress_nm`.
    Shapes are checked here; the callers (nm_decompress_cuda, nm_linear_triton) check the positions once
    on the tensor they hold, which this reshaped view of it would not remember."""
    refuse("nm_decompress", nm_weight_problem(values, indices, n, m, in_features, check_data=False))
    if values.dim() != 2:
        refuse("nm_decompress", f"the Triton launcher takes values [rows, in_features*N/M], not {list(values.shape)}")
    values, indices = values.contiguous(), indices.contiguous()
    if block_k % m:
        raise ValueError(f"block_k={block_k} must be a multiple of M={m}")
    dense = torch.empty(values.shape[0], in_features, dtype=dtype or values.dtype, device=values.device)
    grid = (triton.cdiv(values.shape[0], block_n), triton.cdiv(in_features, block_k))
    launcher(nm_decompress_kernel, grid)(values, indices, dense, values.shape[0], in_features,
                               values.stride(0), indices.stride(0), dense.stride(0),
                               N=n, M=m, BITS=index_bits(m), PACKED=packed_tiles(n, m, block_k),
                               BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return dense


def nm_linear_triton(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                     n: int, m: int, in_features: int, *, path: Optional[str] = None,
                     block_m: Optional[int] = None, block_n: Optional[int] = None, block_k: Optional[int] = None,
                     split_k: Optional[int] = None, num_warps: Optional[int] = None, num_stages: int = 3) -> Tensor:
    """y[..., out] = x[..., in] @ decompress_nm(values, indices).T + bias, in x's dtype.

    path "fused" runs nm_linear_kernel, "decompress" runs nm_decompress_kernel then F.linear;
    by default the fused kernel serves up to FUSED_MAX_TOKENS tokens. Unset tiles take default_blocks.
    """
    refuse("nm_linear", nm_linear_problem(x, values, indices, bias, n, m, in_features, check_data=True))
    tokens = x.reshape(-1, in_features).contiguous()
    path = path or ("fused" if tokens.shape[0] <= FUSED_MAX_TOKENS else "decompress")
    if path not in ("fused", "decompress"):
        raise ValueError(f"path must be 'fused' or 'decompress', not {path!r}")
    if path == "decompress":
        weight = nm_decompress_triton(values, indices, n, m, in_features, x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    values, indices = values.contiguous(), indices.contiguous()
    out_features = values.shape[0]
    given = (block_m, block_n, block_k, split_k, num_warps)
    bm, bn, bk, split, warps = (g or d for g, d in zip(given, default_blocks(tokens.shape[0], m)))
    if bk % m:
        raise ValueError(f"block_k={bk} must be a multiple of M={m}")
    y = tokens.new_empty(tokens.shape[0], out_features) if split == 1 else \
        torch.zeros(tokens.shape[0], out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(tokens.shape[0], bm), triton.cdiv(out_features, bn), split)
    launcher(nm_linear_kernel, grid)(
        tokens, values, indices, bias if bias is not None else y, y,
        tokens.shape[0], out_features, in_features,
        tokens.stride(0), values.stride(0), indices.stride(0), y.stride(0),
        **_nm_constexprs(n, m, bk), HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision(x.dtype),
        SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=num_stages)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _nm_constexprs(n: int, m: int, block_k: int) -> dict:
    return {"N": n, "M": m, "BITS": index_bits(m), "PACKED": packed_tiles(n, m, block_k)}
