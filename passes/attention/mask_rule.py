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
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
BROADCASTS = {aten.expand.default, aten.unsqueeze.default, *RESHAPES}
MASK_DIMS = ("b", "h", "q", "k")   # what each dim of a [B, H, S, Skv] mask runs over
INTEGERS = (torch.int64, torch.int32)  # narrower ints wrap against a scalar; the rule compares in int64
TRIANGLES = {aten.tril.default: "ge", aten.triu.default: "le"}   # tril keeps j <= i + d: (i + d) ge j


class NotARule(ValueError):
    """The mask is not an AND of per-query x per-key comparisons; the message says what is in the way."""


@dataclass(frozen=True)
class Positions:
    """arange(length) + offset along the query (axis -2) or key (axis -1) dim: what tril / triu compare."""
    length: int
    offset: int
    axis: int


@dataclass(frozen=True)
class Placed:
    """A graph value whose dims sit elsewhere than torch's right-aligned broadcasting puts them in the
    [B, H, S, Skv] mask (e.g. [B, Skv] under an unsqueeze): unsqueezed at `dims`, in order, it lines up."""
    node: Node
    dims: tuple[int, ...]


Operand = Union[Node, int, Positions, Placed]


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
        sides = [side for term in self.terms for side in (term.rows, term.cols)]
        return [side.node if isinstance(side, Placed) else side for side in sides if isinstance(side, (Node, Placed))]


def read_rule(mask: Node) -> MaskRule:
    """The rule `mask` (bool [Bm, Hm, S, Skv], or fewer leading dims) is built by; raises NotARule."""
    rank = mask.meta["val"].dim()
    if not 2 <= rank <= 4:
        raise NotARule(f"the mask has {rank} dims (2 to 4 are read)")
    terms = tuple(_terms(mask, MASK_DIMS[4 - rank:]))
    if not terms:
        raise NotARule("the mask is constant True: every key is visible, nothing to skip")
    return MaskRule(terms)


Dims = tuple[str, ...]   # per dim of a value, the mask dim it runs over (MASK_DIMS)


def _shape(node: Node) -> list:
    return list(node.meta["val"].shape)


def _inner_dims(node: Node, dims: Dims) -> Dims:
    """The mask dims of the input of a broadcast / unsqueeze / reshape `node` whose own dims are `dims`;
    raises NotARule where the op moves a dim (a reshape other than adding or dropping leading ones)."""
    inner = node.args[0].meta["val"].dim()
    if node.target is aten.unsqueeze.default:
        at = node.args[1] % len(dims)
        return dims[:at] + dims[at + 1:]
    if node.target is aten.expand.default:
        return dims[len(dims) - inner:]
    out, inp = _shape(node), _shape(node.args[0])
    if [str(n) for n in _strip_leading_ones(out)] != [str(n) for n in _strip_leading_ones(inp)]:
        raise NotARule(f"{node.name} reshapes the mask {inp} -> {out}, moving its dims")
    extra = inner - len(dims)   # leading ones the input has beyond the output's dims
    first = MASK_DIMS.index(dims[0]) - extra if dims else 4 - inner
    if first < 0:
        raise NotARule(f"{node.name} reshapes the mask to more than 4 dims")
    return MASK_DIMS[first:first + extra] + dims[max(0, -extra):]


def _strip_leading_ones(shape: list) -> list:
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def _terms(node, dims: Dims) -> list[Term]:
    if not isinstance(node, Node):
        if node is True or node == 1:
            return []
        raise NotARule(f"the mask is built from the constant {node!r}")
    if _is_leaf(node):
        return [_leaf(node, dims)]
    if node.target in VALUE_PRESERVING:
        if node.meta["val"].dtype != torch.bool:
            raise NotARule(f"{node.name} casts the mask to {node.meta['val'].dtype}")
        return _cast_to_bool(node.args[0], dims) if node.args[0].meta["val"].dtype != torch.bool else \
            _terms(node.args[0], dims)
    if node.meta["val"].dtype != torch.bool:
        raise NotARule(f"{node.name} ({node.target}) computes {node.meta['val'].dtype}, not a bool mask")
    if node.target in BROADCASTS:
        return _terms(node.args[0], _inner_dims(node, dims))
    if node.target in AND and all(isinstance(a, Node) and a.meta["val"].dtype == torch.bool for a in node.args[:2]):
        return [t for a in node.args[:2] for t in _terms(a, dims[len(dims) - a.meta["val"].dim():])]
    if _all_true(node):
        return []
    if node.target in NOT:
        inner = _terms(node.args[0], dims)
        if len(inner) != 1:
            raise NotARule(f"{node.name} negates an AND of {len(inner)} terms (an OR): not a rule")
        return [Term(inner[0].rows, inner[0].cols, NEGATED[inner[0].op])]
    if node.target in OR:
        raise NotARule(f"{node.name} joins masks with {node.target} (an OR): not an AND of comparisons")
    if node.target in COMPARISONS:
        return [_comparison(node, COMPARISONS[node.target], dims)]
    if node.target in TRIANGLES:
        return _terms(node.args[0], dims) + [_triangle(node, dims)]
    raise NotARule(f"{node.name} ({node.target}) is not read as part of a mask rule")


def _all_true(node: Node) -> bool:
    """ones / new_ones / ones_like, or full of a nonzero value: a mask term that holds everywhere."""
    return node.target in TRUE or (node.target is aten.full.default and node.args[1] not in (0, False))


def _cast_to_bool(node: Node, dims: Dims) -> list[Term]:
    """`node.bool()` for a non-bool node: ones (all True), tril / triu of ones (a triangle), or an integer
    per-row / per-key value (`value != 0`)."""
    if _all_true(node):
        return []
    if node.target in TRIANGLES and _cast_to_bool(node.args[0], dims) == []:
        return [_triangle(node, dims)]
    if _is_leaf(node):
        return [_leaf(node, dims)]
    raise NotARule(f"{node.name} ({node.target}) on {node.meta['val'].dtype} is cast to a bool mask")


def _is_leaf(node: Node) -> bool:
    """Whether `node` is casts and broadcasts of a value that is not built of masks: a per-row or
    per-key input (e.g. a padding mask). The outermost node is the operand."""
    while isinstance(node, Node) and node.target in {*VALUE_PRESERVING, *BROADCASTS}:
        node = node.args[0]
    if not isinstance(node, Node):
        return False
    structure = AND | NOT | OR | TRUE | set(COMPARISONS) | set(TRIANGLES) | {aten.full.default}
    return node.target not in structure


def _operand(operand, dims: Dims) -> tuple[Operand, str]:
    """(the operand placed as the mask's dims, 'rows' | 'cols' | 'none') for a comparison operand whose
    dims run over `dims` (right-aligned under the comparison); raises NotARule."""
    if not isinstance(operand, Node):
        if isinstance(operand, bool) or not isinstance(operand, int):
            raise NotARule(f"the mask compares with {operand!r}, not an integer")
        return operand, "none"
    value = operand.meta["val"]
    if value.dtype != torch.bool and value.dtype not in INTEGERS:
        raise NotARule(f"{operand.name} compares {value.dtype} values (bool, int32 and int64 rules are read)")
    own = dims[len(dims) - value.dim():]
    sizes = dict(zip(own, value.shape))
    if sizes.get("h", 1) != 1:
        raise NotARule(f"{operand.name} {list(value.shape)} differs per head")
    varies_q, varies_k = sizes.get("q", 1) != 1, sizes.get("k", 1) != 1
    if varies_q and varies_k:
        raise NotARule(f"{operand.name} {list(value.shape)} varies along both the query and the key dim")
    return _placed(operand, own), "rows" if varies_q else "cols" if varies_k else "none"


def _placed(operand: Node, own: Dims) -> Operand:
    """The operand as is when broadcasting lines its dims up with the mask's, else Placed with the
    unsqueezes that do."""
    positions = [MASK_DIMS.index(d) for d in own]
    if positions == list(range(4 - len(own), 4)):
        return operand
    first = positions[0] if positions else 3
    missing = [p - first for p in range(first, 4) if p not in positions]
    return Placed(operand, tuple(missing))


def _comparison(node: Node, op: str, dims: Dims) -> Term:
    (left, left_side), (right, right_side) = (_operand(a, dims) for a in node.args[:2])
    for value, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if isinstance(value, int) and isinstance(other, Node) and other.meta["val"].dtype == torch.int32 \
                and not -2 ** 31 <= value < 2 ** 31:
            raise NotARule(f"{node.name} compares int32 values with {value}, which wraps in int32")
    if left_side == "cols" or right_side == "rows":
        if left_side == right_side:
            raise NotARule(f"{node.name} compares two values that vary along the same dim with each other")
        return Term(right, left, MIRRORED[op])
    return Term(left, right, op)


def _triangle(node: Node, dims: Dims) -> Term:
    """tril(x, d): j <= i + d, i.e. (i + d) ge j; triu(x, d): (i + d) le j; positions of x's own last dims."""
    if tuple(dims[-2:]) != ("q", "k"):
        raise NotARule(f"{node.name} takes a triangle over dims {dims[-2:]}, not the query and key dims")
    rows, cols = _shape(node.args[0])[-2:]
    diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
    if not all(isinstance(n, int) for n in (rows, cols, diagonal)):
        raise NotARule(f"{node.name} is a {node.target} over a dynamic shape")
    return Term(Positions(rows, diagonal, -2), Positions(cols, 0, -1), TRIANGLES[node.target])


def _leaf(node: Node, dims: Dims) -> Term:
    """A value that varies along one dim: visible where it is nonzero (`0 ne value` as a term)."""
    placed, side = _operand(node, dims)
    return Term(placed, 0, "ne") if side != "cols" else Term(0, placed, "ne")


__all__ = ["MaskRule", "NotARule", "Placed", "Positions", "Term", "read_rule"]
