"""The Triton nm_linear kernel against F.linear: interpreter on CPU, real launches on CUDA, AOT cubins."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask
from sparsecc.runtime.ops.nm_linear import NM_LINEAR

triton_nm = pytest.importorskip("sparsecc.runtime.kernels.triton.nm_linear")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_case(tokens_shape, out_features, k, n, m, dtype, has_bias):
    """(x, values, indices, bias, reference y in fp32) on DEVICE."""
    weight = torch.randn(out_features, k)
    pruned = weight * nm_mask(weight.abs(), n, m)
    values, indices = compress_nm(pruned.to(dtype), n, m)
    x = torch.randn(*tokens_shape, k).to(dtype)
    bias = torch.randn(out_features).to(dtype) if has_bias else None
    reference = F.linear(x.float(), pruned.to(dtype).float(), None if bias is None else bias.float())
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(values), to(indices), to(bias), reference


def assert_kernel_matches(tokens_shape, out_features, k, n, m, dtype, has_bias, **blocks):
    x, values, indices, bias, reference = make_case(tokens_shape, out_features, k, n, m, dtype, has_bias)
    y = triton_nm.nm_linear_triton(x, values, indices, bias, n, m, k, **blocks)
    assert y.shape == reference.shape and y.dtype == dtype
    torch.testing.assert_close(y.float().cpu(), reference, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("path", ["fused", "decompress"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16)])
def test_kernel_matches_linear(pattern, has_bias, dtype, path):
    assert_kernel_matches((8,), 32, 64, *pattern, dtype, has_bias, path=path)


@pytest.mark.parametrize("pattern,packed", [((2, 4), True), ((8, 16), True), ((3, 4), False),
                                            ((5, 16), False), ((2, 8), False)])
def test_both_tile_builders(pattern, packed):
    assert triton_nm.packed_tiles(*pattern, 64) is packed
    assert_kernel_matches((4,), 24, 64, *pattern, torch.float32, True, path="fused")


@pytest.mark.parametrize("pattern", [(2, 4), (3, 8), (8, 16), (3, 4)])
def test_decompress_kernel_equals_decompress_nm(pattern):
    n, m = pattern
    weight = torch.randn(40, 96)
    values, indices = compress_nm(weight * nm_mask(weight.abs(), n, m), n, m)
    dense = triton_nm.nm_decompress_triton(values.to(DEVICE), indices.to(DEVICE), n, m, 96, block_k=64)
    assert torch.equal(dense.cpu(), decompress_nm(values, indices, n, m, 96))


@pytest.mark.parametrize("pattern", [(2, 4), (3, 8)])
def test_three_dim_input_and_ragged_tiles(pattern):
    # 5 tokens / 40 rows / K=48 do not fill 16x32x32 tiles; 3:8 puts 3-bit positions across bytes.
    assert_kernel_matches((1, 5, 48), 40, 48, *pattern, torch.float16, True,
                          path="fused", block_m=16, block_n=32, block_k=32)


def test_several_k_steps_accumulate():
    assert_kernel_matches((2, 3), 16, 128, 2, 8, torch.float32, False, path="fused", block_k=32, split_k=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_adds_every_slice_and_the_bias_once(dtype):
    # 4 K steps over 3 slices of 2 steps: the last slice is empty.
    assert_kernel_matches((3,), 24, 128, 2, 4, dtype, True, path="fused", block_k=32, split_k=3)


def test_block_k_must_be_a_multiple_of_m():
    x, values, indices, _, _ = make_case((2,), 16, 32, 8, 16, torch.float32, False)
    with pytest.raises(ValueError, match="block_k=8 must be a multiple of M=16"):
        triton_nm.nm_linear_triton(x, values, indices, None, 8, 16, 32, block_k=8)


def test_unknown_path_is_rejected():
    x, values, indices, _, _ = make_case((2,), 16, 32, 2, 4, torch.float32, False)
    with pytest.raises(ValueError, match="path must be"):
        triton_nm.nm_linear_triton(x, values, indices, None, 2, 4, 32, path="dense")


def test_registry_triton_kernel_runs():
    x, values, indices, bias, reference = make_case((4,), 16, 32, 2, 4, torch.float32, True)
    y = NM_LINEAR.kernel("triton")(x, values, indices, bias, 2, 4, 32)
    torch.testing.assert_close(y.cpu(), reference, rtol=1e-4, atol=1e-4)


# Cross-compiling runs in a fresh process without TRITON_INTERPRET: under the interpreter JIT functions
# are interpreter objects, and once a kernel calls a JIT helper (tl.zeros, tl.sum, ...) triton 3.9
# leaves triton.language patched for the rest of the process.
AOT_SCRIPT = """
import json, sys, torch
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:
    print(json.dumps({"skip": f"triton AOT API unavailable: {err}"})); sys.exit()
from sparsecc.runtime.kernels.triton.launch import bind_launch, use_launcher
from sparsecc.runtime.kernels.triton.nm_linear import nm_linear_kernel, nm_linear_triton
launches = []  # the specialisation a 1-token fp16 2:4 call with bias launches (recorded, not run)
with use_launcher(lambda kernel, grid, *args, **kwargs: launches.append(bind_launch(kernel, args, kwargs)[0])):
    nm_linear_triton(torch.zeros(1, 64, dtype=torch.float16), torch.zeros(8, 32, dtype=torch.float16),
                     torch.full((8, 8), 0xE4, dtype=torch.uint8), torch.zeros(8, dtype=torch.float16), 2, 4, 64)
(spec,) = launches
sizes = {}
for capability in (90, 80):
    source = ASTSource(fn=nm_linear_kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=spec.options)
    sizes[capability] = [len(compiled.asm["cubin"]), compiled.metadata.name]
print(json.dumps(sizes))
"""


@pytest.fixture(scope="module")
def cubins():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


@pytest.mark.parametrize("capability", ["90", "80"])
def test_cross_compiles_a_cubin_without_a_gpu(cubins, capability):
    size, name = cubins[capability]
    assert size > 0 and name == "nm_linear_kernel"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 77, 512])
def test_cuda_op_matches_linear_at_model_shapes(dtype, tokens):
    x, values, indices, bias, reference = make_case((tokens,), 1000, 1024, 2, 4, dtype, True)
    y = torch.ops.sparsecc.nm_linear(x, values, indices, bias, 2, 4, 1024)  # dispatches to Triton on CUDA
    torch.testing.assert_close(y.float().cpu(), reference, rtol=TOL[dtype], atol=TOL[dtype] * 10)
