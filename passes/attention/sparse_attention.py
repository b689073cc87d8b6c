"""`sparse-attention`: run attention as block-sparse flash attention over a layout.

Lossy policies start from a site confirmed exact under `mask`, narrow its
layout (never widen it: `sparsecc.runtime.attention_policies`) and report the
error that costs against dense attention on the example inputs:

    window     sliding window of `window` keys plus `sinks` first keys (StreamingLLM), block-granular;
               the layout op reads the mask only inside the window
    topk       per query block the `topk` (fraction in (0, 1) or count >= 1) visible key blocks of
               highest pooled (mean) q . k score, diagonal and sink blocks always kept, chosen per call
    threshold  the mask's layout; the kernel skips a key block whose largest logit lies more than
               log(1/threshold) below the running row maximum (BLASST)

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

from sparsecc.runtime.attention_layout import Layout, density
from sparsecc.runtime.ops.block_attention import skipped_blocks, visible_elements
from sparsecc.runtime.ops.block_layout import policy_problem

from .attention_match import AttentionSite, NotAttention, attention_site
from .graph import module_path
from .manager import Pass, PassContext, PassResult, PassStats, Skip
from .numerics import relative_error
from .options import Bounds, OptionBounds
from .records import RewriteRecord
from .recording import record_values
from .rewriter import Rewriter

POLICIES = ("mask", "window", "topk", "threshold")
EMPTY_ROWS = ("zero", "uniform", "nan")


@dataclass(frozen=True)
class SparseAttention(Pass):
    name: ClassVar[str] = "sparse-attention"
    policy: str = "mask"
    block: int = 128
    window: int = 1024          # policy window: keys i - window < j <= i stay visible ...
    sinks: int = 4              # ... plus the first `sinks` keys (StreamingLLM; also kept by topk)
    topk: float = 0.1           # policy topk: fraction (0, 1) of a query block's visible key blocks, or a count
    threshold: float = 1e-4     # policy threshold: skip blocks whose logits lie log(1/threshold) below the max
    tolerance: float = 1e-4
    option_bounds: ClassVar[dict[str, OptionBounds]] = {
        "block": Bounds(64, 128, whole=True), "window": Bounds(1, whole=True), "sinks": Bounds(0, whole=True),
        "topk": (Bounds(0, 1, low_open=True, high_open=True, noun="a fraction"),
                 Bounds(1, whole=True, noun="a whole count")),
        "threshold": Bounds(0, 1, low_open=True, high_open=True), "tolerance": Bounds(0)}

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        # `mask` leaves is_causal to SDPA: its causal kernel already skips blocks
        converted = causal_sdpa_as_mask(gm) if self.policy != "mask" else {}
        sites, stats = self._sites(gm)
        stats.matched = len(sites)
        values = record_values(gm, ctx, [n for s in sites for n in (s.root, s.q, s.k, s.v, s.mask)])
        for site in sites:
            self._rewrite(gm, site, values, ctx, stats)
        remaining = set(gm.graph.nodes)
        for node, (args, kwargs) in converted.items():  # left dense: back to SDPA's causal fast path
            if node in remaining:
                node.args, node.kwargs = args, kwargs
        return PassResult(gm, stats.rewritten > 0, stats)

    def options_problem(self) -> Optional[str]:
        if self.policy not in POLICIES:
            return f"policy {self.policy!r} is not available (available: {', '.join(POLICIES)})"
        if self.block not in (64, 128):
            return f"block must be 64 or 128, got {self.block}"
        if self.policy == "threshold" and not 0 < self.threshold < 1:
            return f"threshold={self.threshold} must lie in (0, 1) (skip blocks below max + log(threshold))"
        layout_policy = self.policy if self.policy in ("window", "topk") else "mask"
        return policy_problem(layout_policy, self.window, self.sinks, self.topk)

    def layout_args(self) -> tuple:
        """The policy's arguments of sparsecc::block_layout after (mask, block_q, block_k)."""
        if self.policy == "window":
            return ("window", self.window, self.sinks)
        if self.policy == "topk":
            return ("topk", 0, self.sinks, float(self.topk))
        return ()

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
        call = BlockCall(self.block, self.layout_args(), self.threshold if self.policy == "threshold" else 0.0,
                         empty_rows)
        if self.policy != "mask":  # lossy: the error against the dense attention it replaces
            error = relative_error(run_block_attention(site, values, call), values[site.root], same_nans=True)
        out = insert_block_attention(gm, site, call)
        site.root.replace_all_uses_with(out)
        erase_dead_producers(gm, site.root)
        ctx.records.append(self._record(where, site, values, call, error))
        stats.rewritten += 1

    def _confirm(self, site: AttentionSite, values: dict) -> tuple[Optional[str], float | str]:
        want, best = values[site.root], float("inf")
        for empty_rows in EMPTY_ROWS:
            got = run_block_attention(site, values, BlockCall(self.block, (), 0.0, empty_rows))
            error = relative_error(got, want, same_nans=True)
            if error <= self.tolerance:
                return empty_rows, error
            best = min(best, error)
        return None, f"block attention does not reproduce this attention (closest relative error {best:.2e})"

    def _record(self, where: str, site: AttentionSite, values: dict, call: BlockCall, error: float) -> RewriteRecord:
        q, k = values[site.q], values[site.k]
        batch, heads, seq, dim = q.shape
        keys = k.shape[-2]
        kept = achieved_density(site, values, call)
        flops = 4 * batch * heads * seq * keys * dim
        return RewriteRecord(
            layer=where, op="sparsecc.block_attention", source_op=site.form, pattern=f"{self.policy}/b{self.block}",
            shape=[batch, heads, seq, keys], params_before=0, params_after=0, bytes_before=0, bytes_after=0,
            flops_before=flops, flops_after=int(flops * kept),
            details={"policy": self.policy, "block": self.block, "density": kept, "error_vs_dense": error,
                     "empty_rows": call.empty_rows, "gqa": k.shape[1] != heads, **self._policy_details()})

    def _policy_details(self) -> dict:
        return {"window": {"window": self.window, "sinks": self.sinks},
                "topk": {"topk": self.topk, "sinks": self.sinks},
                "threshold": {"threshold": self.threshold}}.get(self.policy, {})


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
    return torch.ops.sparsecc.block_attention(q, k, v, *call.layout(mask, q, k), mask, site.scale, call.block,
                                              call.block, call.threshold, call.empty_rows)


def achieved_density(site: AttentionSite, values: dict, call: BlockCall) -> float:
    """Key blocks visited / all key blocks on the example inputs (after threshold skipping)."""
    q, k, mask = (values[n] for n in (site.q, site.k, site.mask))
    layout = Layout(*call.layout(mask, q, k))
    if call.threshold <= 0:
        return density(layout)
    keys, groups = k.shape[2], q.shape[1] // k.shape[1]
    logits = q.float() @ k.float().repeat_interleave(groups, 1).transpose(-1, -2) * site.scale
    visible = visible_elements(layout, mask, q.shape[2], keys, call.block, call.block)
    logits = logits.masked_fill(~visible, float("-inf"))
    skipped = skipped_blocks(logits, layout, call.threshold, call.block, call.block).sum().item()
    listed = (layout.kv_num_blocks.long() + layout.full_num_blocks.long()).expand(*q.shape[:2], -1).sum().item()
    nq, nk = layout.full_indices.shape[-2:]
    return (listed - skipped) / (q.shape[0] * q.shape[1] * nq * nk)


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


def insert_block_attention(gm: GraphModule, site: AttentionSite, call: BlockCall) -> Node:
    rw = Rewriter(gm, site.root)
    operands = (site.q, site.k) if call.reads_qk else ()
    layout = rw.call(torch.ops.sparsecc.block_layout.default, site.mask, call.block, call.block, *call.layout_args,
                     *operands)
    parts = [rw.getitem(layout, i) for i in range(4)]
    out = rw.call(torch.ops.sparsecc.block_attention.default, site.q, site.k, site.v, *parts, site.mask,
                  site.scale, call.block, call.block, call.threshold, call.empty_rows)
    want = site.root.meta["val"]
    if out.meta["val"].dtype != want.dtype:
        out = rw.call(torch.ops.aten.to.dtype, out, want.dtype)
    return out


def causal_sdpa_as_mask(gm: GraphModule) -> dict[Node, tuple[tuple, dict]]:
    """Give every SDPA call with is_causal=True (no mask, no dropout, S == Skv) the explicit boolean
    causal mask it implies, `arange(S)[None, :] <= arange(S)[:, None]`, and is_causal=False: the same
    attention, now a site the lossy policies narrow. Returns each changed call's original (args, kwargs)
    so a site left dense can get them back (the unused mask nodes go with the next cleanup)."""
    changed = {}
    aten = torch.ops.aten
    for node in [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]:
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), node.args))
        args.update(node.kwargs)
        q, k = args["query"].meta["val"], args["key"].meta["val"]
        if not args.get("is_causal") or args.get("attn_mask") is not None or args.get("dropout_p", 0.0):
            continue
        seq, keys = q.shape[-2], k.shape[-2]
        if not (isinstance(seq, int) and isinstance(keys, int) and seq == keys):
            continue  # SDPA's is_causal is top-left aligned; the layout's causal rule is bottom-right
        rw = Rewriter(gm, node)
        positions = rw.call(aten.arange.default, seq, device=q.device)
        mask = rw.call(aten.le.Tensor, rw.call(aten.unsqueeze.default, positions, 0),
                       rw.call(aten.unsqueeze.default, positions, 1))
        mask = rw.call(aten.unsqueeze.default, rw.call(aten.unsqueeze.default, mask, 0), 0)
        extra = {name: value for name, value in node.kwargs.items() if name in ("scale", "enable_gqa")}
        changed[node] = (node.args, dict(node.kwargs))
        node.args = (args["query"], args["key"], args["value"], mask, 0.0, False)
        node.kwargs = extra
    return changed
