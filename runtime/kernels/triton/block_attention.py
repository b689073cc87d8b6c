"""Triton kernel for sparsecc::block_attention: flash-attention forward that walks the block layout.

Grid (query tiles, B * Hq). A program holds BLOCK_M query rows of one head:
the whole query block (BLOCK_M = block_q), or, when S < block_q (decode), the
S rows rounded up to a power of two >= 16. It reads its block's lists from the
layout (batch and head strides 0 where the layout broadcasts) and visits

    full blocks     q k^T * scale, no per-element mask
    partial blocks  the same under the mask tile (or the causal rule j <= i + Skv - S)

with an online softmax in fp32 (running row max m, row sum l, accumulator);
kv head = h // (Hq / Hkv) by index arithmetic. THRESHOLD: a block whose largest
logit lies, on every row, more than log(1/threshold) below m is skipped before
its V tile is loaded. The program writes out = acc / l and lse = m + log(l)
(-inf when a row saw nothing); the launcher fills such rows as `empty_rows` says.
HAS_SOFTCAP caps each logit (softcap * tanh(s / softcap)) before the mask; HAS_SINKS folds the
head's sink logit into (m, l) after the last block, so no row is empty.
Layout values are clamped where they are read (counts into [0, NK], block numbers
into [0, NK)), so no layout reaches outside k, v or its own index row; the
launcher checks shapes and attributes (O(1)) and never waits on the device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...attention_layout import Layout, as_4d
from ..attention_contract import block_attention_problem
from ..checks import refuse
from ..cpu.block_attention import fill_empty_rows
from .launch import input_precision, jit, launcher


@triton.jit
def _visit(q, m_i, l_i, acc, kb, row, b, h, kvh, k_ptr, v_ptr, mask_ptr, scale, softcap, log_threshold, seq, keys,
           stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mb, stride_mh, stride_ms,
           HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
           BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr, HAS_MASK: tl.constexpr,
           HAS_THRESHOLD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One key block into the running (m, l, acc) of the program's rows."""
    col = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + b * stride_kb + kvh * stride_kh + col[:, None] * stride_ks + d[None, :],
                mask=(col < keys)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale
    if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1) saturates without NaN
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    if PARTIAL:
        inside = (row < seq)[:, None] & (col < keys)[None, :]
        if HAS_MASK:
            visible = tl.load(mask_ptr + b * stride_mb + h * stride_mh + row[:, None] * stride_ms + col[None, :],
                              mask=inside, other=0) != 0
        else:
            visible = col[None, :] <= row[:, None] + (keys - seq)
        s = tl.where(visible & inside, s, float("-inf"))
    else:  # rows past S only exist in a tile wider than S (decode); they must not steer skipping
        s = tl.where((row < seq)[:, None], s, float("-inf"))
    block_max = tl.max(s, 1)
    keep = True
    if HAS_THRESHOLD:
        gap = tl.where(block_max == float("-inf"), float("-inf"), block_max - m_i)
        keep = tl.max(gap, 0) >= log_threshold
    if keep:
        m_new = tl.maximum(m_i, block_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        dv = tl.arange(0, BLOCK_DV)
        v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + col[:, None] * stride_vs + dv[None, :],
                    mask=(col < keys)[:, None] & (dv < V_DIM)[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@jit(per_call=("seq", "keys"))
def block_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr,
                           full_idx_ptr, mask_ptr, sinks_ptr, scale, softcap, log_threshold, seq, keys, heads,
                           groups,
                           stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                           stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                           stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
                           stride_mb, stride_mh, stride_ms,
                           HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    kvh = h // groups
    row = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qb = tile * BLOCK_M // BLOCK_Q
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + row[:, None] * stride_qs + d[None, :],
                mask=(row < seq)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    counts = b * stride_nb + h * stride_nh + qb
    lists = b * stride_ib + h * stride_ih + qb * stride_iq
    key_blocks = tl.cdiv(keys, BLOCK_K)
    for i in range(tl.minimum(tl.maximum(tl.load(full_num_ptr + counts), 0), key_blocks)):
        kb = tl.minimum(tl.maximum(tl.load(full_idx_ptr + lists + i), 0), key_blocks - 1)
        m_i, l_i, acc = _visit(q, m_i, l_i, acc, kb, row, b, h, kvh, k_ptr, v_ptr,
                               mask_ptr, scale, softcap, log_threshold, seq, keys, stride_kb, stride_kh, stride_ks,
                               stride_vb, stride_vh, stride_vs, stride_mb, stride_mh, stride_ms,
                               HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, BLOCK_K, False, HAS_MASK, HAS_THRESHOLD,
                               HAS_SOFTCAP, INPUT_PRECISION)
    for i in range(tl.minimum(tl.maximum(tl.load(kv_num_ptr + counts), 0), key_blocks)):
        kb = tl.minimum(tl.maximum(tl.load(kv_idx_ptr + lists + i), 0), key_blocks - 1)
        m_i, l_i, acc = _visit(q, m_i, l_i, acc, kb, row, b, h, kvh, k_ptr, v_ptr,
                               mask_ptr, scale, softcap, log_threshold, seq, keys, stride_kb, stride_kh, stride_ks,
                               stride_vb, stride_vh, stride_vs, stride_mb, stride_mh, stride_ms,
                               HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, BLOCK_K, True, HAS_MASK, HAS_THRESHOLD,
                               HAS_SOFTCAP, INPUT_PRECISION)
    if HAS_SINKS:  # one more logit per head whose value vector is 0: it only adds to the row sum
        sink = tl.load(sinks_ptr + h)
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.exp(sink - m_new)
        acc = acc * alpha[:, None]
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    dv = tl.arange(0, BLOCK_DV)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + row[:, None] * stride_os + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(row < seq)[:, None] & (dv < V_DIM)[None, :])
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * seq + row, lse, mask=row < seq)


def default_warps(block_m: int, block_k: int) -> int:
    """8 warps for 128x128 tiles, else 4: the best of `bench/gpu_tune.py` on an H200 (fp16, head dim 128)."""
    return 8 if block_m >= 128 and block_k >= 128 else 4


def _broadcast_strides(t: Tensor, dims: int) -> list[int]:
    """Strides of the first `dims` dims, 0 where the size is 1 (the layout or mask broadcasts there)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(dims)]


def block_attention_triton(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                           full_num_blocks: Tensor, full_indices: Tensor, mask: Optional[Tensor], scale: float,
                           block_q: int, block_k: int, threshold: float = 0.0, empty_rows: str = "zero",
                           softcap: float = 0.0, sinks: Optional[Tensor] = None, *, num_warps: Optional[int] = None, num_stages: int = 2) -> Tensor:
    """sparsecc::block_attention with the Triton kernel (semantics in `sparsecc.runtime.ops.block_attention`)."""
    refuse("block_attention", block_attention_problem(
        q, k, v, Layout(kv_num_blocks, kv_indices, full_num_blocks, full_indices), mask, scale, block_q, block_k,
        threshold, empty_rows, check_data=False, softcap=softcap, sinks=sinks))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kv_num_blocks, kv_indices, full_num_blocks, full_indices = (  # the kernel reads counts with stride 1
        t.to(q.device).contiguous() for t in (kv_num_blocks, kv_indices, full_num_blocks, full_indices))
    batch, heads, seq, dim = q.shape
    out = q.new_empty(batch, heads, seq, v.shape[3])
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    block_m = block_q if seq >= block_q else max(16, triton.next_power_of_2(seq))
    mask4 = None if mask is None else as_4d(mask).to(q.device).view(torch.uint8)
    mask_strides = [0, 0, 0] if mask4 is None else [*_broadcast_strides(mask4, 2), mask4.stride(2)]
    sinks = None if sinks is None else sinks.to(q.device, torch.float32).contiguous()
    grid = (triton.cdiv(seq, block_m), batch * heads)
    launcher(block_attention_kernel, grid)(
        q, k, v, out, lse, kv_num_blocks, kv_indices, full_num_blocks, full_indices,
        mask4 if mask4 is not None else lse, sinks if sinks is not None else lse, scale, float(softcap),
        math.log(threshold) if threshold > 0 else 0.0,
        seq, k.shape[2], heads, heads // k.shape[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *_broadcast_strides(full_num_blocks, 2), *_broadcast_strides(full_indices, 2), full_indices.stride(2),
        *mask_strides,
        HEAD_DIM=dim, V_DIM=v.shape[3], BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(v.shape[3])), BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_K=block_k,
        HAS_MASK=mask4 is not None, HAS_THRESHOLD=threshold > 0, HAS_SOFTCAP=softcap > 0,
        HAS_SINKS=sinks is not None, INPUT_PRECISION=input_precision(q.dtype),
        num_warps=num_warps or default_warps(block_m, block_k), num_stages=num_stages)
    return fill_empty_rows(out, lse, v, empty_rows).to(q.dtype)
