"""Function bodies of attention rules in standard ONNX (`sparsecc.runtime.attention_rule`): nothing S x Skv
but the elements `block_attention` evaluates.

rule_layout(seq, keys, q?, k?, rows_0.., cols_0..): each term's operands cast to int64, viewed 4-d
and expanded to [Bm, 1, S, 1] / [Bm, 1, 1, Skv] (Bm the largest leading dim), stacked into the rule
rule_rows [A, Bm, S], rule_cols [A, Bm, Skv]; each block's (min, max) of its rows' and keys' values
(a ragged last block over its own values) gives the block states, per term:

    lt / le   some: min row OP max key     every: max row OP min key    (gt / ge mirrored)
    eq        some: ranges overlap         every: both blocks one value, the same
    ne        some: not (eq's every)       every: ranges disjoint

any = AND of some, full = AND of every and whole blocks (inside S and Skv); the policy narrows them as
block_layout's (`functions_attention.narrowed_layout`). S and Skv are inputs, so a dynamic S works
(topk excepted: its pooled scores are shaped by S).

block_attention's rule: visible(b, i, j) = AND_a rule_rows[a, b, i] op_a rule_cols[a, b, j], [Bm, 1, S, Skv].
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto
from sparsecc.runtime.attention_rule import rule_ops, rule_ops_problem

from .attention_heads import blocks_of
from .body import Body
from .spec import CallSpec

_COMPARE = {"lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual", "eq": "Equal"}
_INT64 = np.iinfo(np.int64)


def _ops(text: str) -> tuple[str, ...]:
    problem = rule_ops_problem(text)
    if problem:
        raise ValueError(problem)
    return rule_ops(text)


def _compare(b: Body, name: str, left: str, right: str) -> str:
    return b.op("Not", b.op("Equal", left, right)) if name == "ne" else b.op(_COMPARE[name], left, right)


def _term(b: Body, stacked: str, term: int, axis: int) -> str:
    """Term `term` of a stacked rule side [A, Bm, L] with a unit dim inserted at `axis`."""
    return b.op("Unsqueeze", b.op("Gather", stacked, b.const(term), axis=0), b.ints(axis))


def rule_visible(b: Body, rows: str, cols: str, ops: str) -> str:
    """Bool [Bm, 1, S, Skv]: the rule's elements (every head of batch row b shares them)."""
    visible = None
    for term, name in enumerate(_ops(ops)):
        holds = _compare(b, name, _term(b, rows, term, 2), _term(b, cols, term, 1))
        visible = holds if visible is None else b.op("And", visible, holds)
    return b.op("Unsqueeze", visible, b.ints(1))


def _stacked(b: Body, names: list[str], ranks: list[int], batch: str, size: str, axis: int) -> str:
    """[A, Bm, L] int64: the terms' operands expanded to [Bm, 1, L, 1] (axis 2) or [Bm, 1, 1, L] (axis 3)."""
    dims = [batch, b.ints(1), b.ints(1), b.ints(1)]
    dims[axis] = b.op("Unsqueeze", size, b.ints(0))
    target = b.op("Concat", *dims, axis=0)
    vectors = []
    for name, rank in zip(names, ranks):
        wide = b.op("Cast", name, to=TensorProto.INT64)
        wide = wide if rank == 4 else b.op("Unsqueeze", wide, b.ints(*range(4 - rank)))
        flat = b.op("Reshape", b.op("Expand", wide, target), b.ints(0, -1))
        vectors.append(b.op("Unsqueeze", flat, b.ints(0)))
    return b.op("Concat", *vectors, axis=0)


def _rule_batch(b: Body, names: list[str], ranks: list[int]) -> str:
    """[1] int64: the largest leading dim of the operands viewed 4-d (1 when none has 4 dims)."""
    leads = [b.op("Shape", name, start=0, end=1) for name, rank in zip(names, ranks) if rank == 4]
    return b.op("Max", *leads, b.ints(1)) if leads else b.ints(1)


def _ranges(b: Body, stacked: str, size: str, block: int) -> tuple[str, str]:
    """(min, max) [A, Bm, N] of each block of the rule side [A, Bm, L]; padding never wins either."""
    extra = b.op("Sub", b.op("Mul", blocks_of(b, size, block), b.const(block)), size)
    pads = b.op("Concat", b.ints(0, 0, 0, 0, 0), b.op("Unsqueeze", extra, b.ints(0)), axis=0)

    def reduced(fill: int, reduce: str) -> str:
        padded = b.op("Pad", stacked, pads, b.const(fill))
        return b.op(reduce, b.op("Reshape", padded, b.ints(0, 0, -1, block)), b.ints(3), keepdims=0)
    return reduced(_INT64.max, "ReduceMin"), reduced(_INT64.min, "ReduceMax")


def _term_states(b: Body, name: str, rows: tuple[str, str], cols: tuple[str, str]) -> tuple[str, str]:
    """(some, every) [Bm, NQ, NK] of one term from its rows' (min, max) [Bm, NQ, 1] and keys' [Bm, 1, NK]."""
    (rl, rh), (cl, ch) = rows, cols
    if name in ("lt", "le"):
        return _compare(b, name, rl, ch), _compare(b, name, rh, cl)
    if name in ("gt", "ge"):
        return _compare(b, name, rh, cl), _compare(b, name, rl, ch)
    single = b.op("And", b.op("And", b.op("Equal", rl, rh), b.op("Equal", cl, ch)), b.op("Equal", rl, cl))
    if name == "eq":
        return b.op("And", b.op("LessOrEqual", rl, ch), b.op("LessOrEqual", cl, rh)), single
    return b.op("Not", single), b.op("Or", b.op("Less", rh, cl), b.op("Less", ch, rl))


def _whole(b: Body, size: str, block: int) -> str:
    """[N] bool: blocks inside the length."""
    ends = b.op("Mul", b.op("Add", b.op("Range", b.const(0), blocks_of(b, size, block), b.const(1)), b.const(1)),
                b.const(block))
    return b.op("LessOrEqual", ends, size)


def rule_states(b: Body, rows: str, cols: str, ops: str, seq: str, keys: str, bq: int,
                bk: int) -> tuple[str, str]:
    """(any visible, all visible) [Bm, 1, NQ, NK] of the stacked rule's blocks."""
    row_ranges, col_ranges = _ranges(b, rows, seq, bq), _ranges(b, cols, keys, bk)
    some = every = None
    for term, name in enumerate(_ops(ops)):
        term_rows = tuple(_term(b, r, term, 2) for r in row_ranges)
        term_cols = tuple(_term(b, c, term, 1) for c in col_ranges)
        s, e = _term_states(b, name, term_rows, term_cols)
        some = s if some is None else b.op("And", some, s)
        every = e if every is None else b.op("And", every, e)
    whole = b.op("And", b.op("Unsqueeze", _whole(b, seq, bq), b.ints(1)), _whole(b, keys, bk))
    return b.op("Unsqueeze", some, b.ints(1)), b.op("Unsqueeze", b.op("And", every, whole), b.ints(1))


RULE_LAYOUT_FIXED = ("seq", "keys", "q", "k")   # then rows_0 .. rows_{A-1}, cols_0 .. cols_{A-1}


def rule_layout_inputs(spec: CallSpec) -> list[str]:
    """The body's input names: the fixed ones, then each term's rows and cols operands."""
    count = len(_ops(spec.attrs["ops"]))
    if len(spec.operands) != len(RULE_LAYOUT_FIXED) + 2 * count:
        raise ValueError(f"{len(spec.operands) - len(RULE_LAYOUT_FIXED)} rule operands for the {count} terms "
                         f"of ops {spec.attrs['ops']!r}")
    return [*RULE_LAYOUT_FIXED, *(f"rows_{i}" for i in range(count)), *(f"cols_{i}" for i in range(count))]


def stacked_rule(b: Body, spec: CallSpec) -> tuple[str, str, str, str]:
    """(rule_rows [A, Bm, S], rule_cols [A, Bm, Skv] int64, S, Skv 0-d) of a rule_layout body."""
    names = rule_layout_inputs(spec)[len(RULE_LAYOUT_FIXED):]
    ranks = [t.rank for t in spec.operands[len(RULE_LAYOUT_FIXED):]]
    count = len(names) // 2
    seq, keys = (b.op("Reshape", name, b.ints()) for name in ("seq", "keys"))
    batch = _rule_batch(b, names, ranks)
    rows = _stacked(b, names[:count], ranks[:count], batch, seq, 2)
    return rows, _stacked(b, names[count:], ranks[count:], batch, keys, 3), seq, keys
