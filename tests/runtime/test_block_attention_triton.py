"""The Triton block-attention kernel vs the op's reference: interpreter on CPU (small tiles), CUDA at real sizes."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsecc.runtime.attention_layout import (causal_layout, intersect, layout_from_mask, topk_layout,
                                               window_layout)
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


# Cross-compiling runs in a fresh process without TRITON_INTERPRET (see test_nm_linear_triton.py).
AOT_SCRIPT = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparsecc.runtime.attention_layout import causal_layout
from sparsecc.runtime.kernels.triton.block_attention import block_attention_kernel, block_attention_triton
from sparsecc.runtime.kernels.triton.launch import bind_launch, use_launcher
launches = []  # a masked, threshold-skipping fp16 call with 64x64 blocks (recorded, not run)
q = torch.zeros(1, 2, 128, 64, dtype=torch.float16)
with use_launcher(lambda kernel, grid, *args, **kwargs: launches.append(bind_launch(kernel, args, kwargs)[0])):
    block_attention_triton(q, q, q, *causal_layout(128, 128, 64, 64), torch.ones(128, 128, dtype=torch.bool),
                           0.125, 64, 64, threshold=1e-4)
(spec,) = launches
source = ASTSource(fn=block_attention_kernel, signature=spec.signature, constexprs=spec.constexprs)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec.options)
print(json.dumps([len(compiled.asm["cubin"]), compiled.metadata.name]))
"""


def test_compiled_kernel_builds_for_sm90_without_a_gpu():
    """The interpreter never runs the compiled path: masked, threshold-skipping fp16 kernel to a cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    size, name = json.loads(run.stdout.strip().splitlines()[-1])
    assert size > 0 and name == "block_attention_kernel"


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
