"""Block layouts of sparse attention (FlexAttention BlockMask style), built by vectorised torch on any device.

Queries are cut into blocks of block_q rows, keys into blocks of block_k
columns: NQ = ceil(S / block_q), NK = ceil(Skv / block_k). Over a boolean
mask [Bm, Hm, S, Skv] (Bm in {1, B}, Hm in {1, Hq}; True = may attend;
positions past S or Skv in a ragged last block count as masked) a key block
is, for one query block:

    full     every element visible: attended with no per-element mask
    partial  some visible, some not: attended under the per-element mask
    absent   nothing visible: never visited

    full_num_blocks [Bm, Hm, NQ] int32    full_indices [Bm, Hm, NQ, NK] int32
    kv_num_blocks   [Bm, Hm, NQ] int32    kv_indices   [Bm, Hm, NQ, NK] int32

The first `*_num_blocks` entries of a row of indices are valid and ascending;
the rest are the remaining block numbers and carry no meaning. The causal
mask is bottom-right aligned: query i sees key j iff j <= i + (Skv - S), so a
decode step (S = 1) sees every key. A layout says nothing about the elements
of partial blocks: `sparsecc::block_attention` takes them from its mask, or
from that causal rule when it is given no mask.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor


class Layout(NamedTuple):
    kv_num_blocks: Tensor    # partial key blocks per query block
    kv_indices: Tensor
    full_num_blocks: Tensor  # fully visible key blocks per query block
    full_indices: Tensor


def compact(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(count, indices) int32 of a [..., NK] bool block row: the True positions first, ascending."""
    order = torch.argsort((~blocks).to(torch.uint8), dim=-1, stable=True)
    return blocks.sum(-1, dtype=torch.int32), order.to(torch.int32)


def layout_from_blocks(full: Tensor, partial: Tensor) -> Layout:
    """The layout of dense block states: full and partial are [Bm, Hm, NQ, NK] bool, never both True."""
    kv_num, kv_idx = compact(partial)
    full_num, full_idx = compact(full)
    return Layout(kv_num, kv_idx, full_num, full_idx)


def block_states(layout: Layout) -> tuple[Tensor, Tensor]:
    """(full, partial): the dense [Bm, Hm, NQ, NK] bool block states a layout lists."""
    def dense(num: Tensor, indices: Tensor) -> Tensor:
        nk = indices.shape[-1]
        valid = torch.arange(nk, device=indices.device) < num[..., None]
        slots = torch.where(valid, indices.long(), nk)  # invalid entries land in a spill column
        out = torch.zeros(*indices.shape[:-1], nk + 1, dtype=torch.bool, device=indices.device)
        return out.scatter_(-1, slots, True)[..., :nk]
    return dense(layout.full_num_blocks, layout.full_indices), dense(layout.kv_num_blocks, layout.kv_indices)


def as_4d(mask: Tensor) -> Tensor:
    """A [S, Skv] or [Hm, S, Skv] mask viewed as 4-d with leading ones (torch's broadcasting)."""
    return mask.reshape(*(1,) * (4 - mask.dim()), *mask.shape)


def block_any_all(mask: Tensor, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """(any, all) [Bm, Hm, NQ, NK] of a block-padded bool mask [Bm, Hm, NQ*bq, NK*bk]."""
    lead, (rows, cols) = mask.shape[:2], mask.shape[2:]
    nq, nk, words = rows // block_q, cols // block_k, block_k // 8
    if mask.is_contiguous() and block_k % 8 == 0 and words < 256 and mask.storage_offset() % 8 == 0:
        # 8 bools per int64: summing a block row's words adds each byte lane without carry (<= 255)
        sums = mask.view(torch.uint8).view(torch.int64).view(*lead, nq, block_q, nk, words).sum(-1)
        return (sums != 0).any(3), (sums == words * 0x0101010101010101).all(3)
    count = mask.reshape(*lead, nq, block_q, nk, block_k).sum((3, 5), dtype=torch.int32)
    return count > 0, count == block_q * block_k


def layout_from_mask(mask: Tensor, block_q: int, block_k: int) -> Layout:
    """The layout of a bool mask [Bm, Hm, S, Skv]: the block states its elements imply."""
    mask = as_4d(mask)
    shared = [n if stride else 1 for n, stride in zip(mask.shape[:2], mask.stride()[:2])]
    core = mask[: shared[0], : shared[1]]  # a broadcast (stride-0) batch or head dim is reduced once
    any_visible, full = block_any_all(pad_to_blocks(core, block_q, block_k), block_q, block_k)
    layout = layout_from_blocks(full, any_visible & ~full)
    return Layout(*(t.expand(*mask.shape[:2], *t.shape[2:]).contiguous() for t in layout))


def pad_to_blocks(x: Tensor, block_rows: int, block_cols: int) -> Tensor:
    """x [..., R, C] zero-padded to whole blocks (x itself when already whole)."""
    rows, cols = x.shape[-2:]
    extra_rows, extra_cols = -rows % block_rows, -cols % block_cols
    return torch.nn.functional.pad(x, (0, extra_cols, 0, extra_rows)) if extra_rows or extra_cols else x


def _block_bounds(seq: int, block: int, n: int, device) -> tuple[Tensor, Tensor]:
    """(first, last) in-range position of each of n blocks, int64 [n]."""
    first = torch.arange(n, device=device) * block
    return first, torch.clamp(first + block, max=seq) - 1


def causal_blocks(seq: int, keys: int, block_q: int, block_k: int, device) -> tuple[Tensor, Tensor]:
    """(any visible, all visible) [NQ, NK] of the causal mask j <= i + keys - seq."""
    nq, nk = math.ceil(seq / block_q), math.ceil(keys / block_k)
    q_first, q_last = _block_bounds(seq, block_q, nq, device)
    k_first, k_last = _block_bounds(keys, block_k, nk, device)
    offset = keys - seq
    any_visible = k_first[None, :] <= q_last[:, None] + offset
    whole = ((q_first + block_q <= seq)[:, None]) & ((k_first + block_k <= keys)[None, :])
    return any_visible, whole & (k_last[None, :] <= q_first[:, None] + offset)


def causal_layout(seq: int, keys: int, block_q: int, block_k: int, device=None) -> Layout:
    """[1, 1, ...] layout of the bottom-right aligned causal mask, without building the mask."""
    any_visible, full = causal_blocks(seq, keys, block_q, block_k, device)
    return layout_from_blocks(full[None, None], (any_visible & ~full)[None, None])


def window_blocks(seq: int, keys: int, window: int, sinks: int, block_q: int, block_k: int, device=None) -> Tensor:
    """[NQ, NK] bool: the key blocks the window and the sinks reach, causal blocks only."""
    causal_any, _ = causal_blocks(seq, keys, block_q, block_k, device)
    nq, nk = causal_any.shape
    q_first, q_last = _block_bounds(seq, block_q, nq, device)
    k_first, k_last = _block_bounds(keys, block_k, nk, device)
    offset = keys - seq
    low = torch.maximum(k_first[None, :], q_first[:, None] + offset - window + 1)
    in_window = low <= torch.minimum(k_last[None, :], q_last[:, None] + offset)
    return causal_any & (in_window | (k_first < sinks)[None, :])


def window_layout(seq: int, keys: int, window: int, sinks: int, block_q: int, block_k: int,
                  device=None) -> Layout:
    """StreamingLLM: query i sees keys i' - window < j <= i' (i' = i + keys - seq) and the first `sinks`.

    Block-granular: a causal block is kept whole (up to the causal rule) when any of its
    elements lies in the window or the sinks, so a query sees a little more than `window` keys.
    """
    kept = window_blocks(seq, keys, window, sinks, block_q, block_k, device)
    causal_full = causal_blocks(seq, keys, block_q, block_k, device)[1]
    return layout_from_blocks((kept & causal_full)[None, None], (kept & ~causal_full)[None, None])


def diagonal_blocks(seq: int, keys: int, block_q: int, block_k: int, device) -> Tensor:
    """[NQ, NK] key blocks holding the keys at the query rows' own positions (i + keys - seq)."""
    nq, nk = math.ceil(seq / block_q), math.ceil(keys / block_k)
    q_first, q_last = _block_bounds(seq, block_q, nq, device)
    k_first, k_last = _block_bounds(keys, block_k, nk, device)
    offset = keys - seq
    return (k_first[None, :] <= q_last[:, None] + offset) & (k_last[None, :] >= q_first[:, None] + offset)


def block_means(x: Tensor, block: int) -> Tensor:
    """[B, H, N, D] means of blocks of rows of x [B, H, L, D] (a ragged last block over its rows)."""
    length, n = x.shape[2], math.ceil(x.shape[2] / block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - length))
    sizes = torch.clamp(length - torch.arange(n, device=x.device) * block, max=block)
    return padded.reshape(*x.shape[:2], n, block, x.shape[3]).sum(3) / sizes[:, None]


def topk_layout(q: Tensor, k: Tensor, fraction_or_k: Union[float, int], block_q: int, block_k: int,
                keep_diagonal: bool = True, sinks_blocks: int = 1, causal: bool = True) -> Layout:
    """SeerAttention-style [B, Hq, ...] layout: per query block, the key blocks of highest
    mean(q block) . mean(k block), each kv head's pooled keys serving its Hq / Hkv query heads.

    Keeps `fraction_or_k` blocks (a float in (0, 1]: that fraction of NK, at least one), plus
    always the diagonal blocks and the first `sinks_blocks`. causal: only blocks with a
    causally visible element compete, and the result is intersected with the causal layout.
    """
    seq, keys = q.shape[2], k.shape[2]
    scores = block_means(q, block_q) @ block_means(k, block_k).repeat_interleave(
        q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)  # [B, Hq, NQ, NK]; pooled, so small
    nk = scores.shape[-1]
    count = min(nk, max(1, round(fraction_or_k * nk)) if isinstance(fraction_or_k, float) else int(fraction_or_k))
    forced = (torch.arange(nk, device=q.device) < sinks_blocks)[None, :]
    if keep_diagonal:
        forced = forced | diagonal_blocks(seq, keys, block_q, block_k, q.device)
    scores = scores.masked_fill(forced, float("inf"))
    if causal:
        scores = scores.masked_fill(~causal_blocks(seq, keys, block_q, block_k, q.device)[0], float("-inf"))
    top, chosen = scores.topk(count, dim=-1)
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, top > float("-inf")) | forced
    layout = layout_from_blocks(kept, torch.zeros_like(kept))
    return intersect(layout, causal_layout(seq, keys, block_q, block_k, q.device)) if causal else layout


def intersect(a: Layout, b: Layout) -> Layout:
    """Blocks kept by both layouts (broadcast over Bm, Hm); full only where full in both."""
    full_a, partial_a = block_states(a)
    full_b, partial_b = block_states(b)
    kept = (full_a | partial_a) & (full_b | partial_b)
    full = full_a & full_b
    return layout_from_blocks(full, kept & ~full)


def density(layout: Layout) -> float:
    """Kept key blocks / all key blocks, over every (batch, head, query block)."""
    kept = (layout.kv_num_blocks.long() + layout.full_num_blocks.long()).sum().item()
    return kept / (layout.full_num_blocks.numel() * layout.full_indices.shape[-1])


def layout_problem(layout: Layout, batch: int, heads: int, nq: int, nk: int, check_data: bool) -> Optional[str]:
    """None when `layout` fits NQ query and NK key blocks of [batch, heads] (shapes [1|B, 1|H, NQ(, NK)]
    int32, kv and full alike), else why not. With `check_data` also the values: counts in [0, NK], indices
    in [0, NK), each row's listed prefix strictly ascending, no block both full and partial (vectorised)."""
    counts, indices = (layout.kv_num_blocks, layout.full_num_blocks), (layout.kv_indices, layout.full_indices)
    if list(counts[0].shape) != list(counts[1].shape):
        return f"kv_num_blocks {list(counts[0].shape)} and full_num_blocks {list(counts[1].shape)} differ"
    for count, index in zip(counts, indices):
        lead = list(count.shape)[:2]
        if count.dim() != 3 or lead[0] not in (1, batch) or lead[1] not in (1, heads) or count.shape[2] != nq:
            return f"block counts {list(count.shape)} must be [1|{batch}, 1|{heads}, NQ={nq}]"
        if list(index.shape) != [*lead, nq, nk]:
            return f"block indices {list(index.shape)} must be [{lead[0]}, {lead[1]}, {nq}, NK={nk}]"
        if count.dtype != torch.int32 or index.dtype != torch.int32:
            return f"layout dtypes {count.dtype}, {index.dtype} must be torch.int32"
    if not check_data:
        return None
    return (_listing_problem("kv", layout.kv_num_blocks, layout.kv_indices, nk)
            or _listing_problem("full", layout.full_num_blocks, layout.full_indices, nk) or _overlap_problem(layout))


def _listing_problem(kind: str, count: Tensor, index: Tensor, nk: int) -> Optional[str]:
    """Counts in [0, NK], indices in [0, NK), the first count entries of each row strictly ascending."""
    if count.numel() and not bool(((count >= 0) & (count <= nk)).all()):
        return f"{kind}_num_blocks holds a count outside [0, NK={nk}]"
    if not index.numel():
        return None
    if not bool(((index >= 0) & (index < nk)).all()):
        return f"{kind}_indices holds a key block outside [0, NK={nk})"
    listed = torch.arange(1, nk, device=index.device) < count[..., None]  # entry j+1 is listed
    if bool((listed & (index[..., 1:] <= index[..., :-1])).any()):
        return f"{kind}_indices lists a key block twice or out of order in some query block"
    return None


def _overlap_problem(layout: Layout) -> Optional[str]:
    full, partial = block_states(layout)
    return "a key block is listed both full and partial" if bool((full & partial).any()) else None
