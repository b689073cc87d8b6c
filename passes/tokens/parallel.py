"""Parallel-residual blocks, `out = h + attn(ln1(h)) + mlp(ln2(h))` (GPT-NeoX, GPT-J, Falcon), and the
search over residual adds that tries them after the sequential `h + mlp(h)` form.

The sum is a tree of adds whose leaves are the terms: `h`, the term every
other term is computed from, and one branch per other term. The branches that
act token by token (no attention, `blocks.mixes_tokens`) are the MLP and are
routed; the others (attention) are the bypass: every token still gets them.

    out = unroute(h + attn, gather(h + attn) + mlp'(gather(ln2(h))), idx)

as a ResidualBlock: body = the MLP branch and the adds of the tree, extra
inputs = the bypass terms (gathered as rows for the kept tokens), bypass =
those terms again (added to h for the tokens that are not routed). A value
both kinds of branch read (Falcon's one layer norm in front of attention and
MLP) is not copied: it is the router's features, gathered for the copy.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..graph import VALUE_PRESERVING, module_path
from ..region import ancestors
from .blocks import (MixesTokens, NotRoutable, NoUpdate, ResidualBlock, body_between, check_closed, common_module,
                     describe, is_matmul, mixes_tokens, mlp_block, outside_inputs, residual_adds, router_source,
                     with_constant_inputs)

aten = torch.ops.aten
_ADDS = (aten.add.Tensor, aten.add_.Tensor)


def _sum_tree(add: Node) -> tuple[list[Node], list[Node]]:
    """(the adds of the tree rooted at `add`, with the casts / eval dropouts between them; its leaf terms).
    An inner add (Falcon's in-place `mlp_output += attention_output` too) belongs to it when only the tree
    reads it."""
    adds, terms, stack = [add], [], list(add.args[:2])
    while stack:
        term = stack.pop(0)
        if isinstance(term, Node) and len(term.users) == 1 and term.target in VALUE_PRESERVING:
            adds.append(term)
            stack.append(term.args[0])
        elif isinstance(term, Node) and len(term.users) == 1 and _is_sum(term):
            adds.append(term)
            stack.extend(term.args[:2])
        else:
            terms.append(term)
    return adds, terms


def _is_sum(node: Node) -> bool:
    return node.target in _ADDS and node.kwargs.get("alpha", 1) == 1 and \
        all(isinstance(a, Node) for a in node.args[:2])


def _stream(terms: list[Node]) -> Node:
    """The term every other term is computed from (h)."""
    for term in terms:
        if all(other is term or term in ancestors([other]) for other in terms):
            return term
    raise NotRoutable("no term of the residual sum is the input of the others: not a residual block")


def parallel_block(add: Node) -> ResidualBlock:
    """The MLP branch of the parallel-residual block summed at `add`, or NotRoutable with the reason."""
    adds, terms = _sum_tree(add)
    if len(terms) < 3 or not all(isinstance(t, Node) for t in terms):
        raise NotRoutable("the block mixes tokens (attention) and its sum has no separate MLP branch")
    h = _stream(terms)
    branches = {t: body_between(h, t) for t in terms if t is not h}
    mlp = [t for t, nodes in branches.items() if not any(mixes_tokens(n) for n in nodes + [t])]
    bypass = [t for t in branches if t not in mlp]
    if not mlp:
        raise NotRoutable("parallel residual block: every branch mixes tokens (attention); no MLP branch to route")
    if not bypass:
        raise NotRoutable("parallel residual block: no branch mixes tokens, yet the sum is not h + mlp(h)")
    # nodes both kinds of branch read (Falcon's one layer norm for attention and MLP) stay outside the copy
    shared = ancestors(bypass)
    members = {n for t in mlp for n in branches[t] if n not in shared} | set(mlp) | set(adds)
    body = with_constant_inputs(_ordered(add, members))
    matmuls = [n for n in body if is_matmul(n)]
    outer = module_path(add)
    prefix = outer + "." if outer else ""
    if not matmuls or not all(module_path(n).startswith(prefix) and module_path(n) != outer for n in matmuls):
        raise NotRoutable(f"parallel residual block: the token-wise branch has no matmul inside a child module "
                          f"of '{outer or '<root>'}'")
    check_closed(body, add)
    inputs = [n for n in outside_inputs(body, h) if n not in bypass]
    rows = [n for n in inputs if n in shared and _token_rows(n, h)]
    if len(rows) < len(inputs):
        extra = next(n for n in inputs if n not in rows)
        raise NotRoutable(f"parallel residual block: the MLP branch reads {describe(extra)} besides the "
                          "residual stream")
    source = rows[0] if len(rows) == 1 else router_source(body, h)
    extras = bypass + [n for n in rows if n is not source]
    return ResidualBlock(common_module(matmuls), "mlp", h, add, body, source,
                         extra_inputs=extras, extra_kinds=["rows"] * len(extras), bypass=bypass)


def _token_rows(node: Node, h: Node) -> bool:
    """A per-token value of h's shape (the normalised input both branches read)."""
    val, want = node.meta.get("val"), h.meta["val"]
    return isinstance(val, torch.Tensor) and val.shape == want.shape and val.is_floating_point()


def _ordered(add: Node, members: set[Node]) -> list[Node]:
    return [n for n in add.graph.nodes if n in members]


def find_mlp_blocks(gm: GraphModule) -> tuple[list[ResidualBlock], list[tuple[str, str]]]:
    """(MLP blocks in graph order, sequential or parallel; (where, reason) for candidates that are neither).
    Each sum is tried once, at its root; an attention block (`h + attn(h)`) is not a miss."""
    blocks, misses, roots = [], [], set()
    for add in residual_adds(gm):
        root = _tree_root(add)
        if root in roots:
            continue
        roots.add(root)
        try:
            blocks.append(_mlp_or_parallel(root))
        except (MixesTokens, NoUpdate):   # an attention block, or a sum that is no residual block
            continue
        except NotRoutable as err:
            misses.append((module_path(root) or "<root>", str(err)))
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    return sorted(blocks, key=lambda b: order[b.output]), misses


def _mlp_or_parallel(root: Node) -> ResidualBlock:
    """The block summed at `root`, the outermost add of a sum: `h + mlp(h)`, else a parallel block."""
    try:
        return mlp_block(root)
    except (MixesTokens, NoUpdate):
        if len(_sum_tree(root)[1]) < 3:   # h + attn(h): an attention block; or no residual at all
            raise
        return parallel_block(root)


def _tree_root(add: Node) -> Node:
    """The outermost add of the sum `add` belongs to (each inner add read only by the next)."""
    while len(add.users) == 1:
        user = next(iter(add.users))
        if user.target is not aten.add.Tensor or user.kwargs.get("alpha", 1) != 1:
            break
        add = user
    return add


__all__ = ["find_mlp_blocks", "parallel_block"]
