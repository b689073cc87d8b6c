"""What a sparse-attention rewrite calls: `sparsecc::block_layout` then `sparsecc::block_attention`.

`run_block_attention` runs a call eagerly on recorded values (confirmation, error
against dense), `insert_block_attention` puts it into the graph, and
`achieved_density` is the fraction of key blocks it visits on those values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.attention_layout import Layout, density
from sparsecc.runtime.ops.block_attention import attention_logits, skipped_blocks, visible_elements

from ..rewriter import Rewriter
from .sites import AttentionSite


@dataclass(frozen=True)
class BlockCall:
    """What the rewrite calls: block_layout(mask, block, block, *layout_args), then block_attention."""
    block: int
    layout_args: tuple
    threshold: float
    empty_rows: str

    @property
    def reads_qk(self) -> bool:
        return self.layout_args[:1] == ("topk",)

    def layout(self, mask, q, k) -> tuple:
        return torch.ops.sparsecc.block_layout(mask, self.block, self.block, *self.layout_args,
                                               *((q, k) if self.reads_qk else ()))


def run_block_attention(site: AttentionSite, values: dict, call: BlockCall) -> torch.Tensor:
    q, k, v, mask = (values[n] for n in (site.q, site.k, site.v, site.mask))
    sinks = None if site.sinks is None else values[site.sinks].reshape(-1)
    return torch.ops.sparsecc.block_attention(q, k, v, *call.layout(mask, q, k), mask, site.scale, call.block,
                                              call.block, call.threshold, call.empty_rows, site.softcap, sinks)


def achieved_density(site: AttentionSite, values: dict, call: BlockCall) -> float:
    """Key blocks visited / all key blocks on the example inputs (after threshold skipping)."""
    q, k, mask = (values[n] for n in (site.q, site.k, site.mask))
    layout = Layout(*call.layout(mask, q, k))
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


def insert_block_attention(gm: GraphModule, site: AttentionSite, call: BlockCall) -> Node:
    rw = Rewriter(gm, site.root)
    operands = (site.q, site.k) if call.reads_qk else ()
    layout = rw.call(torch.ops.sparsecc.block_layout.default, site.mask, call.block, call.block, *call.layout_args,
                     *operands)
    parts = [rw.getitem(layout, i) for i in range(4)]
    sinks = None if site.sinks is None else rw.call(torch.ops.aten.reshape.default, site.sinks, [-1])
    out = rw.call(torch.ops.sparsecc.block_attention.default, site.q, site.k, site.v, *parts, site.mask,
                  site.scale, call.block, call.block, call.threshold, call.empty_rows, site.softcap, sinks)
    want = site.root.meta["val"]
    if out.meta["val"].dtype != want.dtype:
        out = rw.call(torch.ops.aten.to.dtype, out, want.dtype)
    return out


__all__ = ["BlockCall", "achieved_density", "insert_block_attention", "run_block_attention"]
