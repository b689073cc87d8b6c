"""Triton align-and-sort for sparsecc::moe: the tile layout of `moe_routing.align_to_tiles` in 3 launches.

The torch version issues about 40 small device ops per call; at decode sizes
their launch cost is most of the MoE block's time on a GPU. Here:

1. `count_kernel`    atomically counts each expert's pairs (dropped pairs, id E, are not counted);
2. `offsets_kernel`  one program: pads every count to whole BLOCK_M tiles, prefix-sums them into
                     each expert's first slot (its cursor), writes num_padded and each tile's expert
                     (-1 past num_padded);
3. `scatter_kernel`  each pair takes the next slot of its expert's cursor (atomic add) and writes its
                     pair id there; untouched slots keep the sentinel T*k.

Inside one expert's segment the pairs land in whatever order the atomics serve them,
not in token order. Nothing depends on that order: every pair's row is computed on its
own and written to its own output row, and the capacity limit was applied before.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...moe_routing import max_padded_pairs
from .launch import jit, launcher

BLOCK_PAIRS = 1024
BLOCK_TILES = 64


@jit(per_call=("num_pairs",))
def count_kernel(experts_ptr, counts_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pair < num_pairs
    expert = tl.load(experts_ptr + pair, mask=ok, other=0)
    keep = ok & (expert < num_experts)
    tl.atomic_add(counts_ptr + tl.where(keep, expert, 0), tl.full((BLOCK,), 1, tl.int32), mask=keep)


@jit(per_call=("num_tiles",))
def offsets_kernel(counts_ptr, cursor_ptr, tile_expert_ptr, num_padded_ptr, num_experts, num_tiles,
                   BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    expert = tl.arange(0, BLOCK_E)
    real = expert < num_experts
    tiles = (tl.load(counts_ptr + expert, mask=real, other=0) + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    tl.store(cursor_ptr + expert, (tile_end - tiles) * BLOCK_M, mask=real)
    tl.store(num_padded_ptr, tl.sum(tiles, 0) * BLOCK_M)
    for first in range(0, num_tiles, BLOCK_T):
        tile = first + tl.arange(0, BLOCK_T)
        owner = tl.sum(((tile_end[None, :] <= tile[:, None]) & real[None, :]).to(tl.int32), 1)
        tl.store(tile_expert_ptr + tile, tl.where(owner < num_experts, owner, -1).to(tl.int64),
                 mask=tile < num_tiles)


@jit(per_call=("num_pairs",))
def scatter_kernel(experts_ptr, cursor_ptr, sorted_pair_ids_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pair < num_pairs
    expert = tl.load(experts_ptr + pair, mask=ok, other=0)
    keep = ok & (expert < num_experts)
    slot = tl.atomic_add(cursor_ptr + tl.where(keep, expert, 0), tl.full((BLOCK,), 1, tl.int32), mask=keep)
    tl.store(sorted_pair_ids_ptr + slot, pair.to(tl.int64), mask=keep)


def align_to_tiles_triton(experts: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted_pair_ids [P] int64, tile_expert [P/block_m] int64, num_padded 0-dim int32), as
    `moe_routing.align_to_tiles` but with each expert's pairs in atomic (not token) order."""
    flat = experts.reshape(-1).contiguous()
    num_pairs = flat.numel()
    length = max_padded_pairs(num_pairs, num_experts, block_m)
    num_tiles = length // block_m
    sorted_pair_ids = torch.full((length,), num_pairs, dtype=torch.int64, device=flat.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    tile_expert = torch.empty(num_tiles, dtype=torch.int64, device=flat.device)
    num_padded = torch.empty((), dtype=torch.int32, device=flat.device)
    grid = (triton.cdiv(max(num_pairs, 1), BLOCK_PAIRS),)
    launcher(count_kernel, grid)(flat, counts, num_pairs, num_experts, BLOCK=BLOCK_PAIRS)
    launcher(offsets_kernel, (1,))(counts, cursor, tile_expert, num_padded, num_experts, num_tiles,
                                   BLOCK_M=block_m, BLOCK_E=max(16, triton.next_power_of_2(num_experts)),
                                   BLOCK_T=BLOCK_TILES)
    launcher(scatter_kernel, grid)(flat, cursor, sorted_pair_ids, num_pairs, num_experts, BLOCK=BLOCK_PAIRS)
    return sorted_pair_ids, tile_expert, num_padded
