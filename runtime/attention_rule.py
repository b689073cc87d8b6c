"""Attention masks as rules: an AND of comparisons between a per-query and a per-key vector, never S x Skv.

    rows  [A, Bm, S]   int64     one vector over the query positions per term (Bm in {1, B})
    cols  [A, Bm, Skv] int64     one vector over the key positions per term
    ops   "ge,ne"                one comparison per term: lt, le, gt, ge, eq, ne

    visible(b, i, j) = AND over terms a of  rows[a, b, i]  ops[a]  cols[a, b, j]

The masks models build are of this form (`sparsecc.passes.attention.mask_rule` reads them off the
mask's producer graph): causal `pos[i] >= j`, a sliding window `pos[i] - w < j`, key padding
`0 != attention_mask[b, j]`, packed documents `doc[b, i] == doc[b, j]`, chunks `i // c == j // c`.
A rule costs O(A * B * (S + Skv)) memory; a partial block's elements are evaluated from it on the
fly, and a block's state (absent, partial, full) from the ranges of its rows' and keys' values:

    full    every term holds for every (i, j) of the block  (exact for every op)
    any     no term is false for every (i, j) of the block  (eq / ne judged by value ranges,
            so a block may be listed partial and turn out empty: never the reverse)

Positions past S or Skv in a ragged last block count as masked, as in `layout_from_mask`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

OPS = ("lt", "le", "gt", "ge", "eq", "ne")
MAX_TERMS = 8
_COMPARE = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne}


def rule_ops(ops: str) -> tuple[str, ...]:
    return tuple(ops.split(",")) if ops else ()


def rule_ops_problem(ops: str) -> Optional[str]:
    """None when `ops` names 1 to MAX_TERMS comparisons, else why not."""
    names = rule_ops(ops) if isinstance(ops, str) else ()
    if not 1 <= len(names) <= MAX_TERMS or any(name not in OPS for name in names):
        return f"rule ops {ops!r} must be 1 to {MAX_TERMS} of {', '.join(OPS)}, comma-separated"
    return None


def rule_problem(rows: Tensor, cols: Tensor, ops: str, batch: int, seq: int, keys: int) -> Optional[str]:
    """None when (rows, cols, ops) is a rule for [batch, ., seq, keys] attention, else why not."""
    names = rule_ops(ops)
    problem = rule_ops_problem(ops)
    if problem:
        return problem
    for name, vector, length in (("rows", rows, seq), ("cols", cols, keys)):
        if vector.dtype != torch.int64 or vector.dim() != 3:
            return f"rule {name} {vector.dtype}{list(vector.shape)} must be int64 [A, Bm, L]"
        if vector.shape[0] != len(names) or vector.shape[1] not in (1, batch) or vector.shape[2] != length:
            return (f"rule {name} {list(vector.shape)} must be [{len(names)}, 1|{batch}, {length}] "
                    f"({len(names)} terms in ops {ops!r})")
    if rows.shape[1] != cols.shape[1]:
        return f"rule rows {list(rows.shape)} and cols {list(cols.shape)} must share their batch dim"
    return None


def rule_batch(operands: list[Tensor]):
    """Bm of a rule's operands: the leading dim of their 4-d views that is not 1 (they broadcast, so all such
    agree), else 1. A symbolic one is returned as it is, so a fake shape rule adds no guard."""
    for t in operands:
        lead = t.shape[0] if t.dim() == 4 else 1
        if not (isinstance(lead, int) and lead == 1):
            return lead
    return 1


def stack_rule(rows: list[Tensor], cols: list[Tensor], seq: int, keys: int) -> tuple[Tensor, Tensor]:
    """Each term's operands as the graph holds them (broadcastable to [Bm, 1, S, 1] and [Bm, 1, 1, Skv],
    integer or bool) stacked into the rule's [A, Bm, S] and [A, Bm, Skv] int64."""
    batch = rule_batch([*rows, *cols])

    def vectors(terms: list[Tensor], length: int, axis: int) -> Tensor:
        out = []
        for t in terms:
            t4 = t.reshape(*(1,) * (4 - t.dim()), *t.shape)
            t4 = t4.expand(batch, 1, *((length, 1) if axis == 2 else (1, length)))
            out.append(t4.reshape(batch, length).to(torch.int64))
        return torch.stack(out)
    return vectors(rows, seq, 2), vectors(cols, keys, 3)


def rule_elements(rows: Tensor, cols: Tensor, ops: str, batches: Tensor, positions: Tensor,
                  keys: Tensor) -> Tensor:
    """Bool of the broadcast shape of (batches, positions, keys) index tensors: the rule at those
    elements. Batch indices address the rule's own batch dim (0 when it is 1)."""
    batches = batches if rows.shape[1] > 1 else torch.zeros_like(batches)
    visible = None
    for term, name in enumerate(rule_ops(ops)):
        holds = _COMPARE[name](rows[term][batches, positions], cols[term][batches, keys])
        visible = holds if visible is None else visible & holds
    return visible


def rule_mask(rows: Tensor, cols: Tensor, ops: str) -> Tensor:
    """Bool [Bm, 1, S, Skv]: the rule as a dense mask (tests, references and small fallbacks only)."""
    batch, seq, keys = rows.shape[1], rows.shape[2], cols.shape[2]
    b = torch.arange(batch, device=rows.device)[:, None, None]
    i = torch.arange(seq, device=rows.device)[None, :, None]
    j = torch.arange(keys, device=rows.device)[None, None, :]
    return rule_elements(rows, cols, ops, b, i, j)[:, None]


def _block_ranges(vectors: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(min, max) [A, Bm, N] of each block of the vectors [A, Bm, L] (a ragged last block over its values)."""
    length = vectors.shape[-1]
    n = math.ceil(length / block)
    extra = n * block - length
    info = torch.iinfo(torch.int64)

    def padded(fill: int) -> Tensor:  # torch.nn.functional.pad's float fill cannot hold int64 max exactly
        return torch.cat([vectors, vectors.new_full((*vectors.shape[:-1], extra), fill)], -1).unflatten(-1, (n, block))
    low, high = padded(info.max).amin(-1), padded(info.min).amax(-1)
    return low, high


def _whole(length: int, block: int, device) -> Tensor:
    n = math.ceil(length / block)
    return (torch.arange(n, device=device) + 1) * block <= length


def rule_block_states(rows: Tensor, cols: Tensor, ops: str, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """(any visible, all visible) [Bm, 1, NQ, NK] of the rule's blocks, from value ranges: O(A * Bm * NQ * NK)."""
    row_low, row_high = (r[..., :, None] for r in _block_ranges(rows, block_q))   # [A, Bm, NQ, 1]
    col_low, col_high = (c[..., None, :] for c in _block_ranges(cols, block_k))   # [A, Bm, 1, NK]
    any_visible = all_visible = None
    for term, name in enumerate(rule_ops(ops)):
        rl, rh, cl, ch = row_low[term], row_high[term], col_low[term], col_high[term]
        if name in ("lt", "le", "gt", "ge"):
            compare = _COMPARE[name]
            # lt / le hold somewhere iff the smallest row value beats the largest key value; everywhere
            # iff the largest row value does against the smallest key value (gt / ge mirror it)
            some, every = (compare(rl, ch), compare(rh, cl)) if name in ("lt", "le") else \
                (compare(rh, cl), compare(rl, ch))
        elif name == "eq":
            some = (rl <= ch) & (cl <= rh)
            every = (rl == rh) & (cl == ch) & (rl == cl)
        else:  # ne
            some = ~((rl == rh) & (cl == ch) & (rl == cl))
            every = (rh < cl) | (ch < rl)
        any_visible = some if any_visible is None else any_visible & some
        all_visible = every if all_visible is None else all_visible & every
    whole = _whole(rows.shape[-1], block_q, rows.device)[:, None] & _whole(cols.shape[-1], block_k, rows.device)
    return any_visible[:, None], (all_visible & whole)[:, None]


__all__ = ["MAX_TERMS", "OPS", "rule_batch", "rule_block_states", "rule_elements", "rule_mask", "rule_ops",
           "rule_ops_problem", "rule_problem", "stack_rule"]
