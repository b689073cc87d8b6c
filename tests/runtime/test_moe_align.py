"""The Triton align-and-sort gives the tile layout of the torch version, up to order inside a segment."""
import pytest
import torch

from sparsecc.runtime.kernels.triton.moe_align import align_to_tiles_triton
from sparsecc.runtime.moe_routing import align_to_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU


@pytest.mark.parametrize("tokens,num_experts,top_k,block_m", [(1, 8, 2, 16), (37, 8, 2, 16), (64, 128, 1, 16),
                                                               (300, 6, 3, 32), (5, 4, 2, 64)])
def test_same_layout_as_the_torch_version(tokens, num_experts, top_k, block_m):
    torch.manual_seed(tokens)
    experts = torch.rand(tokens, num_experts).topk(top_k, dim=-1).indices.to(DEVICE)
    experts[0, 0] = num_experts  # a pair dropped by the capacity limit: no slot, no tile
    want_ids, want_tiles, want_padded = align_to_tiles(experts, num_experts, block_m)
    got_ids, got_tiles, got_padded = (t.cpu() for t in align_to_tiles_triton(experts, num_experts, block_m))
    want_ids, want_tiles, want_padded = (t.cpu() for t in (want_ids, want_tiles, want_padded))
    assert int(got_padded) == int(want_padded)
    assert torch.equal(got_tiles, want_tiles)
    assert got_ids.shape == want_ids.shape and got_ids.dtype == want_ids.dtype
    for expert in range(num_experts):  # each expert's tiles hold the same pairs, in any order
        rows = (want_tiles == expert).repeat_interleave(block_m)
        assert sorted(got_ids[rows].tolist()) == sorted(want_ids[rows].tolist())


def test_no_pairs_kept():
    experts = torch.full((3, 2), 4, device=DEVICE)  # every pair dropped
    ids, tiles, padded = (t.cpu() for t in align_to_tiles_triton(experts, 4, 16))
    assert int(padded) == 0 and bool((ids == 6).all())
    assert bool((tiles == -1).all())
