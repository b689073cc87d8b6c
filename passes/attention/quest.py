"""Quest page selection in decode: per-page key summaries kept with the KV cache, pages chosen by bound.

A generation step writes its keys into a static cache and attends over all of it:

    cache = index_copy_(cache_state, 2, positions, new_keys)      [B, Hkv, L, D], positions int64 [S]
    out   = attention(q, cache, ...)

Under policy `topk` such a site also keeps, per page of `page` cache slots, the elementwise minimum and
maximum of its written keys (key_min / key_max [B, Hkv, ceil(L / page), D], program state next to the
cache). Right after the cache write the pages the step touched are recomputed from the cache over the
slots written so far (slot <= max(positions)): the one page of the written position in decode (S = 1),
every page in prefill (S > 1; pages wholly after the prompt get key_min = +max, key_max = -max, no bound).

In decode (one query row) the layout is then `sparsecc::quest_layout`: the mask's visible pages
(`rule_layout` / `block_layout` at block_k = page) narrowed to the `topk` of highest upper bound
q . k from the summaries, the current page and the sink pages always kept (runtime/ops/quest_layout.py).
Choosing reads the summaries, 2 / page of the keys' bytes. Prefill keeps the pooled-score `topk`
layout and only maintains the summaries, so both programs hold the same state, in the same order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..rewriter import Rewriter
from ..state import alias_root
from .sites import AttentionSite

aten = torch.ops.aten


@dataclass(frozen=True)
class KeyCache:
    """The key cache write a site attends through: `write` = index_copy_(state, 2, positions, new keys)."""
    write: Node
    positions: Node

    @property
    def shape(self) -> tuple:
        return tuple(self.write.meta["val"].shape)


def key_cache(site: AttentionSite) -> Optional[KeyCache]:
    """The site's key cache write when k is a state tensor written in place along its sequence dim."""
    write = site.k
    if write.target is not aten.index_copy_.default or write.args[1] not in (2, -2):
        return None
    if alias_root(write.args[0]).op != "get_attr" or write.args[0].meta["val"].shape != write.meta["val"].shape:
        return None
    return KeyCache(write, write.args[2])


def one_query(site: AttentionSite) -> bool:
    """Whether the site runs one query row per call (a decode step): what Quest selects pages for."""
    return site.q.meta["val"].shape[2] == 1


def page_summaries(cache: torch.Tensor, last: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_min, key_max) [B, H, ceil(L / page), D] over the slots <= last of each page (eager, for the
    error on example inputs and for tests); a page with no such slot holds (+max, -max)."""
    batch, heads, length, dim = cache.shape
    pages = math.ceil(length / page)
    padded = torch.nn.functional.pad(cache, (0, 0, 0, pages * page - length)).view(batch, heads, pages, page, dim)
    hidden = (torch.arange(pages * page, device=cache.device) > last).view(pages, page, 1)
    big = torch.finfo(cache.dtype).max
    return padded.masked_fill(hidden, big).amin(3), padded.masked_fill(hidden, -big).amax(3)


def insert_key_summaries(gm: GraphModule, site: AttentionSite, cache: KeyCache, page: int) -> tuple[Node, Node]:
    """key_min / key_max state constants and their update right after the cache write (module docstring);
    returns the updated (key_min, key_max) values."""
    rw = Rewriter(gm, site.root)
    batch, heads, length, dim = cache.shape
    value = cache.write.meta["val"]
    summary = torch.zeros(batch, heads, math.ceil(length / page), dim, dtype=value.dtype, device=value.device)
    state = alias_root(cache.write.args[0]).target
    key_min, key_max = (rw.add_constant(f"{state}_page_{side}", summary.clone()) for side in ("min", "max"))
    pages = _touched_pages(rw, cache, page, one_query(site))
    slots = rw.call(aten.add.Tensor, rw.call(aten.mul.Tensor, rw.call(aten.unsqueeze.default, pages, 1), page),
                    rw.call(aten.arange.default, page, dtype=torch.int64, device=value.device))   # [N, page]
    last = rw.call(aten.amax.default, cache.positions, [0])
    hidden = rw.call(aten.logical_or.default, rw.call(aten.gt.Tensor, slots, last),
                     rw.call(aten.ge.Scalar, slots, length))                     # unwritten, or past the cache
    gathered = rw.call(aten.index_select.default, cache.write, 2,
                       rw.call(aten.reshape.default, rw.call(aten.clamp_max.default, slots, length - 1), [-1]))
    gathered = rw.call(aten.reshape.default, gathered, [batch, heads, -1, page, dim])
    hidden = rw.call(aten.unsqueeze.default, hidden, -1)
    big = torch.finfo(value.dtype).max
    low = rw.call(aten.amin.default, rw.call(aten.masked_fill.Scalar, gathered, hidden, big), [3])
    high = rw.call(aten.amax.default, rw.call(aten.masked_fill.Scalar, gathered, hidden, -big), [3])
    return (rw.call(aten.index_copy_.default, key_min, 2, pages, low),
            rw.call(aten.index_copy_.default, key_max, 2, pages, high))


def _touched_pages(rw: Rewriter, cache: KeyCache, page: int, decode: bool) -> Node:
    """int64 [N]: the written position's page (decode), else every page (prefill recomputes them all)."""
    if decode:
        return rw.call(aten.div.Scalar_mode, cache.positions, page, rounding_mode="floor")
    device = cache.write.meta["val"].device
    return rw.call(aten.arange.default, math.ceil(cache.shape[2] / page), dtype=torch.int64, device=device)


@dataclass(frozen=True)
class QuestPages:
    """The `narrow` step of a decode site's block-attention call: its visible pages to the top by bound."""
    topk: float
    sinks: int
    page: int
    cache: KeyCache
    key_min: Optional[Node] = None   # the summaries in the graph (set when inserted)
    key_max: Optional[Node] = None

    def narrowed(self, layout: list, site: AttentionSite, values: dict) -> list:
        """The layout on recorded example values, summaries computed from the recorded cache."""
        last = int(values[self.cache.positions].max())
        key_min, key_max = page_summaries(values[self.cache.write], last, self.page)
        return list(torch.ops.sparsecc.quest_layout(*layout, values[site.q], key_min, key_max, float(self.topk),
                                                    self.sinks, self.page))

    def inserted(self, rw: Rewriter, parts: list[Node], site: AttentionSite) -> list[Node]:
        layout = rw.call(torch.ops.sparsecc.quest_layout.default, *parts, site.q, self.key_min, self.key_max,
                         float(self.topk), self.sinks, self.page)
        return [rw.getitem(layout, i) for i in range(4)]


__all__ = ["KeyCache", "QuestPages", "insert_key_summaries", "key_cache", "one_query", "page_summaries"]
