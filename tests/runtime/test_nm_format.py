"""N:M compressed storage: round trips, the pinned bit layout, masks and errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.runtime.nm_format import (check_nm, compress_nm, decompress_nm, nm_compressed_bytes,
                                        nm_index_bytes, nm_mask, pack_positions, unpack_positions)

PATTERNS = [(n, m) for m in (4, 8, 16) for n in range(1, m)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def sparse_weights(draw):
    """An N:M sparse weight [*lead, K] in which some groups keep fewer than N elements."""
    n, m = draw(st.sampled_from(PATTERNS))
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    groups = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    dense = torch.randn(*lead, groups * m, generator=gen)
    thinned = torch.rand(dense.shape, generator=gen) < draw(st.sampled_from([0.3, 0.8, 1.0]))
    mask = nm_mask(dense.abs(), n, m) & thinned
    return (dense * mask).to(draw(st.sampled_from(DTYPES))), n, m


@settings(max_examples=150, deadline=None)
@given(sparse_weights())
def test_round_trip_is_exact(case):
    weight, n, m = case
    values, indices = compress_nm(weight, n, m)
    k = weight.shape[-1]
    assert values.shape == (*weight.shape[:-1], k * n // m) and values.dtype == weight.dtype
    assert indices.shape == (*weight.shape[:-1], nm_index_bytes(k, n, m)) and indices.dtype == torch.uint8
    assert torch.equal(decompress_nm(values, indices, n, m, k), weight)


@settings(max_examples=100, deadline=None)
@given(sparse_weights())
def test_stored_positions_are_distinct_ascending_and_canonical(case):
    weight, n, m = case
    values, indices = compress_nm(weight, n, m)
    positions = unpack_positions(indices, values.shape[-1], m)
    per_group = positions.reshape(*positions.shape[:-1], -1, n)
    assert bool((per_group.diff(dim=-1) > 0).all()) and int(positions.max()) < m
    assert torch.equal(pack_positions(positions, m), indices)  # tail bits are zero


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31))
def test_nm_mask_keeps_the_top_n_of_every_group(pattern, rows, groups, seed):
    n, m = pattern
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(scores, n, m).reshape(rows, groups, m)
    assert bool((keep.sum(-1) == n).all())
    grouped = scores.reshape(rows, groups, m)
    kept_min = grouped.masked_fill(~keep, float("inf")).amin(-1)
    dropped_max = grouped.masked_fill(keep, float("-inf")).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_nm_mask_breaks_ties_by_lower_position():
    keep = nm_mask(torch.ones(2, 8), 2, 4)
    assert keep.tolist() == [[True, True, False, False] * 2] * 2


def test_mask_argument_selects_the_kept_elements():
    weight = torch.randn(3, 16)
    mask = nm_mask(weight.abs(), 2, 4)
    values, indices = compress_nm(weight, 2, 4, mask=mask)
    assert torch.equal(decompress_nm(values, indices, 2, 4, 16), weight * mask)


def test_bit_layout_2_4():
    a, b = 1.5, -2.0
    values, indices = compress_nm(torch.tensor([[0.0, a, 0.0, b]]), 2, 4)
    assert values.tolist() == [[a, b]]
    assert indices.tolist() == [[0b1101]]  # positions 1 (bits 0-1) and 3 (bits 2-3)


def test_bit_layout_3_bit_positions_cross_bytes():
    # 2:8, positions 1, 6 | 2, 7 -> stream 1 | 6<<3 | 2<<6 | 7<<9 = 0x0EB1; position 2 spans bits 6-8.
    weight = torch.zeros(1, 16)
    weight[0, [1, 6, 8 + 2, 8 + 7]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    values, indices = compress_nm(weight, 2, 8)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert indices.tolist() == [[0xB1, 0x0E]]


def test_short_group_is_padded_with_zeros_at_unused_positions():
    values, indices = compress_nm(torch.tensor([[0.0, 0.0, 7.0, 0.0]]), 2, 4)
    assert values.tolist() == [[0.0, 7.0]] and indices.tolist() == [[0b1000]]  # positions 0, 2


@pytest.mark.parametrize("k,n,m,expected", [(4096, 2, 4, 512), (16, 2, 8, 2), (8, 1, 4, 1), (32, 8, 16, 8)])
def test_index_bytes(k, n, m, expected):
    assert nm_index_bytes(k, n, m) == expected


def test_fp16_2_4_stores_at_most_0_5625_of_dense():
    assert nm_compressed_bytes(4096, 4096, 2, 4, torch.float16) == 4096 * 4096 * 2 * 0.5625


@pytest.mark.parametrize("n,m", [(3, 2), (0, 4), (2, 3), (4, 4), (1, 32)])
def test_invalid_pattern_names_it(n, m):
    with pytest.raises(ValueError, match=f"{n}:{m}"):
        check_nm(n, m)
    with pytest.raises(ValueError, match=f"{n}:{m}"):
        compress_nm(torch.zeros(2, 16), n, m)


def test_k_not_divisible_by_m_names_k_and_m():
    with pytest.raises(ValueError, match="K=10, M=4"):
        compress_nm(torch.zeros(2, 10), 2, 4)
    with pytest.raises(ValueError, match="K=10, M=4"):
        nm_mask(torch.zeros(2, 10), 2, 4)


def test_dense_weight_without_mask_is_rejected():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress_nm(torch.ones(2, 8), 2, 4)
    with pytest.raises(ValueError, match="mask keeps more than 2"):
        compress_nm(torch.ones(2, 8), 2, 4, mask=torch.ones(2, 8, dtype=torch.bool))
