"""`sparsecc::quest_layout`: Quest page selection for one query over a paged KV cache (Tang et al. 2024).

    kv_num_blocks [Lm, 1], kv_indices [Lm, 1, NP], full_num_blocks [Lm, 1], full_indices [Lm, 1, NP]
        the visible pages of the query (`rule_layout` / `block_layout` under policy mask, block_k = page;
        Lm = (1|B, 1|Hq)),
    q [B, Hq, 1, D], key_min / key_max [B, Hkv, NP, D]   per page of `page` cached keys, their elementwise
        minimum and maximum (program state kept beside the cache, `passes/attention/quest.py`)
    -> the layout narrowed to [B, Hq, 1, NP] (format in `sparsecc.runtime.attention_layout`)

A page's upper bound on q . k over its keys is

    bound(q, page) = sum_d max(q_d * key_max_d, q_d * key_min_d)

(kv heads serve their query-head group). Of the visible pages
the `topk` of highest bound are kept (fraction in (0, 1) of the visible pages, rounded up, or a count >= 1),
always with the page holding the query's own position (the last visible page: causal) and the pages of the
first `sinks` keys, which count toward the budget. Kept pages keep their state (full or partial), so the
mask's elements still decide inside them. Reads O(B * Hkv * NP * D) summary values, never a key.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..attention_layout import Layout, block_states, causal_layout, layout_from_blocks, layout_problem
from ..attention_policies import topk_budget
from ..attention_rule import rule_block_states
from ..kernels.checks import refuse
from .registry import OpDef, has_data

SCHEMA = ("(Tensor kv_num_blocks, Tensor kv_indices, Tensor full_num_blocks, Tensor full_indices, Tensor q, "
          "Tensor key_min, Tensor key_max, float topk, int sinks, int page) -> (Tensor, Tensor, Tensor, Tensor)")


def page_bounds(q: Tensor, key_min: Tensor, key_max: Tensor) -> Tensor:
    """fp32 [B, Hq, 1, NP]: the largest q . k any key between key_min and key_max (elementwise) can give."""
    batch, heads, _, dim = q.shape
    q = q.float().reshape(batch, key_min.shape[1], heads // key_min.shape[1], 1, dim)     # [B, Hkv, G, 1, D]
    # elementwise, not q @ summaries^T: a batched one-row matmul cost 16 ms at 16 heads x 512 pages, this 0.1 ms
    bound = torch.maximum(q * key_max.float()[:, :, None], q * key_min.float()[:, :, None]).sum(-1)
    return bound.reshape(batch, heads, 1, -1)


def current_and_sink_pages(visible: Tensor, sinks: int, page: int) -> Tensor:
    """Bool like visible [..., NP]: the last visible page (the query's own position) and the sink pages,
    counted from each row's first visible page (a left-padded row's first tokens start there, maybe mid-page:
    one page more covers them)."""
    pages = torch.arange(visible.shape[-1], device=visible.device)
    last = torch.where(visible, pages, -1).amax(-1, keepdim=True)
    first = torch.where(visible, pages, visible.shape[-1]).amin(-1, keepdim=True)
    sink_pages = math.ceil(sinks / page) + 1 if sinks > 0 else 0
    return ((pages == last) | ((pages >= first) & (pages < first + sink_pages))) & visible


def quest_layout_kernel(kv_num_blocks: Tensor, kv_indices: Tensor, full_num_blocks: Tensor, full_indices: Tensor,
                        q: Tensor, key_min: Tensor, key_max: Tensor, topk: float, sinks: int,
                        page: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    visible_layout = Layout(kv_num_blocks, kv_indices, full_num_blocks, full_indices)
    refuse("quest_layout", verify_quest_layout(*visible_layout, q, key_min, key_max, topk, sinks, page))
    full, partial = (s.expand(*q.shape[:2], *s.shape[2:]) for s in block_states(visible_layout))
    visible = full | partial
    forced = current_and_sink_pages(visible, sinks, page)
    ranked = page_bounds(q, key_min, key_max).masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
    kept = (_top(ranked, topk_budget(topk, visible)) & visible) | forced
    return tuple(layout_from_blocks(kept & full, kept & partial))


def _top(ranked: Tensor, budget: Tensor) -> Tensor:
    """Bool like ranked [..., NP]: each row's `budget` highest entries (one topk, not a full sort)."""
    most = min(int(budget.max()), ranked.shape[-1]) if budget.numel() else 0
    order = ranked.topk(most, dim=-1).indices
    return torch.zeros_like(ranked, dtype=torch.bool).scatter_(
        -1, order, torch.arange(most, device=ranked.device) < budget[..., None])


@torch.library.custom_op("sparsecc::quest_layout", mutates_args=(), schema=SCHEMA)
def quest_layout(kv_num_blocks: Tensor, kv_indices: Tensor, full_num_blocks: Tensor, full_indices: Tensor, q: Tensor,
                 key_min: Tensor, key_max: Tensor, topk: float, sinks: int,
                 page: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return quest_layout_kernel(kv_num_blocks, kv_indices, full_num_blocks, full_indices, q, key_min, key_max, topk,
                               sinks, page)


@quest_layout.register_fake
def _(kv_num_blocks, kv_indices, full_num_blocks, full_indices, q, key_min, key_max, topk, sinks, page):
    counts = kv_num_blocks.new_empty(*q.shape[:2], 1, dtype=torch.int32)
    indices = kv_indices.new_empty(*q.shape[:2], 1, key_min.shape[2], dtype=torch.int32)
    return counts, indices, counts.clone(), indices.clone()


def _summary_problem(q: Tensor, key_min: Tensor, key_max: Tensor) -> Optional[str]:
    if q.dim() != 4 or q.shape[2] != 1 or not q.dtype.is_floating_point:
        return f"q {q.dtype}{list(q.shape)} must be one floating query per row [B, Hq, 1, D] (Quest is for decode)"
    if key_min.dim() != 4 or list(key_min.shape) != list(key_max.shape) or key_min.dtype != key_max.dtype \
            or not key_min.dtype.is_floating_point:
        return (f"key_min {key_min.dtype}{list(key_min.shape)} and key_max {key_max.dtype}{list(key_max.shape)} "
                "must be one floating [B, Hkv, NP, D]")
    batch, heads, _, dim = q.shape
    kv_heads = key_min.shape[1]
    if key_min.shape[0] != batch or key_min.shape[3] != dim or kv_heads == 0 or heads % kv_heads:
        return f"key summaries {list(key_min.shape)} do not fit q {list(q.shape)} ([B, Hkv, NP, D], Hkv | Hq)"
    return None


def _option_problem(topk: float, sinks: int, page: int) -> Optional[str]:
    if not isinstance(topk, (int, float)) or isinstance(topk, bool) or not (
            0 < topk < 1 or (topk >= 1 and float(topk).is_integer())):
        return f"topk={topk!r} must be a fraction in (0, 1) or a whole number of pages >= 1"
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        return f"sinks={sinks!r} must be an integer >= 0"
    if not isinstance(page, int) or isinstance(page, bool) or page < 16 or page & (page - 1):
        return f"page={page!r} must be a power of two >= 16 (the key block of block_attention)"
    return None


def verify_quest_layout(kv_num_blocks: Tensor, kv_indices: Tensor, full_num_blocks: Tensor, full_indices: Tensor,
                        q: Tensor, key_min: Tensor, key_max: Tensor, topk: float, sinks: int,
                        page: int) -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found; real layout tensors also have
    their values checked (`attention_layout.layout_problem`)."""
    problem = _option_problem(topk, sinks, page) or _summary_problem(q, key_min, key_max)
    if problem:
        return problem
    layout = Layout(kv_num_blocks, kv_indices, full_num_blocks, full_indices)
    return layout_problem(layout, q.shape[0], q.shape[1], 1, key_min.shape[2], all(has_data(t) for t in layout))


def _samples() -> list[tuple]:
    keys, page = 80, 16
    padded = torch.stack([torch.arange(keys) >= 20, torch.arange(keys) >= 0]).long()     # row 0 left-padded by 20
    rows = torch.stack([torch.full((2, 1), 70), torch.zeros(2, 1, dtype=torch.long)])   # query at position 70
    cols = torch.stack([torch.arange(keys).expand(2, keys), padded])
    any_visible, full = rule_block_states(rows, cols, "ge,ne", page, page)
    keys_ = torch.randn(2, 2, keys, 8).view(2, 2, keys // page, page, 8)
    key_min, key_max = keys_.amin(3), keys_.amax(3)
    q = torch.randn(2, 4, 1, 8)
    return [(*layout_from_blocks(full, any_visible & ~full), q, key_min, key_max, 2.0, 0, page),
            (*layout_from_blocks(full, any_visible & ~full), q, key_min, key_max, 0.5, 4, page),
            (*causal_layout(1, keys, page, page), q, key_min, key_max, 1.0, 16, page)]


QUEST_LAYOUT = OpDef(name="quest_layout", op=torch.ops.sparsecc.quest_layout.default,
                     kernels={"torch": quest_layout_kernel, "triton": quest_layout_kernel},
                     verify=verify_quest_layout, attrs=("topk", "sinks", "page"), samples=_samples)
