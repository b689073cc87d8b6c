"""Triton kernels for token routing: copy whole token rows by index (gather in, scatter out).

Both run a grid (B*K, cdiv(D, BLOCK_D)): program (p, j) moves columns
j*BLOCK_D .. of row p of the [B*K, D] side from or to row
src_batch*S + indices[p] of the [B*S, D] side (layout in
`sparsecc.runtime.kernels.cpu.route`). The unrouted tokens of `unroute` are a
plain device copy of the residual; only the K kept rows per sequence are
written by the kernel. Indices are sorted per sequence, so neighbouring
programs touch neighbouring rows. The kernels clamp each index into
[0, S) of its own sequence, so no index, however made, reaches another
sequence's row or memory outside the tensor; the launchers check shapes
(O(1)) and read no index on the host, so a call never waits on the device.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..checks import refuse
from ..cpu.route import route_gather_problem, unroute_problem
from .launch import jit, launcher

BLOCK_D = 256


@jit(per_call=("seq_len", "kept", "x_batch_stride"))
def route_gather_kernel(x_ptr, indices_ptr, out_ptr, seq_len, kept, width, x_batch_stride,
                        BLOCK_D: tl.constexpr):
    pair = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < width
    token = tl.minimum(tl.maximum(tl.load(indices_ptr + pair).to(tl.int64), 0), seq_len - 1)
    src_row = (pair // kept).to(tl.int64) * x_batch_stride + token
    value = tl.load(x_ptr + src_row * width + cols, mask=ok)
    tl.store(out_ptr + pair.to(tl.int64) * width + cols, value, mask=ok)


@jit(per_call=("seq_len", "kept"))
def unroute_kernel(rows_ptr, indices_ptr, out_ptr, seq_len, kept, width, BLOCK_D: tl.constexpr):
    pair = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < width
    token = tl.minimum(tl.maximum(tl.load(indices_ptr + pair).to(tl.int64), 0), seq_len - 1)
    dst_row = (pair // kept).to(tl.int64) * seq_len + token
    value = tl.load(rows_ptr + pair.to(tl.int64) * width + cols, mask=ok)
    tl.store(out_ptr + dst_row * width + cols, value.to(out_ptr.dtype.element_ty), mask=ok)


def _width(shape) -> int:
    width = 1
    for d in shape[2:]:
        width *= int(d)
    return width


def route_gather_triton(x: Tensor, indices: Tensor, block_d: int = BLOCK_D) -> Tensor:
    refuse("route_gather", route_gather_problem(x, indices, check_data=False))
    batch, kept = indices.shape
    seq, width = x.shape[1], _width(x.shape)
    shared = x.shape[0] == 1 and batch != 1
    x, indices = x.contiguous(), indices.contiguous()
    out = x.new_empty(batch, kept, *x.shape[2:])
    if out.numel():
        grid = (batch * kept, triton.cdiv(width, block_d))
        launcher(route_gather_kernel, grid)(x, indices, out, seq, kept, width, 0 if shared else seq,
                                            BLOCK_D=block_d)
    return out


def unroute_triton(residual: Tensor, rows: Tensor, indices: Tensor, block_d: int = BLOCK_D) -> Tensor:
    refuse("unroute", unroute_problem(residual, rows, indices, check_data=False))
    batch, kept = indices.shape
    seq, width = residual.shape[1], _width(residual.shape)
    out = residual.contiguous().clone()
    if rows.numel():
        grid = (batch * kept, triton.cdiv(width, block_d))
        launcher(unroute_kernel, grid)(rows.contiguous(), indices.contiguous(), out, seq, kept, width, BLOCK_D=block_d)
    return out
