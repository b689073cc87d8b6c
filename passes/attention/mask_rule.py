"""Read an attention mask's producer graph as a rule: an AND of comparisons of per-query and per-key vectors.

The mask of a model is built from positions and per-row inputs, e.g. transformers'

    causal   index(positions, [b, q]) >= index(positions, [b, k])      (cache positions vs key positions)
    window   q_pos - w < k_pos                                           (sliding-window layers)
    padding  index(attention_mask.bool(), [b, k])                        (a per-key vector)
    packed   index(doc_ids, [b, q]) == index(doc_ids, [b, k])            (documents packed in one row)

joined with `&`, under casts, expands and leading unsqueezes; hand-written masks add `tril`/`triu` of
ones and `arange(S)[:, None] >= arange(S)[None, :]`. Each comparison whose one operand varies only
along the query dim and the other only along the key dim is a term of the rule
(`sparsecc.runtime.attention_rule`): the layout and the kernel read the operands, O(B * S), and the
S x Skv mask is never built. Anything else (an OR of terms, a mask that differs per head, a
comparison of values that vary along both dims, floating values) is not a rule: `read_rule` raises
NotARule with the reason, and the site keeps its materialised mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch.fx import Node

from ..graph import VALUE_PRESERVING

aten = torch.ops.aten
COMPARISONS = {getattr(aten, name).Tensor: name for name in ("lt", "le", "gt", "ge", "eq", "ne")} | {
    getattr(aten, name).Scalar: name for name in ("lt", "le", "gt", "ge", "eq", "ne")}
MIRRORED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}    # a OP b == b MIRRORED[OP] a
NEGATED = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}     # not (a OP b) == a NEGATED[OP] b
AND = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor}
NOT = {aten.bitwise_not.default, aten.logical_not.default}
OR = {aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default, aten.add.Tensor, aten.where.self}
TRUE = {aten.new_ones.default, aten.ones.default, aten.ones_like.default}
BROADCASTS = {aten.expand.default, aten.unsqueeze.default, aten.view.default, aten.reshape.default,
              aten._unsafe_view.default}
TRIANGLES = {aten.tril.default: "ge", aten.triu.default: "le"}   # tril keeps j <= i + d: (i + d) ge j


class NotARule(ValueError):
    """The mask is not an AND of per-query x per-key comparisons; the message says what is in the way."""


@dataclass(frozen=True)
class Positions:
    """arange(length) + offset along the query (axis -2) or key (axis -1) dim: what tril / triu compare."""
    length: int
    offset: int
    axis: int


Operand = Union[Node, int, Positions]


@dataclass(frozen=True)
class Term:
    rows: Operand   # varies along the query dim only (or not at all)
    cols: Operand   # varies along the key dim only (or not at all)
    op: str


@dataclass(frozen=True)
class MaskRule:
    terms: tuple[Term, ...]

    @property
    def ops(self) -> str:
        return ",".join(term.op for term in self.terms)

    @property
    def operands(self) -> list[Node]:
        """The graph values the rule reads (recorded to check the rule against the mask)."""
        return [side for term in self.terms for side in (term.rows, term.cols) if isinstance(side, Node)]


def read_rule(mask: Node) -> MaskRule:
    """The rule `mask` (bool [Bm, Hm, S, Skv], or fewer leading dims) is built by; raises NotARule."""
    terms = tuple(_terms(mask))
    if not terms:
        raise NotARule("the mask is constant True: every key is visible, nothing to skip")
    return MaskRule(terms)


def _shape(node: Node) -> list:
    return list(node.meta["val"].shape)


def _keeps_last_two(node: Node, source: Node) -> bool:
    """Whether `node` (a broadcast or reshape of `source`) keeps source's last two dims where they were."""
    out, inp = _shape(node), _shape(source)
    if node.target is aten.unsqueeze.default:
        dim = node.args[1] % len(out)
        return dim < len(out) - 2 and len(out) <= 4
    if node.target is aten.expand.default:
        return len(out) <= 4
    tail = 2 if len(inp) >= 2 else len(inp)
    return len(out) <= 4 and len(out) >= tail and out[len(out) - tail:] == inp[len(inp) - tail:] and \
        _numel(out) == _numel(inp)


def _numel(shape: list) -> object:
    total = 1
    for size in shape:
        total = total * size
    return total


def _terms(node: Node) -> list[Term]:
    if not isinstance(node, Node):
        if node is True or node == 1:
            return []
        raise NotARule(f"the mask is built from the constant {node!r}")
    if _is_leaf(node):
        return [_leaf(node)]
    if node.target in VALUE_PRESERVING:
        if node.meta["val"].dtype != torch.bool:
            raise NotARule(f"{node.name} casts the mask to {node.meta['val'].dtype}")
        return _terms(node.args[0])
    if node.target in BROADCASTS:
        if not _keeps_last_two(node, node.args[0]):
            raise NotARule(f"{node.name} ({node.target}) moves the mask's query or key dim")
        return _terms(node.args[0])
    if node.target in AND and all(isinstance(a, Node) and a.meta["val"].dtype == torch.bool for a in node.args[:2]):
        return _terms(node.args[0]) + _terms(node.args[1])
    if node.target in TRUE and node.meta["val"].dtype == torch.bool:
        return []
    if node.target is aten.full.default and node.args[1] in (True, 1):
        return []
    if node.target in NOT:
        inner = _terms(node.args[0])
        if len(inner) != 1:
            raise NotARule(f"{node.name} negates an AND of {len(inner)} terms (an OR): not a rule")
        return [Term(inner[0].rows, inner[0].cols, NEGATED[inner[0].op])]
    if node.target in OR:
        raise NotARule(f"{node.name} joins masks with {node.target} (an OR): not an AND of comparisons")
    if node.target in COMPARISONS:
        return [_comparison(node, COMPARISONS[node.target])]
    if node.target in TRIANGLES:
        return _terms(node.args[0]) + [_triangle(node)]
    return [_leaf(node)]


def _is_leaf(node: Node) -> bool:
    """Whether `node` is casts and broadcasts of a value that is not built of masks: a per-row or
    per-key bool input (e.g. a padding mask). The outermost node is the operand: its dims are the mask's."""
    while isinstance(node, Node) and node.target in {*VALUE_PRESERVING, *BROADCASTS}:
        node = node.args[0]
    if not isinstance(node, Node):
        return False
    structure = AND | NOT | OR | TRUE | set(COMPARISONS) | set(TRIANGLES) | {aten.full.default}
    return node.target not in structure


def _side(operand) -> str:
    """'rows' (varies along the query dim only), 'cols' (key dim only), 'none' (neither), or raises."""
    if not isinstance(operand, Node):
        if isinstance(operand, bool) or not isinstance(operand, int):
            raise NotARule(f"the mask compares with {operand!r}, not an integer")
        return "none"
    value = operand.meta["val"]
    if value.dtype.is_floating_point or value.dtype.is_complex:
        raise NotARule(f"{operand.name} compares {value.dtype} values (only integer and bool rules are read)")
    shape = [1] * (4 - value.dim()) + list(value.shape)
    if len(shape) > 4:
        raise NotARule(f"{operand.name} has {value.dim()} dims (a mask has at most 4)")
    if shape[1] != 1:
        raise NotARule(f"{operand.name} {list(value.shape)} differs per head")
    varies_q, varies_k = shape[2] != 1, shape[3] != 1
    if varies_q and varies_k:
        raise NotARule(f"{operand.name} {list(value.shape)} varies along both the query and the key dim")
    return "rows" if varies_q else "cols" if varies_k else "none"


def _comparison(node: Node, op: str) -> Term:
    left, right = node.args[0], node.args[1]
    sides = (_side(left), _side(right))
    if sides[0] == "cols" or sides[1] == "rows":
        if sides[0] == sides[1]:
            raise NotARule(f"{node.name} compares two values that vary along the same dim with each other")
        return Term(right, left, MIRRORED[op])
    return Term(left, right, op)


def _triangle(node: Node) -> Term:
    """tril(x, d): j <= i + d, i.e. (i + d) ge j; triu(x, d): (i + d) le j; positions of x's own last dims."""
    rows, cols = _shape(node.args[0])[-2:]
    diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
    if not all(isinstance(n, int) for n in (rows, cols, diagonal)):
        raise NotARule(f"{node.name} is a {node.target} over a dynamic shape")
    return Term(Positions(rows, diagonal, -2), Positions(cols, 0, -1), TRIANGLES[node.target])


def _leaf(node: Node) -> Term:
    """A bool value that varies along one dim: visible where it is True, `value != 0` as a term."""
    value = node.meta["val"]
    if value.dtype != torch.bool:
        raise NotARule(f"the mask is built by {node.target} on {value.dtype}")
    side = _side(node)
    return Term(node, 0, "ne") if side != "cols" else Term(0, node, "ne")


__all__ = ["MaskRule", "NotARule", "Positions", "Term", "read_rule"]
