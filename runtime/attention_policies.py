"""Lossy layout policies over an attention mask's block states: they narrow its layout, never widen it.

The states (any visible, all visible) [Bm, Hm, NQ, NK] come from a boolean mask (read here, only
where a policy needs them) or from a rule (`attention_rule.rule_block_states`, no mask at all).
Each policy returns a `Layout` (format in `attention_layout`) whose kept blocks are a subset of
the visible blocks, with their own state: a kept block is full only where every element is
visible, so the op masks every other kept block and no hidden element is ever seen.

    window  StreamingLLM: query block qb keeps the key blocks holding a key of some row i with
            i' - window < j <= i' (i' = i + Skv - S, the query's own key position) or j < sinks
            (block-granular, as `window_layout`). The mask is read only inside those blocks,
            so the cost is O(S * window), not O(S * Skv).
    topk    SeerAttention-style gate (training-free): per (batch, query head, query block) the
            key blocks of highest mean(q block) . mean(k block) among those the mask makes
            visible. `topk` in (0, 1): that fraction of the row's visible blocks, rounded up;
            an integer >= 1: that many. The diagonal blocks and the first `sinks` keys' blocks
            are always kept (when visible) and count toward the budget.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .attention_layout import (Layout, as_4d, block_any_all, block_means, diagonal_blocks, layout_from_blocks,
                               pad_to_blocks, window_blocks)


def _distinct(mask: Tensor) -> Tensor:
    """The mask without its broadcast (stride-0) batch and head entries: those are reduced once."""
    mask = as_4d(mask)
    shared = [n if stride else 1 for n, stride in zip(mask.shape[:2], mask.stride()[:2])]
    return mask[: shared[0], : shared[1]]


def mask_block_states(mask: Tensor, q_blocks: Tensor, k_blocks: Tensor, block_q: int,
                      block_k: int) -> tuple[Tensor, Tensor]:
    """(any, all) [Bm, Hm, P] of the mask's blocks (q_blocks[p], k_blocks[p]), reading only those
    elements; positions past S or Skv count as masked (as in `layout_from_mask`)."""
    seq, keys = mask.shape[-2:]
    rows = (q_blocks[:, None] * block_q + torch.arange(block_q, device=mask.device))[:, :, None]   # [P, bq, 1]
    cols = (k_blocks[:, None] * block_k + torch.arange(block_k, device=mask.device))[:, None, :]   # [P, 1, bk]
    inside = (rows < seq) & (cols < keys)
    values = mask[:, :, rows.clamp(max=seq - 1), cols.clamp(max=keys - 1)] & inside             # [Bm, Hm, P, bq, bk]
    return values.flatten(-2).any(-1), values.flatten(-2).all(-1)


def window_layout_from_mask(mask: Tensor, window: int, sinks: int, block_q: int, block_k: int) -> Layout:
    """The mask's layout narrowed to the window and the sinks (see the module docstring)."""
    mask4, core = as_4d(mask), _distinct(mask)
    seq, keys = mask4.shape[-2:]
    band = window_blocks(seq, keys, window, 0, block_q, block_k, mask.device)
    sink_blocks = min(math.ceil(sinks / block_k), band.shape[1])
    states = torch.zeros(2, *core.shape[:2], *band.shape, dtype=torch.bool, device=mask.device)  # (any, all)
    uniform = uniform_band(core, band, block_q, block_k)
    if uniform is not None:
        first, count, width = uniform
        q_blocks = torch.arange(first, first + count, device=mask.device)
        k_blocks = q_blocks[:, None] + (keys - seq) // block_k - width + 1 + torch.arange(width, device=mask.device)
        states[:, :, :, q_blocks[:, None], k_blocks] = torch.stack(_band_words(core, first, count, width, block_q))
        band[first:first + count] = False
    if sink_blocks:
        strip = pad_to_blocks(core[..., : sink_blocks * block_k].contiguous(), block_q, block_k)
        states[..., :sink_blocks] |= torch.stack(block_any_all(strip, block_q, block_k))[..., : band.shape[0], :]
        band[:, :sink_blocks] = False
    q_blocks, k_blocks = band.nonzero(as_tuple=True)  # what the fast paths left: gather those blocks
    states[:, :, :, q_blocks, k_blocks] = torch.stack(mask_block_states(core, q_blocks, k_blocks, block_q, block_k))
    layout = window_layout_from_states(states[0], states[1], window, sinks, block_q, block_k, seq, keys)
    return Layout(*(t.expand(*mask4.shape[:2], *t.shape[2:]).contiguous() for t in layout))


def window_layout_from_states(any_visible: Tensor, all_visible: Tensor, window: int, sinks: int, block_q: int,
                              block_k: int, seq: int, keys: int) -> Layout:
    """The visible blocks [Bm, Hm, NQ, NK] the window and the sinks reach (`window_blocks`), full where all visible."""
    reach = window_blocks(seq, keys, window, sinks, block_q, block_k, any_visible.device)
    full = all_visible & reach
    return layout_from_blocks(full, any_visible & reach & ~full)


def uniform_band(core: Tensor, band: Tensor, block_q: int, block_k: int) -> Optional[tuple[int, int, int]]:
    """(first query block, count, width) of the run of query blocks whose band is `width` whole key blocks
    ending at their diagonal block, readable as one strided view of the mask's 8-byte words; None if none."""
    seq, keys = core.shape[-2:]
    if block_q != block_k or (keys - seq) % block_k or keys % 8 or block_k % 8 or core.storage_offset() % 8 \
            or not core.is_contiguous() or not band.any():
        return None
    width = int(band.sum(1).max())
    q_blocks = torch.arange(band.shape[0], device=band.device)
    last = q_blocks + (keys - seq) // block_k
    whole = (band.sum(1) == width) & (last - width + 1 >= 0) & ((q_blocks + 1) * block_q <= seq)
    whole &= band.gather(1, last.clamp(max=band.shape[1] - 1)[:, None])[:, 0] & ((last + 1) * block_k <= keys)
    rows = whole.nonzero().flatten().tolist()
    if not rows:
        return None
    first, count = rows[0], 1
    while count < len(rows) and rows[count] == first + count:
        count += 1
    return first, count, width


def _band_words(core: Tensor, first: int, count: int, width: int, block: int) -> tuple[Tensor, Tensor]:
    """(any, all) [Bm, Hm, count, width] of the key blocks (first + i) + shift - width + 1 + j of query
    blocks first + i, shift = (Skv - S) / block: one strided view of the mask as int64 words (8 bools each;
    summing a block row's words adds each byte lane without carry, <= block / 8 <= 255)."""
    seq, keys = core.shape[-2:]
    words = core.view(torch.uint8).view(torch.int64)               # [Bm, Hm, S, Skv / 8]
    per_block, row_words = block // 8, keys // 8
    start = first + (keys - seq) // block - width + 1
    view = words.as_strided(
        (*words.shape[:2], count, block, width, per_block),
        (*words.stride()[:2], block * row_words + per_block, row_words, per_block, 1),
        words.storage_offset() + first * block * row_words + start * per_block)
    sums = view.sum(-1)                                            # [Bm, Hm, count, block, width]
    return (sums != 0).any(3), (sums == per_block * 0x0101010101010101).all(3)


def topk_budget(topk: float, visible: Tensor) -> Tensor:
    """Blocks to keep per row of visible [..., NK]: a fraction of the visible ones (rounded up, >= 1)
    when 0 < topk < 1, else the integer topk."""
    if topk < 1:
        return torch.clamp(torch.ceil(visible.sum(-1) * topk), min=1).long()
    return torch.full(visible.shape[:-1], int(topk), dtype=torch.long, device=visible.device)


def topk_layout_from_mask(mask: Tensor, q: Tensor, k: Tensor, topk: float, sinks: int, block_q: int,
                          block_k: int) -> Layout:
    """[B, Hq, ...] layout: the mask's visible blocks of highest pooled score (see the module docstring)."""
    any_visible, all_visible = block_any_all(pad_to_blocks(_distinct(mask), block_q, block_k), block_q, block_k)
    return topk_layout_from_states(any_visible, all_visible, q, k, topk, sinks, block_q, block_k)


def topk_layout_from_states(any_visible: Tensor, all_visible: Tensor, q: Tensor, k: Tensor, topk: float,
                            sinks: int, block_q: int, block_k: int) -> Layout:
    """[B, Hq, ...] layout: of the visible blocks [Bm, Hm, NQ, NK], those of highest pooled score."""
    seq, keys = q.shape[2], k.shape[2]
    full, partial, visible = all_visible, any_visible & ~all_visible, any_visible
    scores = block_means(q, block_q) @ block_means(k, block_k).repeat_interleave(
        q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)                             # [B, Hq, NQ, NK]
    nk = scores.shape[-1]
    sink_blocks = (torch.arange(nk, device=q.device) < math.ceil(sinks / block_k))[None, :]
    forced = (sink_blocks | diagonal_blocks(seq, keys, block_q, block_k, q.device)) & visible
    ranked = scores.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
    rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(-1)               # 0 = best
    kept = ((rank < topk_budget(topk, visible)[..., None]) & visible) | forced
    return layout_from_blocks(kept & full, kept & partial)
