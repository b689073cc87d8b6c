"""MoE routing bookkeeping: every kept (token, expert) pair lands in exactly one tile of its expert."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.runtime.moe_routing import (align_to_tiles, capacity, capacity_mask, max_padded_pairs, route,
                                          route_within_capacity, sort_by_expert)


@st.composite
def routings(draw):
    """(experts [T, k] with distinct experts per token, E); skew sends most tokens to a few experts."""
    num_experts = draw(st.integers(1, 16))
    top_k = draw(st.integers(1, min(num_experts, 4)))
    tokens = draw(st.integers(0, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    skew = torch.arange(num_experts, dtype=torch.float32) * draw(st.sampled_from([0.0, 1.0, 4.0]))
    logits = torch.randn(tokens, num_experts, generator=gen) + skew
    return logits.topk(top_k, -1).indices, num_experts


def with_drops(experts, num_experts, capacity_factor):
    """experts with pairs over capacity set to E (how the kernels mark them), and the kept mask."""
    keep, _ = capacity_mask(experts, num_experts, capacity_factor)
    return experts.masked_fill(~keep, num_experts), keep


@settings(max_examples=200, deadline=None)
@given(routings(), st.sampled_from([1, 2, 4, 16]), st.sampled_from([0.0, 0.5, 1.0]))
def test_every_kept_pair_reaches_its_expert_once(routing, block_m, capacity_factor):
    experts, num_experts = routing
    experts, keep = with_drops(experts, num_experts, capacity_factor)
    sorted_pair_ids, tile_expert, num_padded = align_to_tiles(experts, num_experts, block_m)
    sentinel = experts.numel()
    real = sorted_pair_ids != sentinel
    assert not real[int(num_padded):].any()
    slot_expert = tile_expert.repeat_interleave(block_m)
    placed = sorted(zip(sorted_pair_ids[real].tolist(), slot_expert[real].tolist()))
    flat = experts.reshape(-1)
    expected = [(pair, int(flat[pair])) for pair in range(sentinel) if keep.reshape(-1)[pair]]
    assert placed == expected


@settings(max_examples=200, deadline=None)
@given(routings(), st.sampled_from([1, 2, 4, 16]))
def test_tiles_follow_expert_segments_padded_at_their_ends(routing, block_m):
    experts, num_experts = routing
    sorted_pair_ids, tile_expert, num_padded = align_to_tiles(experts, num_experts, block_m)
    tokens_per_expert = torch.bincount(experts.reshape(-1), minlength=num_experts)
    tiles_per_expert = (tokens_per_expert + block_m - 1) // block_m
    used = int(num_padded) // block_m
    length = max_padded_pairs(experts.numel(), num_experts, block_m)
    assert len(sorted_pair_ids) == length == len(tile_expert) * block_m
    assert used == int(tiles_per_expert.sum())
    assert torch.equal(tile_expert[:used], torch.arange(num_experts).repeat_interleave(tiles_per_expert))
    assert (tile_expert[used:] == -1).all()  # empty experts and the spare tail get no tile
    segments = sorted_pair_ids[: used * block_m].split((tiles_per_expert * block_m).tolist())
    for segment, count in zip(segments, tokens_per_expert.tolist()):
        assert (segment[count:] == experts.numel()).all()  # padding only after the segment's pairs
        assert (segment[:count].diff() > 0).all()  # stable: token order inside an expert


@settings(max_examples=100, deadline=None)
@given(routings())
def test_sort_by_expert_is_a_stable_sort_with_counts(routing):
    experts, num_experts = routing
    order, tokens_per_expert = sort_by_expert(experts, num_experts)
    flat = experts.reshape(-1)
    assert torch.equal(order.sort().values, torch.arange(flat.numel()))
    assert torch.equal(flat[order], flat.sort(stable=True).values)
    assert torch.equal(order, flat.sort(stable=True).indices)
    assert torch.equal(tokens_per_expert, torch.bincount(flat, minlength=num_experts))


@settings(max_examples=100, deadline=None)
@given(routings(), st.sampled_from([0.25, 0.5, 1.0, 1.5]))
def test_capacity_keeps_each_experts_first_pairs_in_token_order(routing, capacity_factor):
    experts, num_experts = routing
    keep, dropped = capacity_mask(experts, num_experts, capacity_factor)
    limit = math.ceil(capacity_factor * experts.numel() / num_experts)
    for e in range(num_experts):
        hits = (experts == e).reshape(-1).nonzero().flatten()
        kept = keep.reshape(-1)[hits]
        assert kept.tolist() == [i < limit for i in range(len(hits))]
    over = (torch.bincount(experts.reshape(-1), minlength=num_experts) - limit).clamp(min=0)
    assert int(dropped) == int((~keep).sum()) == int(over.sum())


def test_dropped_pairs_sort_last_and_count_for_no_expert():
    experts = torch.tensor([[0, 1], [0, 1], [0, 2]])
    dropped_marked, _ = with_drops(experts, 3, 0.5)  # capacity ceil(0.5 * 6 / 3) = 1
    assert dropped_marked.tolist() == [[0, 1], [3, 3], [3, 2]]
    order, tokens_per_expert = sort_by_expert(dropped_marked, 3)
    assert tokens_per_expert.tolist() == [1, 1, 1] and order[3:].tolist() == [2, 3, 4]


def test_align_small_case_by_hand():
    experts = torch.tensor([[0, 2], [2, 1], [2, 0], [3, 2]])
    sorted_pair_ids, tile_expert, num_padded = align_to_tiles(experts, 5, 2)
    assert sorted_pair_ids.tolist() == [0, 5, 3, 8, 1, 2, 4, 7, 6, 8, 8, 8, 8, 8]
    assert tile_expert.tolist() == [0, 1, 2, 2, 3, -1, -1] and int(num_padded) == 10


def test_no_tokens():
    sorted_pair_ids, tile_expert, num_padded = align_to_tiles(torch.empty(0, 2, dtype=torch.int64), 4, 16)
    assert sorted_pair_ids.numel() == tile_expert.numel() == int(num_padded) == 0


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_normalizes_the_top_k_weights(scoring):
    logits = torch.randn(7, 6)
    weights, experts = route(logits, 3, True, scoring)
    torch.testing.assert_close(weights.sum(-1), torch.ones(7))
    assert weights.dtype == torch.float32 and (experts.sort(-1).values.diff(dim=-1) > 0).all()


def test_top_k_then_softmax_equals_softmax_then_normalized_top_k():
    logits = torch.randn(9, 8, dtype=torch.bfloat16)
    weights, experts = route(logits, 2, True, "softmax")
    top_logits, top_experts = logits.float().topk(2, -1)
    torch.testing.assert_close(weights, top_logits.softmax(-1))
    assert torch.equal(experts, top_experts)


def test_route_within_capacity_reports_drops():
    logits = torch.zeros(8, 4)
    logits[:, 0] = 5.0  # every token prefers expert 0
    _, experts, dropped = route_within_capacity(logits, 1, False, "softmax", 1.0)
    assert capacity(8, 4, 1.0) == 2 and int(dropped) == 6
    assert experts.flatten().tolist() == [0, 0] + [4] * 6
    assert int(route_within_capacity(logits, 1, False, "softmax", 0.0)[2]) == 0
