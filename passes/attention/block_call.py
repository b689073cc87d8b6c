"""What a sparse-attention rewrite calls: a layout op, then `sparsecc::block_attention`.

The layout op is `sparsecc::rule_layout` when the mask was read as a rule (`mask_rule`: the op reads
the rule's per-query and per-key operands, the S x Skv mask is never built), else
`sparsecc::block_layout` over the materialised mask. `run_block_attention` runs a call eagerly on
recorded values (confirmation, error against dense), `insert_block_attention` puts it into the graph,
and `achieved_density` is the fraction of key blocks it visits on those values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.attention_layout import Layout, density
from sparsecc.runtime.ops.block_attention import attention_logits, skipped_blocks, visible_elements

from ..rewriter import Rewriter
from .mask_rule import MaskRule, Operand, Placed, Positions
from .sites import AttentionSite


@dataclass(frozen=True)
class BlockCall:
    """What the rewrite calls: rule_layout(rows, cols, ops, S, Skv, block, block, *layout_args) with a rule,
    else block_layout(mask, block, block, *layout_args); then block_attention."""
    block: int
    layout_args: tuple
    threshold: float
    empty_rows: str
    rule: Optional[MaskRule] = None

    @property
    def reads_qk(self) -> bool:
        return self.layout_args[:1] == ("topk",)

    def layout(self, mask, q, k, rule_values: Optional[tuple] = None) -> tuple:
        """(layout..., rule rows, rule cols) with a rule, else (layout..., None, None)."""
        qk = (q, k) if self.reads_qk else ()
        if rule_values is None:
            return (*torch.ops.sparsecc.block_layout(mask, self.block, self.block, *self.layout_args, *qk), None, None)
        rows, cols = rule_values
        return torch.ops.sparsecc.rule_layout(rows, cols, self.rule.ops, q.shape[2], k.shape[2], self.block,
                                              self.block, *self.layout_args, *qk)


def operand_value(side: Operand, values: dict, device) -> torch.Tensor:
    """A rule operand's value on the recorded example inputs."""
    if isinstance(side, Positions):
        positions = torch.arange(side.length, device=device) + side.offset
        return positions[:, None] if side.axis == -2 else positions
    if isinstance(side, Placed):
        value = values[side.node]
        for dim in side.dims:
            value = value.unsqueeze(dim)
        return value
    return values[side] if isinstance(side, torch.fx.Node) else torch.tensor(side, device=device)


def rule_values(rule: Optional[MaskRule], values: dict, device) -> Optional[tuple[list, list]]:
    if rule is None:
        return None
    return ([operand_value(t.rows, values, device) for t in rule.terms],
            [operand_value(t.cols, values, device) for t in rule.terms])


def run_block_attention(site: AttentionSite, values: dict, call: BlockCall, narrow=None) -> torch.Tensor:
    """The call on recorded values; `narrow` (e.g. `quest.QuestPages`) narrows the layout op's layout."""
    q, k, v, mask = (values[n] for n in (site.q, site.k, site.v, site.mask))
    sinks = None if site.sinks is None else values[site.sinks].reshape(-1)
    *layout, rows, cols = call.layout(mask, q, k, rule_values(call.rule, values, q.device))
    layout = layout if narrow is None else narrow.narrowed(layout, site, values)
    rule = (rows, cols, call.rule.ops) if call.rule else ()
    return torch.ops.sparsecc.block_attention(q, k, v, *layout, None if call.rule else mask, site.scale, call.block,
                                              call.block, call.threshold, call.empty_rows, site.softcap, sinks, *rule)


def example_layout(site: AttentionSite, values: dict, call: BlockCall, narrow=None) -> Layout:
    """The layout the call computes on the example inputs."""
    q, k = values[site.q], values[site.k]
    layout = list(call.layout(values[site.mask], q, k, rule_values(call.rule, values, q.device))[:4])
    return Layout(*(layout if narrow is None else narrow.narrowed(layout, site, values)))


def achieved_density(site: AttentionSite, values: dict, call: BlockCall, layout: Layout) -> float:
    """Key blocks visited / all key blocks of `layout` on the example inputs (after threshold skipping)."""
    q, k, mask = (values[n] for n in (site.q, site.k, site.mask))
    if call.threshold <= 0:
        return density(layout)
    keys = k.shape[2]
    logits = attention_logits(q, k, site.scale, site.softcap)
    visible = visible_elements(layout, mask, q.shape[2], keys, call.block, call.block)
    logits = logits.masked_fill(~visible, float("-inf"))
    skipped = skipped_blocks(logits, layout, call.threshold, call.block, call.block).sum().item()
    listed = (layout.kv_num_blocks.long() + layout.full_num_blocks.long()).expand(*q.shape[:2], -1).sum().item()
    nq, nk = layout.full_indices.shape[-2:]
    return (listed - skipped) / (q.shape[0] * q.shape[1] * nq * nk)


def _operand_node(rw: Rewriter, side: Operand, device) -> Node:
    """A rule operand as a graph value: a node as is, a number as a 0-d int64 tensor, positions as arange."""
    aten = torch.ops.aten
    if isinstance(side, Node):
        return side
    if isinstance(side, Placed):
        node = side.node
        for dim in side.dims:
            node = rw.call(aten.unsqueeze.default, node, dim)
        return node
    if isinstance(side, int):
        return rw.call(aten.scalar_tensor.default, side, dtype=torch.int64, device=device)
    positions = rw.call(aten.arange.default, side.length, dtype=torch.int64, device=device)
    positions = rw.call(aten.add.Tensor, positions, side.offset) if side.offset else positions
    return rw.call(aten.unsqueeze.default, positions, 1) if side.axis == -2 else positions


def _length(rw: Rewriter, node: Node, dim: int):
    size = node.meta["val"].shape[dim]
    return size if isinstance(size, int) else rw.call(torch.ops.aten.sym_size.int, node, dim)


def _insert_layout(rw: Rewriter, site: AttentionSite, call: BlockCall) -> tuple[list[Node], Optional[Node],
                                                                                 Optional[Node]]:
    """The layout op's nodes: (the four layout parts, rule rows, rule cols)."""
    operands = (site.q, site.k) if call.reads_qk else ()
    if call.rule is None:
        layout = rw.call(torch.ops.sparsecc.block_layout.default, site.mask, call.block, call.block,
                         *call.layout_args, *operands)
        return [rw.getitem(layout, i) for i in range(4)], None, None
    device = site.q.meta["val"].device
    rows = [_operand_node(rw, term.rows, device) for term in call.rule.terms]
    cols = [_operand_node(rw, term.cols, device) for term in call.rule.terms]
    layout = rw.call(torch.ops.sparsecc.rule_layout.default, rows, cols, call.rule.ops, _length(rw, site.q, 2),
                     _length(rw, site.k, 2), call.block, call.block, *call.layout_args, *operands)
    parts = [rw.getitem(layout, i) for i in range(6)]
    return parts[:4], parts[4], parts[5]


def insert_block_attention(gm: GraphModule, site: AttentionSite, call: BlockCall, narrow=None) -> Node:
    rw = Rewriter(gm, site.root)
    parts, rule_rows, rule_cols = _insert_layout(rw, site, call)
    parts = parts if narrow is None else narrow.inserted(rw, parts, site)
    sinks = None if site.sinks is None else rw.call(torch.ops.aten.reshape.default, site.sinks, [-1])
    rule = (rule_rows, rule_cols, call.rule.ops) if call.rule else ()   # a mask call keeps the old signature
    out = rw.call(torch.ops.sparsecc.block_attention.default, site.q, site.k, site.v, *parts,
                  None if call.rule else site.mask, site.scale, call.block, call.block, call.threshold,
                  call.empty_rows, site.softcap, sinks, *rule)
    want = site.root.meta["val"]
    if out.meta["val"].dtype != want.dtype:
        out = rw.call(torch.ops.aten.to.dtype, out, want.dtype)
    return out


__all__ = ["BlockCall", "achieved_density", "example_layout", "insert_block_attention", "operand_value", "rule_values",
           "run_block_attention"]
