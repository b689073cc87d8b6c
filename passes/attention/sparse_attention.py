"""`sparse-attention`: run attention as block-sparse flash attention over a layout.

Lossy policies start from a site confirmed exact under `mask`, narrow its
layout (never widen it: `sparsecc.runtime.attention_policies`) and report the
error that costs against dense attention on the example inputs:

    window     sliding window of `window` keys plus `sinks` first keys (StreamingLLM), block-granular;
               the layout op reads the mask only inside the window
    topk       per query block the `topk` (fraction in (0, 1) or count >= 1) visible key blocks of
               highest pooled (mean) q . k score, diagonal and sink blocks always kept, chosen per call;
               attending through a KV cache (generation), per-page key min/max are kept with the cache
               and a decode step keeps the `topk` pages of `page` keys of highest Quest bound (`quest`)
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

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
from torch.fx import GraphModule, Node

from sparsecc.runtime.attention_rule import rule_mask, stack_rule

from ..graph import layer_name
from ..manager import Pass, PassContext, PassResult
from ..numerics import relative_error
from ..options import Bounds, OneOf, OptionBounds, OptionProblem
from ..records import RewriteRecord
from ..region import RegionRule, rewrite_regions
from .block_call import (BlockCall, achieved_density, example_layout, insert_block_attention, rule_values,
                         run_block_attention)
from .causal import causal_sdpa_as_mask
from .layout_picture import block_picture
from .mask_rule import NotARule, read_rule
from .quest import QuestPages, insert_key_summaries, key_cache, one_query
from .sites import AttentionSite, NotAttention, attention_site

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
    page: int = 16              # policy topk over a KV cache: keys per page of the decode step's Quest selection
    tolerance: float = 1e-4     # exact confirmation under `mask` (fp32; x100 for 16-bit)
    option_bounds: ClassVar[dict[str, OptionBounds]] = {
        "block": OneOf(64, 128), "window": Bounds(1, whole=True), "sinks": Bounds(0, whole=True),
        "topk": (Bounds(0, 1, low_open=True, high_open=True, noun="a fraction"),
                 Bounds(1, whole=True, noun="a whole count")),
        "threshold": Bounds(0, 1, low_open=True, high_open=True), "tolerance": Bounds(0),
        "page": OneOf(16, 32, 64, 128)}
    always_spelled: ClassVar[tuple[str, ...]] = ("policy", "block")
    policy_options: ClassVar[dict[str, tuple[str, ...]]] = {   # what each policy reads, shown in the report
        "mask": (), "window": ("window", "sinks"), "topk": ("topk", "sinks"), "threshold": ("threshold",)}

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        # `mask` leaves is_causal to SDPA: its causal kernel already skips blocks
        before = set(gm.graph.nodes)
        converted = causal_sdpa_as_mask(gm) if self.policy != "mask" else {}
        result = rewrite_regions(gm, ctx, AttentionRule(self))
        remaining = set(gm.graph.nodes)
        for node, (args, kwargs) in converted.items():  # left dense: back to SDPA's causal fast path
            if node in remaining:
                node.args, node.kwargs = args, kwargs
        for node in reversed(list(gm.graph.nodes)):     # and the causal masks made for them go again
            if node not in before and not node.users and node.op == "call_function" and not node.is_impure():
                gm.graph.erase_node(node)
        return result

    def spelled_options(self) -> tuple[str, ...]:
        return self.always_spelled + self.policy_options.get(self.policy, ())

    def options_problem(self) -> Optional[OptionProblem]:
        if self.policy not in POLICIES:
            available = ", ".join(POLICIES)
            return OptionProblem("policy", f"policy {self.policy!r} is not available (available: {available})")
        return None

    def layout_args(self) -> tuple:
        """The policy's arguments of sparsecc::block_layout after (mask, block_q, block_k)."""
        if self.policy == "window":
            return ("window", self.window, self.sinks)
        if self.policy == "topk":
            return ("topk", 0, self.sinks, float(self.topk))
        return ()

    def policy_details(self) -> dict:
        return {"window": {"window": self.window, "sinks": self.sinks},
                "topk": {"topk": self.topk, "sinks": self.sinks},
                "threshold": {"threshold": self.threshold}}.get(self.policy, {})


class AttentionRule(RegionRule):
    """Regions: masked attention sites. Readings: block attention under the mask's own layout, for each
    way the original may treat rows that see no key. The confirmed one is inserted under the policy."""
    options: SparseAttention
    same_nans = True   # rows that see no key may be NaN in the original; the reading must match them
    plans_from_shapes = True   # sites and the mask's rule are read off the graph; density is not measured

    def find(self, gm: GraphModule, ctx: PassContext) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
        sites, misses = [], []
        for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
            try:
                site = attention_site(node)
            except NotAttention as err:
                misses.append((layer_name(node), str(err)))
                continue
            if site is not None and site.mask is None:
                misses.append((layer_name(node), "no mask: every key block is visible, nothing to skip"))
            elif site is not None:
                sites.append(with_rule(site))
        return sites, misses

    def recorded(self, site: AttentionSite) -> tuple[Node, ...]:
        rule = site.rule.operands if site.rule else []
        cache = key_cache(site) if self.options.policy == "topk" else None   # its positions bound the summaries
        written = (cache.positions,) if cache else ()
        return tuple(n for n in (site.root, site.q, site.k, site.v, site.mask, site.sinks, *rule, *written)
                     if n is not None)

    def readings(self, gm: GraphModule, site: AttentionSite, values: dict) -> Iterator[BlockCall]:
        return (BlockCall(self.options.block, (), 0.0, empty_rows) for empty_rows in EMPTY_ROWS)

    def reproduce(self, gm: GraphModule, site: AttentionSite, call: BlockCall, values: dict):
        return run_block_attention(site, values, call), values[site.root]

    def unconfirmed(self, site: AttentionSite, best: float, tolerance: float) -> str:
        return f"block attention does not reproduce this attention (closest relative error {best:.2e})"

    def insert(self, gm: GraphModule, site: AttentionSite, exact: BlockCall, values: dict,
               error: float) -> tuple[Node, RewriteRecord]:
        options, planned = self.options, values[site.q].is_meta   # meta stand-ins: planned without weights
        threshold = options.threshold if options.policy == "threshold" else 0.0
        rule = site.rule if site.rule and (planned or rule_reproduces_mask(site, values)) else None
        if site.rule and rule is None:
            site.no_rule = "the rule read off the mask does not reproduce it on the example inputs"
        call = BlockCall(options.block, options.layout_args(), threshold, exact.empty_rows, rule)
        call, quest = self.paged(gm, site, call)
        if options.policy != "mask" and not planned:  # lossy: the error against the dense attention it replaces
            error = relative_error(run_block_attention(site, values, call, quest), values[site.root], same_nans=True)
        return insert_block_attention(gm, site, call, quest), self.record(site, values, call, error, quest)

    def paged(self, gm: GraphModule, site: AttentionSite, call: BlockCall) -> tuple[BlockCall, Optional[QuestPages]]:
        """Under topk, a site attending through a key cache keeps page summaries beside it (both programs of a
        generator, same state order); a decode step (one query) then takes its pages by Quest bound."""
        cache = key_cache(site) if self.options.policy == "topk" else None
        if cache is None:
            return call, None
        options = self.options
        key_min, key_max = insert_key_summaries(gm, site, cache, options.page)
        if not one_query(site):
            return call, None
        quest = QuestPages(options.topk, options.sinks, options.page, cache, key_min, key_max)
        return replace(call, block=options.page, layout_args=()), quest

    def record(self, site: AttentionSite, values: dict, call: BlockCall, error: float,
               quest: Optional[QuestPages] = None) -> RewriteRecord:
        q, k = values[site.q], values[site.k]
        batch, heads, seq, dim = q.shape
        keys = k.shape[-2]
        layout = None if q.is_meta else example_layout(site, values, call, quest)   # meta: planned, nothing measured
        kept = None if layout is None else achieved_density(site, values, call, layout)
        flops = 4 * batch * heads * seq * keys * dim
        options = self.options
        return RewriteRecord(
            layer=site.layer, op="sparsecc.block_attention", source_op=site.form,
            pattern=f"{options.policy}/{f'quest-p{call.block}' if quest else f'b{call.block}'}",
            shape=[batch, heads, seq, keys], params_before=0,
            params_after=0, bytes_before=0, bytes_after=0, flops_before=flops,
            flops_after=flops if kept is None else int(flops * kept),
            details={"policy": options.policy, "block": call.block, "density": kept, "error_vs_dense": error,
                     **({"selection": f"quest: pages of {call.block} keys by key min/max bound"} if quest else {}),
                     "mask": _mask_source(call, site),
                     "empty_rows": call.empty_rows, "gqa": k.shape[1] != heads, **options.policy_details(),
                     "layout_blocks": None if layout is None else block_picture(layout)})


def _mask_source(call: BlockCall, site: AttentionSite) -> str:
    if call.rule:
        return f"read as a rule of {len(call.rule.terms)} terms ({call.rule.ops}), no S x Skv tensor"
    return f"materialised per call ({site.no_rule})"


def with_rule(site: AttentionSite) -> AttentionSite:
    """The site with its mask read as a rule, or with the reason it is not one (the report names it)."""
    try:
        return replace(site, rule=read_rule(site.mask))
    except NotARule as err:
        return replace(site, no_rule=str(err))


def rule_reproduces_mask(site: AttentionSite, values: dict) -> bool:
    """Whether the rule gives the mask's own elements on the example inputs (a check of the reading)."""
    mask = values[site.mask]
    rows, cols = rule_values(site.rule, values, mask.device)
    seq, keys = mask.shape[-2:]
    try:
        rule = rule_mask(*stack_rule(rows, cols, seq, keys), site.rule.ops)
    except RuntimeError:   # operands that do not broadcast to the mask's dims: not the rule we read
        return False
    mask4 = mask.reshape(*(1,) * (4 - mask.dim()), *mask.shape)
    return bool(torch.equal(*torch.broadcast_tensors(rule, mask4)))


__all__ = ["EMPTY_ROWS", "POLICIES", "AttentionRule", "SparseAttention"]
