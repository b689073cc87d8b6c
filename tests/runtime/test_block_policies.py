"""Lossy layout policies (attention_policies, sparsecc::block_layout policy=window|topk): they never widen the mask."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.runtime.attention_layout import block_states, diagonal_blocks, layout_from_mask, window_layout
from sparsecc.runtime.attention_policies import (topk_budget, topk_layout_from_mask, window_blocks,
                                                 window_layout_from_mask)
from sparsecc.runtime.ops.block_attention import visible_elements
from sparsecc.runtime.ops.block_layout import verify_block_layout

BLOCKS = st.sampled_from([16, 32])
FAST = settings(max_examples=25, deadline=None)


def causal_mask(seq, keys):
    return torch.arange(keys)[None, :] <= torch.arange(seq)[:, None] + keys - seq


@st.composite
def masks(draw):
    """Random [Bm, Hm, S, Skv] masks, often causal, sometimes broadcast over batch and heads."""
    seq = draw(st.integers(1, 70))
    shape = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), seq, seq + draw(st.integers(0, 20)))
    density = draw(st.sampled_from([0.1, 0.6, 1.0]))
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) < density
    if draw(st.booleans()):
        mask = mask & causal_mask(*shape[2:])
    return mask[:1].expand(shape) if draw(st.booleans()) else mask


def assert_never_widens(layout, mask, block):
    seq, keys = mask.shape[-2:]
    visible = visible_elements(layout, mask, seq, keys, block, block)
    assert not (visible & ~mask).any()
    full, _ = block_states(layout)
    mask_full, _ = block_states(layout_from_mask(mask, block, block))
    assert not (full & ~mask_full).any()  # full (no per-element mask) only where the mask's block is full


@FAST
@given(masks(), st.integers(1, 50), st.integers(0, 20), BLOCKS)
def test_window_keeps_the_mask_blocks_the_window_reaches(mask, window, sinks, block):
    seq, keys = mask.shape[-2:]
    full, partial = block_states(window_layout_from_mask(mask, window, sinks, block, block))
    mask_full, mask_partial = block_states(layout_from_mask(mask, block, block))
    reach = window_blocks(seq, keys, window, sinks, block, block)
    assert torch.equal(full, mask_full & reach) and torch.equal(partial, mask_partial & reach)
    assert_never_widens(window_layout_from_mask(mask, window, sinks, block, block), mask, block)


@FAST
@given(st.integers(1, 90), st.integers(0, 20), st.integers(1, 40), st.integers(0, 5), BLOCKS)
def test_window_over_the_causal_mask_is_the_mask_free_window_layout(seq, extra_keys, window, sinks, block):
    mask = causal_mask(seq, seq + extra_keys)[None, None]
    got = window_layout_from_mask(mask, window, sinks, block, block)
    want = window_layout(seq, seq + extra_keys, window, sinks, block, block)
    assert all(torch.equal(a, b) for a, b in zip(block_states(got), block_states(want)))


@FAST
@given(masks(), st.sampled_from([0.1, 0.5, 1, 3]), st.integers(0, 40), BLOCKS, st.booleans())
def test_topk_keeps_its_budget_of_the_mask_blocks_and_the_forced_ones(mask, topk, sinks, block, gqa):
    batch, seq, keys = mask.shape[0], *mask.shape[-2:]
    q, k = torch.randn(batch, 2, seq, 8), torch.randn(batch, 1 if gqa else 2, keys, 8)
    layout = topk_layout_from_mask(mask, q, k, topk, sinks, block, block)
    assert_never_widens(layout, mask, block)
    kept = sum(block_states(layout)).bool()
    visible = sum(block_states(layout_from_mask(mask, block, block))).bool().expand_as(kept)
    sink_blocks = torch.arange(kept.shape[-1]) * block < sinks
    forced = visible & (sink_blocks | diagonal_blocks(seq, keys, block, block, None))
    assert not (forced & ~kept).any()                                  # visible diagonal and sink blocks stay
    assert (kept.sum(-1) <= torch.maximum(topk_budget(topk, visible), forced.sum(-1))).all()
    assert (kept.sum(-1) >= torch.minimum(topk_budget(topk, visible), visible.sum(-1))).all()


def test_topk_picks_the_highest_pooled_scores_among_visible_blocks():
    q = torch.zeros(1, 1, 64, 16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 64, 16)
    k[:, :, 16:32, 0] = 5.0  # key block 1 scores highest for every query block that sees it
    mask = causal_mask(64, 64)[None, None]
    full, partial = block_states(topk_layout_from_mask(mask, q, k, 2, 0, 16, 16))
    kept = (full | partial)[0, 0]
    diagonal = torch.eye(4, dtype=torch.bool)
    # the diagonal counts toward the budget of 2; query block 1 has only block 0 left to add
    assert [row.nonzero().flatten().tolist() for row in kept] == [[0], [0, 1], [1, 2], [1, 3]]
    assert torch.equal(partial[0, 0], diagonal)  # diagonal blocks keep the mask's triangle
    budget = topk_budget(0.5, torch.ones(3, 10, dtype=torch.bool))
    assert budget.tolist() == [5, 5, 5]


def test_decode_row_sees_its_window_and_sinks():
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    mask[1, ..., :40] = False  # left padding
    full, partial = block_states(window_layout_from_mask(mask, 64, 4, 32, 32))
    assert not full.any()  # one query row in a 32-row block: every block is partial
    assert partial[0, 0, 0].nonzero().flatten().tolist() == [0, 7, 8, 9]  # the sink block, keys 236..299
    assert partial[1, 0, 0].nonzero().flatten().tolist() == [7, 8, 9]     # the sink lies in the padding


@pytest.mark.parametrize("args,reason", [
    (("window", 0, 4), "window=0 must be an integer >= 1"),
    (("window", 8, -1), "sinks=-1"),
    (("topk", 0, 0, 1.5), "topk=1.5 must be a fraction"),
    (("topk", 0, 0, 0.0), "topk=0.0"),
    (("topk", 0, 0, 0.5), "policy topk needs q and k"),
    (("sliding", 8, 0), "policy 'sliding' is not one of mask, window, topk"),
])
def test_verifier_names_bad_policy_arguments(args, reason):
    assert reason in verify_block_layout(torch.ones(1, 1, 8, 8, dtype=torch.bool), 16, 16, *args)


@pytest.mark.parametrize("seq,keys,window,sinks", [(256, 256, 70, 5), (192, 256, 64, 0), (256, 256, 31, 40)])
def test_window_band_read_as_words_matches_the_mask_layout(seq, keys, window, sinks):
    from sparsecc.runtime.attention_policies import uniform_band

    mask = causal_mask(seq, keys) & (torch.rand(2, 1, seq, keys) > 0.02)
    mask[1, ..., :50] = False
    band = window_blocks(seq, keys, window, 0, 32, 32)
    assert uniform_band(mask, band, 32, 32) is not None  # the strided fast path serves most query blocks
    full, partial = block_states(window_layout_from_mask(mask, window, sinks, 32, 32))
    mask_full, mask_partial = block_states(layout_from_mask(mask, 32, 32))
    reach = window_blocks(seq, keys, window, sinks, 32, 32)
    assert torch.equal(full, mask_full & reach) and torch.equal(partial, mask_partial & reach)
