"""Triton kernel for sparsecc::block_attention: flash-attention forward that walks the block layout.

Grid (query tiles, B * Hq). A program holds BLOCK_M query rows of one head:
the whole query block (BLOCK_M = block_q), or, when S < block_q (decode), the
S rows rounded up to a power of two >= 16. It reads its block's lists from the
layout (batch and head strides 0 where the layout broadcasts) and visits

    full blocks     q k^T, no per-element work at all
    partial blocks  the same where visible(i, j): the mask tile, or the rule (an AND of
                    rule_rows[a, b, i] OP_a rule_cols[a, b, j], `sparsecc.runtime.attention_rule`),
                    or without either the causal rule j <= i + Skv - S

with an online softmax in fp32 in base 2: logits are q k^T * scale * log2(e) (one scalar,
folded on the host), so each element costs one exp2; m, the softcap and the threshold are in
the same units. kv head = h // (Hq / Hkv) by index arithmetic. THRESHOLD: a block whose largest
logit lies, on every row, more than log(1/threshold) below m is skipped before its V tile is
loaded (rows past S are masked first, only then: they must not steer skipping). The program
writes out = acc / l and lse = (m + log2(l)) * ln(2) (-inf when a row saw nothing); the launcher
fills such rows as `empty_rows` says. HAS_SOFTCAP caps each logit (softcap * tanh(s / softcap))
before the mask; HAS_SINKS folds the head's sink logit into (m, l) after the last block, so no
row is empty. A rule's ops are one constexpr int, 3 bits per term (codes are indices into
`attention_rule.OPS`), unrolled: each term compiles to one load of each vector and one compare.
Layout values are clamped where they are read (counts into [0, NK], block numbers into
[0, NK)), and K / V loads stay bounded by Skv, so no layout reaches outside k, v or its own
index row; the launcher checks shapes and attributes (O(1)) and never waits on the device.
Tile configurations: block_q / block_k come from the layout, `num_warps` (default
`default_warps`) and `num_stages` are launcher arguments that `bench/gpu_tune.py` sweeps.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...attention_layout import Layout, as_4d
from ...attention_rule import OPS, rule_ops
from ..attention_contract import block_attention_problem
from ..checks import refuse
from ..cpu.block_attention import fill_empty_rows
from .launch import input_precision, jit, launcher

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
RULE_OP_BITS = 3  # per term in RULE_OPS (OPS has 6 comparisons); `_visible` unpacks with the literals 3 and 7


@triton.jit
def _scores(q, kb, b, kvh, k_ptr, qk_scale, softcap, keys, stride_kb, stride_kh, stride_ks,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Logits of key block kb in base 2: q k^T * scale * log2(e), softcapped in the same units."""
    col = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + b * stride_kb + kvh * stride_kh + col[:, None] * stride_ks + d[None, :],
                mask=(col < keys)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if HAS_SOFTCAP:  # log2(e) * softcap * tanh(x / softcap) for x = s / log2(e); tanh = 1 - 2 / (exp(2y) + 1)
        s = (softcap * LOG2E) * (1.0 - 2.0 / (tl.exp2(s * (2.0 / softcap)) + 1.0))
    return s


@triton.jit
def _holds(r, c, OP: tl.constexpr):
    """r OP c for an op code (the index of the comparison in `attention_rule.OPS`)."""
    if OP == 0:
        out = r < c
    elif OP == 1:
        out = r <= c
    elif OP == 2:
        out = r > c
    elif OP == 3:
        out = r >= c
    elif OP == 4:
        out = r == c
    else:
        out = r != c
    return out


@triton.jit
def _visible(row, col, b, h, seq, keys, mask_ptr, stride_mb, stride_mh, stride_ms, rows_ptr, cols_ptr,
             stride_ra, stride_rb, stride_ca, stride_cb,
             HAS_MASK: tl.constexpr, RULE_TERMS: tl.constexpr, RULE_OPS: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_K]: the elements of a partial block the program attends to."""
    in_rows, in_cols = row < seq, col < keys
    visible = in_rows[:, None] & in_cols[None, :]
    if HAS_MASK:
        tile = tl.load(mask_ptr + b * stride_mb + h * stride_mh + row[:, None] * stride_ms + col[None, :],
                       mask=visible, other=0)
        visible = visible & (tile != 0)
    elif RULE_TERMS > 0:  # heads share the rule; its batch stride is 0 when it broadcasts
        for a in tl.static_range(RULE_TERMS):
            r = tl.load(rows_ptr + a * stride_ra + b * stride_rb + row, mask=in_rows, other=0)
            c = tl.load(cols_ptr + a * stride_ca + b * stride_cb + col, mask=in_cols, other=0)
            visible = visible & _holds(r[:, None], c[None, :], (RULE_OPS >> (3 * a)) & 7)
    else:
        visible = visible & (col[None, :] <= row[:, None] + (keys - seq))
    return visible


@triton.jit
def _accumulate(s, m_i, l_i, acc, kb, b, kvh, v_ptr, log2_threshold, keys, stride_vb, stride_vh, stride_vs,
                V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_THRESHOLD: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Base-2 logits s of key block kb into the running (m, l, acc), unless the threshold skips it."""
    block_max = tl.max(s, 1)
    keep = True
    if HAS_THRESHOLD:
        gap = tl.where(block_max == float("-inf"), float("-inf"), block_max - m_i)
        keep = tl.max(gap, 0) >= log2_threshold
    if keep:
        m_new = tl.maximum(m_i, block_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        col = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        dv = tl.arange(0, BLOCK_DV)
        v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + col[:, None] * stride_vs + dv[None, :],
                    mask=(col < keys)[:, None] & (dv < V_DIM)[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@jit(per_call=("seq", "keys", "stride_ra", "stride_rb", "stride_ca", "stride_cb"))
def block_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr,
                           full_idx_ptr, mask_ptr, rows_ptr, cols_ptr, sinks_ptr, qk_scale, softcap, log2_threshold,
                           seq, keys, heads, groups,
                           stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                           stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                           stride_nb, stride_nh, stride_ib, stride_ih, stride_iq,
                           stride_mb, stride_mh, stride_ms, stride_ra, stride_rb, stride_ca, stride_cb,
                           HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, RULE_TERMS: tl.constexpr,
                           RULE_OPS: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
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
        s = _scores(q, kb, b, kvh, k_ptr, qk_scale, softcap, keys, stride_kb, stride_kh, stride_ks,
                    HEAD_DIM, BLOCK_D, BLOCK_K, HAS_SOFTCAP, INPUT_PRECISION)
        if HAS_THRESHOLD:  # rows past S (a ragged or decode tile) are never stored, but must not steer skipping
            s = tl.where((row < seq)[:, None], s, float("-inf"))
        m_i, l_i, acc = _accumulate(s, m_i, l_i, acc, kb, b, kvh, v_ptr, log2_threshold, keys,
                                    stride_vb, stride_vh, stride_vs, V_DIM, BLOCK_DV, BLOCK_K, HAS_THRESHOLD,
                                    INPUT_PRECISION)
    for i in range(tl.minimum(tl.maximum(tl.load(kv_num_ptr + counts), 0), key_blocks)):
        kb = tl.minimum(tl.maximum(tl.load(kv_idx_ptr + lists + i), 0), key_blocks - 1)
        s = _scores(q, kb, b, kvh, k_ptr, qk_scale, softcap, keys, stride_kb, stride_kh, stride_ks,
                    HEAD_DIM, BLOCK_D, BLOCK_K, HAS_SOFTCAP, INPUT_PRECISION)
        visible = _visible(row, kb * BLOCK_K + tl.arange(0, BLOCK_K), b, h, seq, keys, mask_ptr,
                           stride_mb, stride_mh, stride_ms, rows_ptr, cols_ptr, stride_ra, stride_rb,
                           stride_ca, stride_cb, HAS_MASK, RULE_TERMS, RULE_OPS)
        m_i, l_i, acc = _accumulate(tl.where(visible, s, float("-inf")), m_i, l_i, acc, kb, b, kvh, v_ptr,
                                    log2_threshold, keys, stride_vb, stride_vh, stride_vs, V_DIM, BLOCK_DV,
                                    BLOCK_K, HAS_THRESHOLD, INPUT_PRECISION)
    if HAS_SINKS:  # one more logit per head whose value vector is 0: it only adds to the row sum
        sink = tl.load(sinks_ptr + h) * LOG2E
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    dv = tl.arange(0, BLOCK_DV)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + row[:, None] * stride_os + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(row < seq)[:, None] & (dv < V_DIM)[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * seq + row, lse, mask=row < seq)


def default_warps(block_m: int, block_k: int) -> int:
    """8 warps for 128x128 tiles, else 4: the best of `bench/gpu_tune.py` on an H200 (fp16, head dim 128)."""
    return 8 if block_m >= 128 and block_k >= 128 else 4


def _broadcast_strides(t: Tensor, dims: int) -> list[int]:
    """Strides of the first `dims` dims, 0 where the size is 1 (the layout or mask broadcasts there)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(dims)]


def _rule_operands(rule_rows: Optional[Tensor], rule_cols: Optional[Tensor], ops: str, fallback: Tensor):
    """(rows, cols, [term and batch strides of each], RULE_TERMS, RULE_OPS) as the kernel takes them."""
    if rule_rows is None:
        return fallback, fallback, [0, 0, 0, 0], 0, 0
    rows, cols = (t.to(fallback.device).contiguous() for t in (rule_rows, rule_cols))
    strides = [rows.stride(0), _broadcast_strides(rows, 2)[1], cols.stride(0), _broadcast_strides(cols, 2)[1]]
    codes = sum(OPS.index(name) << (RULE_OP_BITS * term) for term, name in enumerate(rule_ops(ops)))
    return rows, cols, strides, len(rule_ops(ops)), codes


def block_attention_triton(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                           full_num_blocks: Tensor, full_indices: Tensor, mask: Optional[Tensor], scale: float,
                           block_q: int, block_k: int, threshold: float = 0.0, empty_rows: str = "zero",
                           softcap: float = 0.0, sinks: Optional[Tensor] = None, rule_rows: Optional[Tensor] = None,
                           rule_cols: Optional[Tensor] = None, rule_ops: str = "", *,
                           num_warps: Optional[int] = None, num_stages: int = 2) -> Tensor:
    """sparsecc::block_attention with the Triton kernel (semantics in `sparsecc.runtime.ops.block_attention`)."""
    refuse("block_attention", block_attention_problem(
        q, k, v, Layout(kv_num_blocks, kv_indices, full_num_blocks, full_indices), mask, scale, block_q, block_k,
        threshold, empty_rows, check_data=False, softcap=softcap, sinks=sinks, rule_rows=rule_rows,
        rule_cols=rule_cols, rule_ops=rule_ops))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kv_num_blocks, kv_indices, full_num_blocks, full_indices = (  # the kernel reads counts with stride 1
        t.to(q.device).contiguous() for t in (kv_num_blocks, kv_indices, full_num_blocks, full_indices))
    batch, heads, seq, dim = q.shape
    out = q.new_empty(batch, heads, seq, v.shape[3])
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    block_m = block_q if seq >= block_q else max(16, triton.next_power_of_2(seq))
    mask4 = None if mask is None else as_4d(mask).to(q.device).view(torch.uint8)
    mask_strides = [0, 0, 0] if mask4 is None else [*_broadcast_strides(mask4, 2), mask4.stride(2)]
    rows, cols, rule_strides, terms, codes = _rule_operands(rule_rows, rule_cols, rule_ops, lse)
    sinks = None if sinks is None else sinks.to(q.device, torch.float32).contiguous()
    grid = (triton.cdiv(seq, block_m), batch * heads)
    launcher(block_attention_kernel, grid)(
        q, k, v, out, lse, kv_num_blocks, kv_indices, full_num_blocks, full_indices,
        mask4 if mask4 is not None else lse, rows, cols, sinks if sinks is not None else lse,
        scale * LOG2E.value, float(softcap), math.log2(threshold) if threshold > 0 else 0.0,
        seq, k.shape[2], heads, heads // k.shape[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *_broadcast_strides(full_num_blocks, 2), *_broadcast_strides(full_indices, 2), full_indices.stride(2),
        *mask_strides, *rule_strides,
        HEAD_DIM=dim, V_DIM=v.shape[3], BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(v.shape[3])), BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_K=block_k,
        HAS_MASK=mask4 is not None, RULE_TERMS=terms, RULE_OPS=codes, HAS_THRESHOLD=threshold > 0,
        HAS_SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None, INPUT_PRECISION=input_precision(q.dtype),
        num_warps=num_warps or default_warps(block_m, block_k), num_stages=num_stages)
    return fill_empty_rows(out, lse, v, empty_rows).to(q.dtype)
