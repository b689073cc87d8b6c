"""sparsecc::block_attention on CPU: the reference vs torch attention, the CPU kernel vs the reference."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsecc.runtime.attention_layout import (block_states, causal_layout, intersect, layout_from_mask,
                                               topk_layout, window_layout)
from sparsecc.runtime.kernels.cpu.block_attention import block_attention_cpu, plan_runs
from sparsecc.runtime.ops.block_attention import BLOCK_ATTENTION, block_attention_reference, verify_block_attention

op = torch.ops.sparsecc.block_attention.default


def qkv(batch=1, heads=2, kv_heads=2, seq=48, keys=48, dim=16, dtype=torch.float32):
    return (torch.randn(batch, heads, seq, dim, dtype=dtype), torch.randn(batch, kv_heads, keys, dim, dtype=dtype),
            torch.randn(batch, kv_heads, keys, dim, dtype=dtype))


def assert_matches_reference(q, k, v, layout, mask, block_q=16, block_k=16, threshold=0.0, empty_rows="zero",
                             tol=1e-5):
    args = (q, k, v, *layout, mask, q.shape[-1] ** -0.5, block_q, block_k, threshold, empty_rows)
    got, want = op(*args), block_attention_reference(*args)
    assert got.shape == want.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, equal_nan=True)
    return got


def causal_mask(seq, keys):
    return torch.arange(keys)[None, :] <= torch.arange(seq)[:, None] + keys - seq


def test_reference_is_causal_and_masked_sdpa():
    q, k, v = qkv(seq=40, keys=40)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = block_attention_reference(q, k, v, *causal_layout(40, 40, 16, 16), None, 0.25, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mask = (torch.rand(1, 2, 40, 40) > 0.5) | torch.eye(40, dtype=torch.bool)
    got = block_attention_reference(q, k, v, *layout_from_mask(mask, 16, 16), mask, 0.25, 16, 16)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_empty_rows_modes_are_what_torch_attention_gives(backend):
    """torch 2.13 CPU: SDPA with an all-False bool row gives 0 (math and flash); eager softmax with a
    finfo.min additive mask gives the mean of v over all keys; with -inf it gives NaN."""
    q, k, v = qkv(seq=32, keys=32)
    mask = torch.rand(1, 1, 32, 32) > 0.5
    mask[..., 5, :] = False
    layout = layout_from_mask(mask, 16, 16)
    with sdpa_kernel(backend):
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    logits = q @ k.transpose(-1, -2) * 0.25
    for empty_rows, additive in [("zero", None), ("uniform", torch.finfo(torch.float32).min), ("nan", float("-inf"))]:
        want = sdpa if additive is None else torch.softmax(logits.masked_fill(~mask, additive), -1) @ v
        got = block_attention_reference(q, k, v, *layout, mask, 0.25, 16, 16, 0.0, empty_rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("seq,keys,block_q,block_k", [(64, 64, 16, 16), (50, 70, 16, 32), (70, 70, 32, 16),
                                                      (1, 45, 16, 16), (5, 45, 16, 16), (40, 30, 16, 16)])
def test_causal_without_mask(seq, keys, block_q, block_k):
    q, k, v = qkv(seq=seq, keys=keys)
    got = assert_matches_reference(q, k, v, causal_layout(seq, keys, block_q, block_k), None, block_q, block_k)
    if seq == keys:
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq,window,sinks", [(160, 32, 4), (150, 40, 0), (96, 200, 2)])
def test_window_and_sinks(seq, window, sinks):
    q, k, v = qkv(seq=seq, keys=seq)
    assert_matches_reference(q, k, v, window_layout(seq, seq, window, sinks, 16, 16), None)


def test_causal_mask_takes_the_diagonal_fast_path_and_a_changed_diagonal_does_not():
    q, k, v = qkv(seq=96, keys=96)
    mask = causal_mask(96, 96)[None, None].clone()
    assert_matches_reference(q, k, v, layout_from_mask(mask, 16, 16), mask)
    mask[..., 40, 33] = False  # inside the diagonal block of query block 2: no longer the exact triangle
    assert_matches_reference(q, k, v, layout_from_mask(mask, 16, 16), mask)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform", "nan"])
def test_random_masks_with_fully_masked_rows(empty_rows):
    q, k, v = qkv(batch=2, seq=40, keys=56)
    mask = torch.rand(2, 2, 40, 56) > 0.7
    mask[0, 1, 16:32] = False  # a whole query block sees nothing
    mask[1, :, 3] = False
    got = assert_matches_reference(q, k, v, layout_from_mask(mask, 16, 16), mask, empty_rows=empty_rows)
    assert torch.isnan(got).any() == (empty_rows == "nan")


def test_padding_mask_per_batch_broadcast_over_heads():
    q, k, v = qkv(batch=3, heads=4, kv_heads=4, seq=37, keys=37)
    lengths = torch.tensor([37, 20, 5])
    mask = (torch.arange(37)[None, :] < lengths[:, None])[:, None, None, :] & causal_mask(37, 37)
    assert_matches_reference(q, k, v, layout_from_mask(mask, 16, 16), mask, empty_rows="uniform")


def test_gqa_with_a_per_head_layout_and_a_shared_mask():
    q, k, v = qkv(batch=2, heads=4, kv_heads=2, seq=80, keys=80)
    mask = causal_mask(80, 80)[None, None]
    layout = intersect(topk_layout(q, k, 2, 16, 16), layout_from_mask(mask, 16, 16))
    assert layout.full_indices.shape[:2] == (2, 4)
    assert_matches_reference(q, k, v, layout, mask)
    assert_matches_reference(q, k, v, causal_layout(80, 80, 16, 16), None)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_a_shared_layout_with_a_per_head_mask(heads, kv_heads):
    q, k, v = qkv(batch=2, heads=heads, kv_heads=kv_heads, seq=64, keys=64)
    mask = torch.rand(2, heads, 64, 64) > 0.3
    assert_matches_reference(q, k, v, causal_layout(64, 64, 16, 16), mask, empty_rows="uniform")


def test_decode_step_with_a_cache_and_bf16():
    q, k, v = qkv(heads=4, kv_heads=2, seq=1, keys=77, dtype=torch.bfloat16)
    assert_matches_reference(q, k, v, causal_layout(1, 77, 16, 16), None, tol=2e-2)
    q, k, v = qkv(seq=64, keys=64, dtype=torch.bfloat16)
    assert_matches_reference(q, k, v, window_layout(64, 64, 20, 2, 16, 16), None, tol=2e-2)


def test_query_in_the_heads_then_sequence_layout():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(seq=50, keys=50))
    assert not q.is_contiguous()
    assert_matches_reference(q, k, v, causal_layout(50, 50, 16, 16), None)


def test_threshold_skips_blocks_far_below_the_running_maximum():
    q, k, v = qkv(heads=1, kv_heads=1, seq=64, keys=64)
    q[..., 0], k[..., 0] = 4.0, 0.0
    k[:, :, :16, 0] = 4.0        # the first key block dominates every row; later blocks lie far below
    layout = causal_layout(64, 64, 16, 16)
    exact = assert_matches_reference(q, k, v, layout, None)
    tiny = assert_matches_reference(q, k, v, layout, None, threshold=1e-30)
    torch.testing.assert_close(tiny, exact, rtol=1e-5, atol=1e-5)
    skipped = assert_matches_reference(q, k, v, layout, None, threshold=0.1)
    error = ((skipped - exact).norm() / exact.norm()).item()
    assert 0 < error < 0.1, error  # lossy: each skipped block's logits lay > log(10) below the row maximum


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 11), max_size=12, unique=True), min_size=1, max_size=12),
       st.sampled_from([1, 2, 4]))
def test_plan_covers_every_full_block_once(rows, chunk):
    counts, indices = [len(r) for r in rows], [sorted(r) + [b for b in range(12) if b not in r] for r in rows]
    covered = []
    for run in plan_runs(counts, indices, chunk):
        for i in range(run.count):
            start = run.start + i * run.key_step
            covered += [(run.first + i * run.q_step, kb) for kb in range(start, start + run.length)]
    assert sorted(covered) == sorted((qb, kb) for qb, r in enumerate(rows) for kb in r)


def test_plan_turns_the_causal_staircase_into_few_calls():
    layout = [t.tolist() for t in causal_layout(2048, 2048, 128, 128)]
    assert len(plan_runs(layout[2][0][0], layout[3][0][0], 8)) <= 9
    window = [t.tolist() for t in window_layout(4096, 4096, 1024, 4, 128, 128)]
    assert len(plan_runs(window[2][0][0], window[3][0][0], 8)) <= 12


def test_verifier_accepts_samples_and_names_problems():
    for args in BLOCK_ATTENTION.samples():
        assert verify_block_attention(*args) is None
    q, k, v = qkv(heads=3, kv_heads=2)
    layout = causal_layout(48, 48, 16, 16)
    assert "multiple" in verify_block_attention(q, k, v, *layout, None, 0.25, 16, 16)
    q, k, v = qkv()
    assert "NQ=3" in verify_block_attention(q, k, v, *causal_layout(30, 48, 16, 16), None, 0.25, 16, 16)
    assert "mask" in verify_block_attention(q, k, v, *layout, torch.ones(48, 48), 0.25, 16, 16)
    assert "threshold" in verify_block_attention(q, k, v, *layout, None, 0.25, 16, 16, 1.5)
    assert "empty_rows" in verify_block_attention(q, k, v, *layout, None, 0.25, 16, 16, 0.0, "mean")


def test_cpu_kernel_is_the_op_on_cpu():
    q, k, v = qkv()
    args = (q, k, v, *window_layout(48, 48, 16, 1, 16, 16), None, 0.25, 16, 16)
    assert torch.equal(op(*args), block_attention_cpu(*args))
    assert sum(block_states(causal_layout(48, 48, 16, 16))).sum() == 6


@pytest.mark.parametrize("gather_runs", [0, 10**6])
def test_scattered_full_blocks_run_as_runs_or_gathered(monkeypatch, gather_runs):
    import sparsecc.runtime.kernels.cpu.block_attention as cpu_kernel
    monkeypatch.setattr(cpu_kernel, "GATHER_RUNS", gather_runs)
    q, k, v = qkv(heads=4, kv_heads=2, seq=112, keys=112)
    assert_matches_reference(q, k, v, topk_layout(q, k, 0.3, 16, 16), None)
    mask = torch.rand(1, 1, 112, 112) > 0.2
    assert_matches_reference(q, k, v, layout_from_mask(mask, 16, 16), mask, empty_rows="nan")


@pytest.mark.parametrize("seq", [1, 5])
def test_decode_reads_keys_in_place_without_gathering(monkeypatch, seq):
    import sparsecc.runtime.kernels.cpu.block_attention as cpu_kernel
    from sparsecc.runtime.attention_policies import topk_layout_from_mask, window_layout_from_mask

    def no_gather(*args, **kwargs):
        raise AssertionError("decode must not gather key blocks")
    monkeypatch.setattr(cpu_kernel, "_gathered", no_gather)
    q, k, v = qkv(batch=2, heads=4, kv_heads=2, seq=seq, keys=150)
    mask = causal_mask(seq, 150)[None, None] & (torch.arange(150) >= torch.tensor([[0], [37]]))[:, None, None, :]
    mask[1, :, :, 60:64] = False
    for layout in (layout_from_mask(mask, 32, 32), window_layout_from_mask(mask, 40, 3, 32, 32),
                   topk_layout_from_mask(mask, q, k, 2, 0, 32, 32)):
        assert_matches_reference(q, k, v, layout, mask, 32, 32, empty_rows="nan")
    assert_matches_reference(q, k, v, causal_layout(seq, 150, 32, 32), None, 32, 32)
    assert_matches_reference(q, k, v, layout_from_mask(torch.zeros_like(mask), 32, 32), torch.zeros_like(mask),
                             32, 32, empty_rows="uniform")


@pytest.mark.parametrize("per_head_layout", [False, True])
def test_diagonal_triangle_check_is_per_batch_and_head_of_the_mask(per_head_layout):
    q, k, v = qkv(batch=2, heads=4, kv_heads=2, seq=64, keys=64)
    mask = causal_mask(64, 64)[None, None].repeat(2, 4, 1, 1)
    mask[1, 2, 20, 17] = False   # batch 1, head 2: query block 1's diagonal block is no longer the triangle
    mask[0, 0, 40, 40] = False   # batch 0, head 0: a diagonal element itself
    layout = topk_layout(q, k, 4, 16, 16) if per_head_layout else layout_from_mask(mask, 16, 16)
    layout = intersect(layout, layout_from_mask(mask, 16, 16))
    assert_matches_reference(q, k, v, layout, mask)


def test_decode_over_scattered_blocks_gathers_them_once(monkeypatch):
    import sparsecc.runtime.kernels.cpu.block_attention as cpu_kernel
    calls = []
    gathered = cpu_kernel._gathered
    monkeypatch.setattr(cpu_kernel, "_gathered", lambda *a, **kw: calls.append(1) or gathered(*a, **kw))
    q, k, v = qkv(batch=2, heads=4, kv_heads=2, seq=1, keys=320)
    mask = torch.ones(2, 1, 1, 320, dtype=torch.bool)
    for block in range(1, 20, 2):        # every other key block of 16 hidden: 10 runs (Quest-like pages)
        mask[..., block * 16:(block + 1) * 16] = False
    mask[1, ..., 5:9] = False            # a partial block in one row
    assert_matches_reference(q, k, v, layout_from_mask(mask, 16, 16), mask, 16, 16)
    assert calls and cpu_kernel.SCATTERED_RUNS < 10
