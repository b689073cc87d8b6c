"""Block layouts (attention_layout) and sparsecc::block_layout: property tests against explicit masks."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsecc.runtime.attention_layout import (Layout, block_states, causal_layout, density, intersect,
                                               layout_from_mask, pad_to_blocks, topk_layout, window_layout)
from sparsecc.runtime.ops.block_layout import BLOCK_LAYOUT, verify_block_layout

BLOCKS = st.sampled_from([16, 32])
FAST = settings(max_examples=30, deadline=None)


def causal_mask(seq, keys):
    return torch.arange(keys)[None, :] <= torch.arange(seq)[:, None] + keys - seq


def element_blocks(blocks, block_q, block_k, seq, keys):
    """[.., NQ, NK] block states expanded to [.., S, Skv] elements."""
    return blocks.repeat_interleave(block_q, -2).repeat_interleave(block_k, -1)[..., :seq, :keys]


def assert_same_layout(a: Layout, b: Layout):
    for x, y in zip(block_states(a), block_states(b)):
        assert torch.equal(x, y)


@st.composite
def masks(draw):
    shape = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3])),
             draw(st.integers(1, 70)), draw(st.integers(1, 70)))
    density = draw(st.sampled_from([0.0, 0.1, 0.6, 0.97, 1.0]))
    seed = draw(st.integers(0, 2**16))
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density
    return mask | causal_mask(*shape[2:]) if draw(st.booleans()) else mask


@FAST
@given(masks(), BLOCKS, BLOCKS)
def test_layout_from_mask_holds_the_block_structure(mask, block_q, block_k):
    layout = layout_from_mask(mask, block_q, block_k)
    full, partial = block_states(layout)
    seq, keys = mask.shape[-2:]
    blocks = pad_to_blocks(mask, block_q, block_k).unflatten(-1, (-1, block_k)).unflatten(-3, (-1, block_q))
    assert torch.equal(full, blocks.all(-1).all(-2))                   # full: every element visible
    assert torch.equal(full | partial, blocks.any(-1).any(-2))         # absent: nothing visible
    assert not (full & partial).any()
    covered = element_blocks(full | partial, block_q, block_k, seq, keys)
    assert not (mask & ~covered).any()                                 # every visible element covered
    for count, indices in ((layout.full_num_blocks, layout.full_indices), (layout.kv_num_blocks, layout.kv_indices)):
        assert count.dtype == indices.dtype == torch.int32
        for n, row in zip(count.flatten().tolist(), indices.flatten(0, -2).tolist()):
            assert row[:n] == sorted(row[:n]) and sorted(row) == list(range(len(row)))


@FAST
@given(st.integers(1, 80), st.integers(0, 40), BLOCKS, BLOCKS)
def test_causal_layout_is_the_layout_of_the_causal_mask(seq, extra_keys, block_q, block_k):
    keys = seq + extra_keys
    expected = layout_from_mask(causal_mask(seq, keys)[None, None], block_q, block_k)
    got = causal_layout(seq, keys, block_q, block_k)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@FAST
@given(st.integers(1, 90), st.integers(0, 20), st.integers(1, 40), st.integers(0, 5), BLOCKS, BLOCKS)
def test_window_layout_keeps_blocks_of_the_window_whole(seq, extra_keys, window, sinks, block_q, block_k):
    keys = seq + extra_keys
    rows, cols = torch.arange(seq)[:, None] + keys - seq, torch.arange(keys)[None, :]
    exact = (cols <= rows) & ((cols > rows - window) | (cols < sinks))
    kept = sum(block_states(layout_from_mask(exact, block_q, block_k)))[0, 0].bool()
    granular = causal_mask(seq, keys) & element_blocks(kept, block_q, block_k, seq, keys)
    got = window_layout(seq, keys, window, sinks, block_q, block_k)
    assert all(torch.equal(a, b) for a, b in zip(got, layout_from_mask(granular[None, None], block_q, block_k)))


@FAST
@given(masks(), st.integers(0, 2**16), st.booleans(), BLOCKS)
def test_intersect_keeps_blocks_kept_by_both_and_full_only_where_both_full(mask_a, seed, shared, block):
    shape = (1, 1, *mask_a.shape[2:]) if shared else mask_a.shape
    mask_b = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.7
    a, b = layout_from_mask(mask_a, block, block), layout_from_mask(mask_b, block, block)
    full_a, partial_a = block_states(a)
    full_b, partial_b = block_states(b)
    full, partial = block_states(intersect(a, b))
    assert torch.equal(full, full_a & full_b)
    assert torch.equal(full | partial, (full_a | partial_a) & (full_b | partial_b))


def test_topk_layout_keeps_the_budget_the_diagonal_and_the_first_block():
    q, k = torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16)
    layout = topk_layout(q, k, 3, 16, 16)
    full, partial = block_states(layout)
    kept = full | partial
    assert kept.shape == (1, 4, 13, 13)
    assert kept[..., 0].all() and kept.diagonal(dim1=-2, dim2=-1).all()
    assert not (kept & ~sum(block_states(causal_layout(200, 200, 16, 16))).bool()).any()
    assert (kept.sum(-1) <= 3).all() and (kept.sum(-1)[..., 3:] == 3).all()
    assert_same_layout(intersect(layout, causal_layout(200, 200, 16, 16)), layout)


def test_topk_layout_picks_the_highest_pooled_scores_without_causality():
    q = torch.zeros(1, 1, 64, 16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 64, 16)
    k[:, :, 32:48, 0] = 5.0  # key block 2 scores highest for every query block
    full, partial = block_states(topk_layout(q, k, 0.25, 16, 16, keep_diagonal=False, sinks_blocks=0,
                                             causal=False))
    assert not partial.any() and full[..., 2].all() and (full.sum(-1) == 1).all()


def test_density_counts_kept_over_all_blocks():
    assert density(causal_layout(64, 64, 16, 16)) == pytest.approx(10 / 16)
    assert density(layout_from_mask(torch.zeros(2, 1, 8, 40, dtype=torch.bool), 16, 16)) == 0.0


def test_broadcast_mask_reduces_once_and_keeps_its_shape():
    mask = (torch.rand(1, 1, 40, 48) > 0.5).expand(3, 2, 40, 48)
    layout = layout_from_mask(mask, 16, 16)
    assert layout.full_indices.shape == (3, 2, 3, 3)
    assert all(torch.equal(a, b) for a, b in zip(layout, layout_from_mask(mask.contiguous(), 16, 16)))


def test_block_layout_op_matches_layout_from_mask_and_its_fake_shapes():
    mask = torch.rand(2, 1, 33, 50) > 0.4
    got = torch.ops.sparsecc.block_layout(mask, 16, 32)
    assert all(torch.equal(a, b) for a, b in zip(got, layout_from_mask(mask, 16, 32)))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.sparsecc.block_layout(mode.from_tensor(mask), 16, 32)
    assert [tuple(f.shape) for f in fake] == [tuple(g.shape) for g in got]
    assert all(f.dtype == torch.int32 for f in fake)
    for args in BLOCK_LAYOUT.samples():
        assert verify_block_layout(*args) is None


def test_block_layout_verifier_reasons():
    assert "bool" in verify_block_layout(torch.zeros(1, 1, 4, 4), 16, 16)
    assert "power of two" in verify_block_layout(torch.ones(4, 4, dtype=torch.bool), 24, 16)
    assert math.ceil(5 / 16) == layout_from_mask(torch.ones(5, 5, dtype=torch.bool), 16, 16).full_num_blocks.shape[-1]
