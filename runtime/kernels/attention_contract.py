"""What a `sparsecc::block_attention` call must satisfy: checked by the op's verifier (every pass, and at
load with real constants) and by the kernels per call. Shapes, dtypes and attributes are O(1); the
layout's values (`attention_layout.layout_problem`) are read when `check_data` says so."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..attention_layout import Layout, as_4d, layout_problem
from ..attention_rule import rule_problem

EMPTY_ROWS = ("zero", "uniform", "nan")


def block_size_problem(block_q: int, block_k: int) -> Optional[str]:
    """Block sizes the kernels tile by: powers of two from 16 (64 and 128 are the tuned ones)."""
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 16 or size & (size - 1):
            return f"{name}={size} must be a power of two >= 16"
    return None


def operand_problem(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} must be [B, H, S, D]"
    if k.shape[0] != q.shape[0] or list(v.shape)[:3] != list(k.shape)[:3] or k.shape[3] != q.shape[3]:
        return f"k {list(k.shape)} and v {list(v.shape)} do not match q {list(q.shape)} (same B, Skv, D)"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads"
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        return f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must be one floating dtype"
    return None


def mask_problem(q: Tensor, k: Tensor, mask: Optional[Tensor]) -> Optional[str]:
    if mask is None:
        return None
    batch, heads, seq = q.shape[:3]
    if mask.dtype != torch.bool or not 2 <= mask.dim() <= 4:
        return f"mask {mask.dtype}{list(mask.shape)} must be bool [Bm, Hm, S, Skv]"
    lead = list(as_4d(mask).shape)[:2]
    if lead[0] not in (1, batch) or lead[1] not in (1, heads) or list(mask.shape)[-2:] != [seq, k.shape[2]]:
        return f"mask {list(mask.shape)} must be [1|{batch}, 1|{heads}, {seq}, {k.shape[2]}]"
    return None


def rule_call_problem(q: Tensor, k: Tensor, mask: Optional[Tensor], rule_rows: Optional[Tensor],
                      rule_cols: Optional[Tensor], rule_ops: str) -> Optional[str]:
    """A rule (rows, cols, ops: `attention_rule`) comes whole and alone: never beside a mask."""
    if rule_rows is None and rule_cols is None:
        return f"rule ops {rule_ops!r} given without rule_rows and rule_cols" if rule_ops else None
    if rule_rows is None or rule_cols is None:
        return "rule_rows and rule_cols must be given together"
    if mask is not None:
        return "a mask and a rule were both given: partial blocks take one of them"
    return rule_problem(rule_rows, rule_cols, rule_ops, q.shape[0], q.shape[2], k.shape[2])


def attr_problem(scale: float, threshold: float, empty_rows: str) -> Optional[str]:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        return f"scale={scale!r} must be a finite number"
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        return f"threshold={threshold!r} must be in [0, 1)"
    return None if empty_rows in EMPTY_ROWS else f"empty_rows {empty_rows!r} is not one of {', '.join(EMPTY_ROWS)}"


def variant_problem(q: Tensor, softcap: float, sinks: Optional[Tensor]) -> Optional[str]:
    """Logit softcapping (0 = off) and learned sink logits (one per query head)."""
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not math.isfinite(softcap) \
            or softcap < 0:
        return f"softcap={softcap!r} must be a finite number > 0 (0 = no softcapping)"
    if sinks is not None and (list(sinks.shape) != [q.shape[1]] or not sinks.dtype.is_floating_point):
        return f"sinks {sinks.dtype}{list(sinks.shape)} must be one float logit per query head [{q.shape[1]}]"
    return None


def block_attention_problem(q: Tensor, k: Tensor, v: Tensor, layout: Layout, mask: Optional[Tensor], scale: float,
                            block_q: int, block_k: int, threshold: float, empty_rows: str,
                            check_data: bool, softcap: float = 0.0, sinks: Optional[Tensor] = None,
                            rule_rows: Optional[Tensor] = None, rule_cols: Optional[Tensor] = None,
                            rule_ops: str = "") -> Optional[str]:
    """None when a block_attention call is well formed, else the first problem found."""
    problem = operand_problem(q, k, v) or block_size_problem(block_q, block_k)
    if problem:
        return problem
    nq, nk = math.ceil(q.shape[2] / block_q), math.ceil(k.shape[2] / block_k)
    problem = layout_problem(layout, q.shape[0], q.shape[1], nq, nk, check_data)
    return (problem or mask_problem(q, k, mask) or rule_call_problem(q, k, mask, rule_rows, rule_cols, rule_ops)
            or attr_problem(scale, threshold, empty_rows) or variant_problem(q, softcap, sinks))
