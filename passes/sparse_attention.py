"""`sparse-attention`: run attention as block-sparse flash attention over a layout.

Policy `window` (lossy) narrows the mask to a sliding window plus attention
sinks (StreamingLLM) after the site is confirmed exact under `mask`, and reports
the error that costs on the example inputs.

Policy `mask` (exact): the layout is the one the model's own boolean mask
implies, computed once per call on the device (`sparsecc.block_layout`): key
blocks the mask hides entirely are never visited, fully visible blocks need no
per-element mask. Every site is confirmed on the example inputs before it is
replaced, padded query rows included (their value depends on how the original
wrote the mask: zero, uniform over all keys, or NaN; the matching one is kept).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.attention_layout import density, layout_from_mask

from .attention_match import AttentionSite, NotAttention, attention_site
from .graph import module_path
from .manager import Pass, PassContext, PassResult, PassStats, Skip
from .records import RewriteRecord
from .recording import record_values
from .rewriter import Rewriter

POLICIES = ("mask", "window")
EMPTY_ROWS = ("zero", "uniform", "nan")


@dataclass(frozen=True)
class SparseAttention(Pass):
    name: ClassVar[str] = "sparse-attention"
    policy: str = "mask"
    block: int = 128
    window: int = 1024          # policy window: keys i - window < j <= i stay visible ...
    sinks: int = 4              # ... plus the first `sinks` keys (StreamingLLM)
    tolerance: float = 1e-4

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if self.policy not in POLICIES:
            raise ValueError(f"sparse-attention: policy {self.policy!r} is not available (available: {POLICIES})")
        if self.block not in (64, 128):
            raise ValueError(f"sparse-attention: block must be 64 or 128, got {self.block}")
        sites, stats = self._sites(gm)
        stats.matched = len(sites)
        values = record_values(gm, ctx, [n for s in sites for n in (s.root, s.q, s.k, s.v, s.mask)])
        for site in sites:
            self._rewrite(gm, site, values, ctx, stats)
        return PassResult(gm, stats.rewritten > 0, stats)

    def _sites(self, gm: GraphModule) -> tuple[list[AttentionSite], PassStats]:
        sites, stats = [], PassStats()
        for node in list(gm.graph.nodes):
            try:
                site = attention_site(node) if node.op == "call_function" else None
            except NotAttention as err:
                stats.skipped.append(Skip(module_path(node) or node.name, "sparse-attention", str(err)))
                continue
            if site is not None and site.mask is None:
                stats.skipped.append(Skip(module_path(node) or node.name, "sparse-attention",
                                          "no mask: every key block is visible, nothing to skip"))
            elif site is not None:
                sites.append(site)
        return sites, stats

    def _rewrite(self, gm, site: AttentionSite, values: dict, ctx: PassContext, stats: PassStats) -> None:
        empty_rows, error = self._confirm(site, values)
        where = module_path(site.root) or site.root.name
        if empty_rows is None:
            stats.skipped.append(Skip(where, "sparse-attention", error))
            return
        if self.policy == "window":
            site, error = self._windowed(gm, site, values, empty_rows)
        out = insert_block_attention(gm, site, self.block, empty_rows)
        site.root.replace_all_uses_with(out)
        erase_dead_producers(gm, site.root)
        ctx.records.append(self._record(where, site, values, empty_rows, error))
        stats.rewritten += 1

    def _windowed(self, gm, site: AttentionSite, values: dict, empty_rows: str) -> tuple[AttentionSite, float]:
        """The site with its mask narrowed to the window (never widened), and the error that costs."""
        seq, keys = values[site.q].shape[-2], values[site.k].shape[-2]
        window = window_mask(seq, keys, self.window, self.sinks).to(values[site.mask].device)
        rw = Rewriter(gm, site.root)
        narrowed = rw.call(torch.ops.aten.logical_and.default, site.mask, rw.add_constant("attention_window", window))
        values[narrowed] = values[site.mask] & window
        dense = values[site.root]
        site = AttentionSite(site.root, site.q, site.k, site.v, narrowed, site.scale, site.form)
        return site, relative_error_nan(run_block_attention(site, values, self.block, empty_rows), dense)

    def _confirm(self, site: AttentionSite, values: dict) -> tuple[Optional[str], float | str]:
        want, best = values[site.root], float("inf")
        for empty_rows in EMPTY_ROWS:
            got = run_block_attention(site, values, self.block, empty_rows)
            error = relative_error_nan(got, want)
            if error <= self.tolerance:
                return empty_rows, error
            best = min(best, error)
        return None, f"block attention does not reproduce this attention (closest relative error {best:.2e})"

    def _record(self, where: str, site: AttentionSite, values: dict, empty_rows: str, error: float) -> RewriteRecord:
        q, k = values[site.q], values[site.k]
        batch, heads, seq, dim = q.shape
        keys = k.shape[-2]
        kept = density(layout_from_mask(values[site.mask], self.block, self.block))
        flops = 4 * batch * heads * seq * keys * dim
        return RewriteRecord(
            layer=where, op="sparsecc.block_attention", source_op=site.form, pattern=f"{self.policy}/b{self.block}",
            shape=[batch, heads, seq, keys], params_before=0, params_after=0, bytes_before=0, bytes_after=0,
            flops_before=flops, flops_after=int(flops * kept),
            details={"policy": self.policy, "block": self.block, "density": kept, "error_vs_dense": error,
                     "empty_rows": empty_rows, "gqa": k.shape[1] != heads})


def window_mask(seq: int, keys: int, window: int, sinks: int) -> torch.Tensor:
    """[seq, keys] bool: query i (aligned to the last keys) sees keys i - window < j, and the first `sinks`."""
    query = torch.arange(seq)[:, None] + (keys - seq)
    key = torch.arange(keys)[None, :]
    return (query - key < window) | (key < sinks)


def run_block_attention(site: AttentionSite, values: dict, block: int, empty_rows: str) -> torch.Tensor:
    q, k, v, mask = (values[n] for n in (site.q, site.k, site.v, site.mask))
    layout = torch.ops.sparsecc.block_layout(mask, block, block)
    return torch.ops.sparsecc.block_attention(q, k, v, *layout, mask, site.scale, block, block, 0.0, empty_rows)


def relative_error_nan(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error where NaNs must sit in the same places."""
    nan = torch.isnan(want)
    if not torch.equal(nan, torch.isnan(got)):
        return float("inf")
    got, want = got.double().masked_fill(nan, 0), want.double().masked_fill(nan, 0)
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def erase_dead_producers(gm: GraphModule, root: Node) -> None:
    """Erase `root` and the producers only it used. Dropout and SDPA count as impure (seeded
    randomness), so the generic dead-code elimination would keep them; here they are inactive."""
    frontier = [root]
    while frontier:
        node = frontier.pop()
        if node.users or node.op != "call_function" or node.graph is not gm.graph:
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        frontier += inputs


def insert_block_attention(gm: GraphModule, site: AttentionSite, block: int, empty_rows: str) -> Node:
    rw = Rewriter(gm, site.root)
    layout = rw.call(torch.ops.sparsecc.block_layout.default, site.mask, block, block)
    parts = [rw.getitem(layout, i) for i in range(4)]
    out = rw.call(torch.ops.sparsecc.block_attention.default, site.q, site.k, site.v, *parts, site.mask,
                  site.scale, block, block, 0.0, empty_rows)
    want = site.root.meta["val"]
    if out.meta["val"].dtype != want.dtype:
        out = rw.call(torch.ops.aten.to.dtype, out, want.dtype)
    return out
