"""Triton kernels for sparsecc::moe: grouped GEMMs over expert tiles (vLLM fused-MoE / ScatterMoE style).

1. `moe_align.align_to_tiles_triton` (3 small Triton launches; the layout of
   `moe_routing.align_to_tiles`) groups the (token, slot) pairs by expert and
   pads each expert's segment to whole BLOCK_M tiles.
2. `moe_gate_up_kernel`, grid (tiles, I / BLOCK_N): a tile's program gathers
   its pairs' token rows of hidden, multiplies them by its expert's gate rows
   (n, or 2n when interleaved) and up rows (I + n, or 2n + 1) with two fp32
   accumulators over H, adds the expert's b_gate_up when given, and writes
   act(gate) * up (or the clamped SwiGLU) to row `tile*BLOCK_M + i` of the
   intermediate [P, I]; not gated, one accumulator and act(x).
3. `moe_down_kernel`, grid (tiles, H / BLOCK_N): the intermediate tile times
   the expert's w_down plus its b_down, scaled by each pair's routing weight,
   written to row `pair` of per-pair outputs [T*k, H] fp32, summed over k.

Sentinel slots (pair id == T*k) load nothing and store nothing; tiles from
num_padded on return at once (the grid has the worst-case tile count so the
host never waits for the routing). Dropped pairs have no slot, so their
per-pair rows stay zero. The shared expert is a dense torch GEMM (cuBLAS).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...moe_routing import max_padded_pairs, route_within_capacity
from ..checks import refuse
from ..cpu.moe import ALL_ACTIVATIONS, ExpertForm, shared_expert_output
from ..moe_contract import MoECall, call_problem
from .launch import input_precision, jit, launcher
from .moe_align import align_to_tiles_triton


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """act(x) in fp32; tanh(z) = 2*sigmoid(2z) - 1 keeps to functions every backend has."""
    if ACTIVATION == "silu":
        y = x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _tile_pairs(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M: tl.constexpr):
    """(slot rows of the tile, their pair ids, which slots hold a pair)."""
    slot = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + slot)
    return slot, pair, pair < num_pairs


@triton.jit
def _expert_input(gate, up, limit, alpha, ACTIVATION: tl.constexpr, GATED: tl.constexpr):
    """What the down projection reads: act(gate) * up, act(gate) (not gated), or the clamped SwiGLU
    (up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit)."""
    if ACTIVATION == "swiglu_clamped":
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        a = (u + 1.0) * (g * tl.sigmoid(g * alpha))
    else:
        a = _activation(gate, ACTIVATION)
        if GATED:
            a = a * up
    return a


@jit(per_call=("num_pairs",))
def moe_gate_up_kernel(hidden_ptr, w_gate_up_ptr, b_gate_up_ptr, sorted_pair_ids_ptr, tile_expert_ptr,
                       num_padded_ptr, act_ptr, num_pairs, width, inter, swiglu_limit, swiglu_alpha,
                       stride_hidden, stride_we, stride_wn, stride_be, stride_act,
                       TOP_K: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot, pair, ok = _tile_pairs(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M)
    token = pair // TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter
    if INTERLEAVED:  # row 2i gate i, row 2i+1 up i
        gate_row, up_row = 2 * n, 2 * n + 1
    else:
        gate_row, up_row = n, inter + n
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    w_expert = w_gate_up_ptr + expert * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        col = k0 + tl.arange(0, BLOCK_K)
        col_ok = col < width
        x = tl.load(hidden_ptr + token[:, None] * stride_hidden + col[None, :],
                    mask=ok[:, None] & col_ok[None, :], other=0.0)
        w_mask = n_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_expert + gate_row[:, None] * stride_wn + col[None, :], mask=w_mask, other=0.0)
        gate += tl.dot(x, tl.trans(w_gate), input_precision=INPUT_PRECISION)
        if GATED:
            w_up = tl.load(w_expert + up_row[:, None] * stride_wn + col[None, :], mask=w_mask, other=0.0)
            up += tl.dot(x, tl.trans(w_up), input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        b_expert = b_gate_up_ptr + expert * stride_be
        gate += tl.load(b_expert + gate_row, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_expert + up_row, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    a = _expert_input(gate, up, swiglu_limit, swiglu_alpha, ACTIVATION, GATED)
    tl.store(act_ptr + slot[:, None] * stride_act + n[None, :], a.to(act_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


@jit(per_call=("num_pairs",))
def moe_down_kernel(act_ptr, w_down_ptr, b_down_ptr, sorted_pair_ids_ptr, tile_expert_ptr, num_padded_ptr,
                    pair_weight_ptr, pair_out_ptr, num_pairs, width, inter,
                    stride_act, stride_we, stride_wn, stride_be, stride_out,
                    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot, pair, ok = _tile_pairs(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < width
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    w_rows = w_down_ptr + expert * stride_we + n[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        col = k0 + tl.arange(0, BLOCK_K)
        col_ok = col < inter
        a = tl.load(act_ptr + slot[:, None] * stride_act + col[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0)
        w = tl.load(w_rows + col[None, :], mask=n_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_down_ptr + expert * stride_be + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(pair_weight_ptr + pair, mask=ok, other=0.0)[:, None]
    tl.store(pair_out_ptr + pair[:, None] * stride_out + n[None, :], acc, mask=ok[:, None] & n_ok[None, :])


SHARED_MEMORY_BUDGET = 220 * 1024   # bytes the gate/up kernel's pipelined tiles may take (H100/H200: 227 KiB)


def default_blocks(num_pairs: int, num_experts: int, itemsize: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by pairs per expert; the best of `bench/gpu_tune.py`'s
    sweep on an H200 (bf16; E=8 H=4096 I=14336 and E=64 H=2048 I=1024; docs/benchmarks.md).
    For wider dtypes BLOCK_K halves until 3 pipeline stages of the x, gate and up tiles fit
    SHARED_MEMORY_BUDGET (fp32 at the bf16 tiles would need up to 418 KiB)."""
    per_expert = num_pairs / num_experts
    if per_expert <= 4:
        block_m, block_n, block_k, warps = 16, 128, 128, 4
    elif per_expert <= 32:
        block_m, block_n, block_k, warps = 32, 128, 64, 4
    elif per_expert <= 256:
        block_m, block_n, block_k, warps = 64, 128, 64, 4
    else:
        block_m, block_n, block_k, warps = 128, 128, 64, 8
    while 3 * (block_m + 2 * block_n) * block_k * itemsize > SHARED_MEMORY_BUDGET and block_k > 16:
        block_k //= 2
    return block_m, block_n, block_k, warps


def _grouped_mlp(call: MoECall, weights: Tensor, experts: Tensor, blocks: tuple[int, int, int, int]) -> Tensor:
    """Per-pair outputs [T*k, H] fp32: weight * expert(token) for kept pairs, zero for dropped ones."""
    block_m, block_n, block_k, num_warps = blocks
    hidden, w_gate_up, w_down = call.hidden, call.w_gate_up, call.w_down
    num_pairs, num_experts = experts.numel(), w_down.shape[0]
    width, inter = hidden.shape[1], w_down.shape[2]
    b_gate_up, b_down = call.b_gate_up, call.b_down
    sorted_pair_ids, tile_expert, num_padded = align_to_tiles_triton(experts, num_experts, block_m)
    tiles = max_padded_pairs(num_pairs, num_experts, block_m) // block_m
    act = hidden.new_empty(tiles * block_m, inter)
    pair_out = torch.zeros(num_pairs, width, dtype=torch.float32, device=hidden.device)
    precision = input_precision(hidden.dtype)
    launcher(moe_gate_up_kernel, (tiles, triton.cdiv(inter, block_n)))(
        hidden, w_gate_up, w_gate_up if b_gate_up is None else b_gate_up,  # the weight stands in, never read
        sorted_pair_ids, tile_expert, num_padded, act, num_pairs, width, inter,
        float(call.swiglu_limit), float(call.swiglu_alpha),
        hidden.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), 0 if b_gate_up is None else b_gate_up.stride(0),
        act.stride(0), TOP_K=experts.shape[1], GATED=call.gated, INTERLEAVED=call.interleaved,
        HAS_BIAS=b_gate_up is not None, ACTIVATION=call.activation, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    pair_weight = weights.to(hidden.dtype).float().reshape(-1)  # the op casts weights to hidden's dtype
    launcher(moe_down_kernel, (tiles, triton.cdiv(width, block_n)))(
        act, w_down, w_down if b_down is None else b_down, sorted_pair_ids, tile_expert, num_padded,
        pair_weight, pair_out, num_pairs, width, inter,
        act.stride(0), w_down.stride(0), w_down.stride(1), 0 if b_down is None else b_down.stride(0),
        pair_out.stride(0), HAS_BIAS=b_down is not None, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return pair_out


def _contiguous(call: MoECall) -> MoECall:
    """The call with the tensors the kernels index by strides made contiguous."""
    made = {name: t.contiguous() for name in ("hidden", "w_gate_up", "w_down", "b_gate_up", "b_down")
            if (t := getattr(call, name)) is not None}
    return replace(call, **made)


def moe_triton(*args, block_m: Optional[int] = None, block_n: Optional[int] = None, block_k: Optional[int] = None,
               num_warps: Optional[int] = None, **kwargs) -> Tensor:
    """sparsecc::moe with the grouped-GEMM kernels, arguments as the op's schema; unset tiles take
    default_blocks."""
    call = MoECall(*args, **kwargs)
    refuse("moe", call_problem(call, ALL_ACTIVATIONS))
    call = _contiguous(call)
    hidden, top_k = call.hidden, call.top_k
    weights, experts, _ = route_within_capacity(call.router_logits, top_k, call.normalize, call.scoring,
                                                call.capacity_factor, **call.selection())
    given = (block_m, block_n, block_k, num_warps)
    blocks = tuple(g or d for g, d in zip(given, default_blocks(experts.numel(), call.w_down.shape[0],
                                                                hidden.element_size())))
    pair_out = _grouped_mlp(call, weights, experts, blocks)
    y = pair_out.view(hidden.shape[0], top_k, hidden.shape[1]).sum(1)
    if call.shared_down is not None:
        y += shared_expert_output(hidden, call.shared_gate_up, call.shared_down, call.shared_gate,
                                  ExpertForm.of(call)).float()
    return y.to(hidden.dtype)
