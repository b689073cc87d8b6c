"""The Triton block-attention kernel vs the op's reference: interpreter on CPU (small tiles), CUDA at real sizes."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsecc.runtime.attention_layout import (block_states, causal_layout, intersect, layout_from_blocks,
                                               layout_from_mask, topk_layout, window_layout)
from sparsecc.runtime.attention_rule import rule_block_states, rule_mask, stack_rule
from sparsecc.runtime.ops.block_attention import block_attention_reference

triton_attention = pytest.importorskip("sparsecc.runtime.kernels.triton.block_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def qkv(batch=1, heads=2, kv_heads=2, seq=48, keys=48, dim=16, dtype=torch.float32):
    return (torch.randn(batch, heads, seq, dim, dtype=dtype), torch.randn(batch, kv_heads, keys, dim, dtype=dtype),
            torch.randn(batch, kv_heads, keys, dim, dtype=dtype))


def assert_kernel_matches(q, k, v, layout, mask=None, block_q=16, block_k=16, threshold=0.0, empty_rows="zero"):
    args = (q, k, v, *layout, mask, q.shape[-1] ** -0.5, block_q, block_k, threshold, empty_rows)
    on_device = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    got = triton_attention.block_attention_triton(*on_device)
    assert got.shape == q.shape[:3] + v.shape[3:] and got.dtype == q.dtype
    want = block_attention_reference(*args)
    tol = TOL[q.dtype]
    torch.testing.assert_close(got.float().cpu(), want.float(), rtol=tol, atol=tol, equal_nan=True)
    return got.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal(dtype):
    assert_kernel_matches(*qkv(dtype=dtype), causal_layout(48, 48, 16, 16))


def test_window_with_sinks_and_ragged_queries():
    assert_kernel_matches(*qkv(seq=61, keys=61), window_layout(61, 61, 20, 3, 16, 16))


@pytest.mark.parametrize("empty_rows", ["zero", "uniform", "nan"])
def test_random_mask_with_fully_masked_rows(empty_rows):
    q, k, v = qkv(seq=32, keys=40)
    mask = torch.rand(1, 2, 32, 40) > 0.6
    mask[0, 1, 16:] = False
    mask[0, 0, 3] = False
    assert_kernel_matches(q, k, v, layout_from_mask(mask, 16, 16), mask, empty_rows=empty_rows)


def test_padding_mask_per_batch():
    q, k, v = qkv(batch=2, seq=32, keys=32)
    lengths = torch.tensor([[32], [9]])
    mask = (torch.arange(32) < lengths)[:, None, None, :] & torch.ones(32, 32, dtype=torch.bool).tril()
    assert_kernel_matches(q, k, v, layout_from_mask(mask, 16, 16), mask, empty_rows="uniform")


def test_gqa_with_a_per_head_layout():
    q, k, v = qkv(heads=4, kv_heads=2, seq=64, keys=64)
    assert_kernel_matches(q, k, v, intersect(topk_layout(q, k, 2, 16, 16), causal_layout(64, 64, 16, 16)))


def test_shared_layout_per_head_mask_and_more_queries_than_keys():
    q, k, v = qkv(heads=4, kv_heads=2, seq=40, keys=32)
    mask = torch.rand(1, 4, 40, 32) > 0.3
    assert_kernel_matches(q, k, v, causal_layout(40, 32, 16, 16), mask, empty_rows="uniform")
    assert_kernel_matches(q, k, v, causal_layout(40, 32, 16, 16), None, empty_rows="nan")


def test_decode_step_and_wider_key_blocks():
    assert_kernel_matches(*qkv(heads=4, kv_heads=2, seq=1, keys=45), causal_layout(1, 45, 16, 32), block_k=32)


def test_threshold_skipping_matches_the_reference():
    q, k, v = qkv(heads=1, kv_heads=1, seq=48, keys=48)
    q[..., 0], k[..., 0] = 4.0, 0.0
    k[:, :, :16, 0] = 4.0
    layout = causal_layout(48, 48, 16, 16)
    exact = assert_kernel_matches(q, k, v, layout)
    skipped = assert_kernel_matches(q, k, v, layout, threshold=0.1)
    assert 0 < ((skipped - exact).norm() / exact.norm()).item() < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("block", [64, 128])
def test_real_sizes_on_cuda(dim, block):
    q, k, v = (t.cuda() for t in qkv(heads=8, kv_heads=2, seq=1000, keys=1000, dim=dim, dtype=torch.float16))
    got = triton_attention.block_attention_triton(q, k, v, *causal_layout(1000, 1000, block, block, "cuda"), None,
                                                  dim ** -0.5, block, block)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_mask_policy_and_decode_on_cuda():
    q, k, v = (t.cuda() for t in qkv(heads=8, kv_heads=8, seq=700, keys=700, dim=64, dtype=torch.float16))
    mask = torch.rand(1, 1, 700, 700, device="cuda") > 0.5
    mask[..., 10, :] = False
    args = (q, k, v, *torch.ops.sparsecc.block_layout(mask, 64, 64), mask, 0.125, 64, 64, 0.0, "nan")
    got = torch.ops.sparsecc.block_attention(*args)
    torch.testing.assert_close(got.cpu().float(), block_attention_reference(*[
        a.cpu() if isinstance(a, torch.Tensor) else a for a in args]).float(), rtol=2e-3, atol=2e-3, equal_nan=True)
    decode = (q[:, :, :1], k, v, *causal_layout(1, 700, 128, 128, "cuda"), None, 0.125, 128, 128)
    torch.testing.assert_close(triton_attention.block_attention_triton(*decode),
                               F.scaled_dot_product_attention(q[:, :, :1], k, v), rtol=2e-3, atol=2e-3)


def rule_layout(rows, cols, ops, block_q=16, block_k=16):
    """The layout a rule_layout op gives under the mask policy: from the rule's block states, no S x Skv mask."""
    any_visible, all_visible = rule_block_states(rows, cols, ops, block_q, block_k)
    return layout_from_blocks(all_visible, any_visible & ~all_visible)


def assert_rule_matches(q, k, v, rows, cols, ops, block_q=16, block_k=16, threshold=0.0, empty_rows="zero",
                        softcap=0.0, sinks=None):
    """The rule path equals the kernel's mask path on rule_mask (bit for bit) and the op's reference."""
    layout = rule_layout(rows, cols, ops, block_q, block_k)
    args = (q, k, v, *layout, None, q.shape[-1] ** -0.5, block_q, block_k, threshold, empty_rows, softcap, sinks)
    on_device = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    got = triton_attention.block_attention_triton(*on_device, rule_rows=rows.to(DEVICE), rule_cols=cols.to(DEVICE),
                                                  rule_ops=ops).cpu()
    mask = rule_mask(rows, cols, ops)
    with_mask = [*args[:7], mask, *args[8:]]
    masked = triton_attention.block_attention_triton(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a
                                                       for a in with_mask]).cpu()
    torch.testing.assert_close(got, masked, rtol=0, atol=0, equal_nan=True)
    tol = TOL[q.dtype]
    torch.testing.assert_close(got.float(), block_attention_reference(*with_mask).float(), rtol=tol, atol=tol,
                               equal_nan=True)
    return layout


def test_rule_causal_with_more_keys_than_queries():
    seq, keys = 40, 48
    rows, cols = stack_rule([torch.arange(seq)[:, None] + keys - seq], [torch.arange(keys)], seq, keys)
    layout = assert_rule_matches(*qkv(seq=seq, keys=keys), rows, cols, "ge")
    assert torch.equal(layout.full_num_blocks, causal_layout(seq, keys, 16, 16).full_num_blocks)


def test_rule_sliding_window_and_gqa():
    position = torch.arange(64)
    rows, cols = stack_rule([position[:, None], position[:, None] - 20], [position, position], 64, 64)
    assert_rule_matches(*qkv(heads=4, kv_heads=2, seq=64, keys=64), rows, cols, "ge,lt")


@pytest.mark.parametrize("empty_rows", ["zero", "uniform", "nan"])
def test_rule_left_padding_skips_the_padded_key_blocks(empty_rows):
    attention_mask = (torch.arange(48) >= torch.tensor([[0], [20]])).long()   # batch 1 starts 20 keys late
    position = torch.arange(48)
    rows, cols = stack_rule([position[:, None], torch.zeros(1, 1)], [position, attention_mask[:, None, None, :]],
                            48, 48)
    layout = assert_rule_matches(*qkv(batch=2, seq=48, keys=48), rows, cols, "ge,ne", empty_rows=empty_rows)
    full, partial = block_states(layout)
    assert not (full | partial)[1, 0, :, 0].any() and (full | partial)[0, 0, :, 0].all()


def test_rule_packed_documents_per_batch_with_a_shared_causal_term():
    doc = torch.tensor([[0] * 10 + [1] * 25 + [2] * 13, [0] * 30 + [1] * 18])
    position = torch.arange(48)
    rows, cols = stack_rule([position[:, None], doc[:, None, :, None]], [position, doc[:, None, None, :]], 48, 48)
    assert rows.shape == (2, 2, 48)
    assert_rule_matches(*qkv(batch=2, heads=4, kv_heads=1, seq=48, keys=48), rows, cols, "ge,eq")


def test_rule_decode_step_at_a_cache_position_with_padding():
    keys = 45
    attention_mask = (torch.arange(keys) >= torch.tensor([[0], [7]])).long()
    rows, cols = stack_rule([torch.tensor([[40]]), torch.zeros(1, 1)],
                            [torch.arange(keys), attention_mask[:, None, None, :]], 1, keys)
    assert_rule_matches(*qkv(batch=2, heads=4, kv_heads=2, seq=1, keys=keys), rows, cols, "ge,ne", block_k=32)


def test_rule_with_threshold_softcap_and_sinks():
    q, k, v = qkv(heads=2, kv_heads=1, seq=48, keys=48)
    q[..., 0], k[:, :, :16, 0] = 4.0, 4.0
    position = torch.arange(48)
    rows, cols = stack_rule([position[:, None] - 30, position[:, None]], [position, position], 48, 48)
    assert_rule_matches(q, k, v, rows, cols, "lt,ge", threshold=0.1)
    assert_rule_matches(q, k, v, rows, cols, "lt,ge", softcap=5.0, sinks=torch.randn(2))


def test_every_comparison_and_the_most_terms():
    torch.manual_seed(0)
    rows, cols = torch.randint(0, 4, (8, 1, 32)), torch.randint(0, 4, (8, 1, 32))
    rows[:, :, :16], cols[:, :, 16:] = 1, 2   # one block where every term holds, so some block is full
    for ops in ("lt,le,gt,ge,eq,ne", "ne,ne,ne,ne,ne,ne,ne,ne", "le,le,ge,ge,ne,lt,gt,ne"):
        terms = len(ops.split(","))
        assert_rule_matches(*qkv(seq=32, keys=32), rows[:terms], cols[:terms], ops, empty_rows="nan")


@pytest.mark.parametrize("bad, reason", [
    ({"mask": True}, "both given"), ({"rule_cols": None}, "together"), ({"rule_ops": "ge,zz"}, "must be 1 to 8"),
    ({"rule_rows": torch.zeros(1, 1, 48, dtype=torch.int32)}, "must be int64")])
def test_rule_refusals_name_the_op_and_reason(bad, reason):
    q, k, v = qkv()
    position = torch.arange(48)
    rows, cols = stack_rule([position[:, None]], [position], 48, 48)
    call = {"rule_rows": rows, "rule_cols": cols, "rule_ops": "ge", **bad}
    mask = torch.ones(48, 48, dtype=torch.bool) if call.pop("mask", False) else None
    with pytest.raises(Exception, match=f"block_attention.*{reason}"):
        triton_attention.block_attention_triton(q, k, v, *causal_layout(48, 48, 16, 16), mask, 0.25, 16, 16, **call)


@pytest.mark.gpu
def test_rule_causal_with_left_padding_on_cuda():
    q, k, v = (t.cuda() for t in qkv(batch=2, heads=8, kv_heads=2, seq=700, keys=700, dim=64, dtype=torch.float16))
    position = torch.arange(700, device="cuda")
    attention_mask = (position >= torch.tensor([[0], [90]], device="cuda")).long()
    rows, cols = stack_rule([position[:, None], torch.zeros(1, 1, device="cuda")],
                            [position, attention_mask[:, None, None, :]], 700, 700)
    got = triton_attention.block_attention_triton(q, k, v, *rule_layout(rows, cols, "ge,ne", 64, 64), None, 0.125,
                                                  64, 64, rule_rows=rows, rule_cols=cols, rule_ops="ge,ne")
    mask = rule_mask(rows, cols, "ge,ne")
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), mask, scale=0.125)
    # rows 0..89 of batch 1 see no key (SDPA's answer for them varies by backend)
    torch.testing.assert_close(got[:, :, 90:], want[:, :, 90:], rtol=2e-3, atol=2e-3)


# Cross-compiling runs in a fresh process without TRITON_INTERPRET (see test_nm_linear_triton.py).
AOT_SCRIPT = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparsecc.runtime.attention_layout import causal_layout
from sparsecc.runtime.attention_rule import stack_rule
from sparsecc.runtime.kernels.triton.block_attention import block_attention_kernel, block_attention_triton
from sparsecc.runtime.kernels.triton.launch import bind_launch, use_launcher
launches = []  # fp16 calls with 64x64 blocks (recorded, not run): masked and threshold-skipping; a padding rule
q = torch.zeros(2, 2, 128, 64, dtype=torch.float16)
rows, cols = stack_rule([torch.arange(128)[:, None], torch.zeros(1, 1)],
                        [torch.arange(128), torch.ones(2, 1, 1, 128, dtype=torch.long)], 128, 128)
with use_launcher(lambda kernel, grid, *args, **kwargs: launches.append(bind_launch(kernel, args, kwargs)[0])):
    block_attention_triton(q, q, q, *causal_layout(128, 128, 64, 64), torch.ones(128, 128, dtype=torch.bool),
                           0.125, 64, 64, threshold=1e-4)
    block_attention_triton(q, q, q, *causal_layout(128, 128, 64, 64), None, 0.125, 64, 64,
                           rule_rows=rows, rule_cols=cols, rule_ops="ge,ne")
built = []
for spec in launches:
    source = ASTSource(fn=block_attention_kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec.options)
    built.append([len(compiled.asm["cubin"]), compiled.metadata.name])
print(json.dumps(built))
"""


def test_compiled_kernel_builds_for_sm90_without_a_gpu():
    """The interpreter never runs the compiled path: masked threshold-skipping and rule fp16 kernels to cubins."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(built) == 2 and all(size > 0 and name == "block_attention_kernel" for size, name in built)


@pytest.mark.parametrize("seq", [1, 24])
def test_policy_layouts_from_a_padding_mask_and_decode(seq):
    from sparsecc.runtime.attention_policies import topk_layout_from_mask, window_layout_from_mask

    q, k, v = qkv(batch=2, heads=4, kv_heads=2, seq=seq, keys=48)
    mask = (torch.arange(48)[None, :] <= torch.arange(seq)[:, None] + 48 - seq) & \
        (torch.arange(48) >= torch.tensor([[0], [9]]))[:, None, None, :]
    assert_kernel_matches(q, k, v, window_layout_from_mask(mask, 20, 2, 16, 16), mask, empty_rows="nan")
    assert_kernel_matches(q, k, v, topk_layout_from_mask(mask, q, k, 2, 0, 16, 16), mask, empty_rows="nan")


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1, 700])
def test_policy_layouts_and_threshold_on_cuda(seq):
    """What the window / topk / threshold policies run on a GPU: the layout op on the device, then the kernel."""
    q, k, v = (t.cuda() for t in qkv(batch=2, heads=8, kv_heads=2, seq=seq, keys=700, dim=64, dtype=torch.float16))
    mask = (torch.arange(700, device="cuda")[None, :] <= torch.arange(seq, device="cuda")[:, None] + 700 - seq) & \
        (torch.arange(700, device="cuda") >= torch.tensor([[0], [90]], device="cuda"))[:, None, None, :]
    for extra, threshold in [(("window", 256, 4), 0.0), (("topk", 0, 4, 0.25, q, k), 0.0), ((), 1e-3)]:
        layout = torch.ops.sparsecc.block_layout(mask, 64, 64, *extra)
        assert layout[0].device.type == "cuda"
        args = (q, k, v, *layout, mask, 0.125, 64, 64, threshold, "zero")
        got = torch.ops.sparsecc.block_attention(*args)
        want = block_attention_reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2e-3, atol=2e-3)
