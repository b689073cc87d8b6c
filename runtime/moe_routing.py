"""Routing and sort/pad bookkeeping of `sparsecc::moe`, shared by the CPU and Triton kernels.

A (token, slot) *pair* is one of a token's top_k expert choices; its flat id
is `pair = token * top_k + slot`, so flat order is token order. `experts [T, k]`
holds each pair's expert; the id `num_experts` marks a pair dropped by the
capacity limit: it sorts last, counts for no expert and gets no tile.

Tile layout (vLLM `moe_align_block_size`): pairs sorted by expert (stable),
each expert's segment padded with the sentinel `T*k` up to a multiple of
block_m, so every tile of block_m slots belongs to one expert:

    sorted_pair_ids  e0 e0 e0 -- | e2 e2 e2 e2 | e2 -- -- -- | -- -- -- -- ...
    tile_expert        0         |  2          |  2          | -1 ...
                     '--' = sentinel; slots from num_padded on are sentinels, their tiles -1

The buffers have a fixed worst-case length (every non-empty expert wastes at
most block_m - 1 slots) so nothing here waits on the device; `num_padded` is
a 0-dim tensor. All functions are vectorised torch and run on any device.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

SCORINGS = ("softmax", "sigmoid", "sparsemixer")
GROUP_SCORE_TOP = 2   # a group's score is the sum of its best 2 corrected scores (DeepSeek-V3)


def group_limited(choice: Tensor, n_group: int, topk_group: int) -> Tensor:
    """choice [T, E] with every expert outside each token's best topk_group groups set to -inf; experts
    are split into n_group consecutive groups, a group scored by the sum of its top-2 choice scores."""
    grouped = choice.view(choice.shape[0], n_group, choice.shape[1] // n_group)
    group_scores = grouped.topk(GROUP_SCORE_TOP, dim=-1).values.sum(-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~kept[..., None], float("-inf")).view_as(choice)


def sparsemixer(logits: Tensor, top_k: int, eps: float) -> tuple[Tensor, Tensor]:
    """PhiMoE's inference routing: slot j takes the best expert m_j not taken yet; its weight is the
    softmax at m_j over the untaken experts i with (s[m_j] - s[i]) / max(|s[i]|, s[m_j]) <= 2*eps."""
    weights, experts, untaken = [], [], logits
    for _ in range(top_k):
        best, index = untaken.max(dim=-1, keepdim=True)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        weights.append(untaken.masked_fill(far, float("-inf")).softmax(-1).gather(-1, index))
        experts.append(index)
        untaken = untaken.scatter(-1, index, float("-inf"))
    return torch.cat(weights, -1), torch.cat(experts, -1)


def route(router_logits: Tensor, top_k: int, normalize: bool, scoring: str, *,
          score_correction_bias: Optional[Tensor] = None, n_group: int = 1, topk_group: int = 1,
          routed_scaling_factor: float = 1.0, sparsemixer_eps: float = 0.01) -> tuple[Tensor, Tensor]:
    """(weights fp32 [T, k], experts int64 [T, k]), the routing of `sparsecc.runtime.ops.moe`: experts
    chosen on scores + score_correction_bias (group-limited when n_group > 1), weighted by the
    uncorrected scores, divided by their sum if normalize, times routed_scaling_factor."""
    logits = router_logits.float()
    if scoring == "sparsemixer":
        weights, experts = sparsemixer(logits, top_k, sparsemixer_eps)
    else:
        scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
        choice = scores if score_correction_bias is None else scores + score_correction_bias.float()
        if n_group > 1:
            choice = group_limited(choice, n_group, topk_group)
        experts = choice.topk(top_k, dim=-1).indices
        weights = scores.gather(1, experts)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * routed_scaling_factor, experts


def sort_by_expert(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(order [T*k]: flat pair ids stably sorted by expert, tokens_per_expert [E]); dropped pairs last."""
    flat = experts.reshape(-1)
    order = flat.sort(stable=True).indices
    tokens_per_expert = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    return order, tokens_per_expert


def _segments(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sort_by_expert plus, per sorted pair, its expert and its rank inside that expert's segment."""
    order, tokens_per_expert = sort_by_expert(experts, num_experts)
    sorted_expert = experts.reshape(-1)[order]
    segment_start = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    segment_start = torch.cat([segment_start, segment_start.new_zeros(1)])  # dropped pairs: rank unused
    rank = torch.arange(order.numel(), device=order.device) - segment_start[sorted_expert]
    return order, tokens_per_expert, sorted_expert, rank


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Length of sorted_pair_ids: every pair plus block_m - 1 padding per non-empty expert, in whole tiles."""
    worst = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return math.ceil(worst / block_m) * block_m


def align_to_tiles(experts: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted_pair_ids [P], tile_expert [P/block_m], num_padded 0-dim): the tile layout above."""
    num_pairs = experts.numel()
    order, tokens_per_expert, sorted_expert, rank = _segments(experts, num_experts)
    tile_end = torch.cumsum((tokens_per_expert + block_m - 1) // block_m, 0)
    padded_start = torch.cat([tile_end.new_zeros(1), tile_end]) * block_m  # index E: the dump slot below
    length = max_padded_pairs(num_pairs, num_experts, block_m)
    padded_start[-1] = length
    slot = padded_start[sorted_expert] + torch.where(sorted_expert < num_experts, rank, 0)
    sorted_pair_ids = torch.full((length + 1,), num_pairs, dtype=torch.int64, device=experts.device)
    sorted_pair_ids.scatter_(0, slot, order)
    tile = torch.arange(length // block_m, device=experts.device)
    tile_expert = torch.searchsorted(tile_end, tile, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1)
    return sorted_pair_ids[:length], tile_expert, tile_end[-1] * block_m


def capacity(num_pairs: int, num_experts: int, capacity_factor: float) -> int:
    """Pairs one expert may take: ceil(capacity_factor * T*k / E); no limit when the factor is 0."""
    if capacity_factor <= 0:
        return num_pairs
    return math.ceil(capacity_factor * num_pairs / num_experts)


def capacity_mask(experts: Tensor, num_experts: int, capacity_factor: float) -> tuple[Tensor, Tensor]:
    """(keep [T, k] bool, dropped 0-dim int64): each expert keeps its first `capacity` pairs (token order)."""
    order, _, _, rank = _segments(experts, num_experts)
    limit = capacity(experts.numel(), num_experts, capacity_factor)
    keep = torch.empty_like(rank, dtype=torch.bool).scatter_(0, order, rank < limit).view_as(experts)
    return keep, (~keep).sum()


def route_within_capacity(router_logits: Tensor, top_k: int, normalize: bool, scoring: str,
                          capacity_factor: float, **selection: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(weights, experts with dropped pairs set to E, dropped count): what both kernels dispatch;
    `selection` takes route's keyword arguments."""
    weights, experts = route(router_logits, top_k, normalize, scoring, **selection)
    if capacity_factor <= 0:
        return weights, experts, experts.new_zeros(())
    num_experts = router_logits.shape[-1]
    keep, dropped = capacity_mask(experts, num_experts, capacity_factor)
    return weights, experts.masked_fill(~keep, num_experts), dropped
