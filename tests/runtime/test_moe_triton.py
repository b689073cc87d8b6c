"""The Triton MoE kernels vs the op's reference: interpreter on CPU (small tiles), real launches on CUDA."""
import pytest
import torch

from sparsecc.runtime.moe_routing import route_within_capacity
from sparsecc.runtime.ops.moe import moe_reference

from .test_moe_op import make_call

triton_moe = pytest.importorskip("sparsecc.runtime.kernels.triton.moe")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
SMALL = dict(tokens=8, width=32, inter=32, num_experts=4, top_k=2)
TILES = dict(block_m=16, block_n=16, block_k=32)


def assert_kernel_matches(dtype=torch.float32, tiles=TILES, **case):
    call = make_call(**{**SMALL, **case}, dtype=dtype)
    on_device = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in call]
    y = triton_moe.moe_triton(*on_device, **tiles)
    assert y.shape == call[0].shape and y.dtype == dtype
    expected = moe_reference(*call).float()
    torch.testing.assert_close(y.float().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu")])
def test_gated_and_plain_experts(gated, activation, dtype):
    assert_kernel_matches(dtype, gated=gated, activation=activation)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_other_activations(activation):
    assert_kernel_matches(activation=activation, gated=activation == "relu")


@pytest.mark.parametrize("scoring,normalize", [("softmax", False), ("sigmoid", True)])
def test_scoring_and_normalization(scoring, normalize):
    assert_kernel_matches(scoring=scoring, normalize=normalize)


@pytest.mark.parametrize("shared_gate", [False, True])
def test_shared_expert(shared_gate):
    assert_kernel_matches(torch.float16, shared=True, shared_gate=shared_gate)


def test_many_experts_top_1_most_empty():
    assert_kernel_matches(tokens=4, num_experts=128, top_k=1)


def test_single_token():
    assert_kernel_matches(tokens=1, shared=True)


def test_capacity_factor_drops_pairs():
    call = make_call(**{**SMALL, "tokens": 12, "capacity_factor": 0.5})
    assert int(route_within_capacity(call[1], 2, True, "softmax", 0.5)[2]) > 0  # the case drops something
    assert_kernel_matches(tokens=12, capacity_factor=0.5)


@pytest.mark.parametrize("options", [
    dict(num_experts=8, scoring="sigmoid", score_correction_bias=torch.linspace(-1, 1, 8), n_group=4, topk_group=2,
         routed_scaling_factor=2.5, shared=True),
    dict(scoring="sparsemixer", normalize=False, sparsemixer_eps=0.2),
    dict(biases=True, interleaved=True, activation="swiglu_clamped", swiglu_limit=0.5, swiglu_alpha=1.702),
    dict(biases=True, interleaved=True, activation="swiglu_clamped", swiglu_limit=0.5, shared=True, tokens=12,
         capacity_factor=0.5),
    dict(biases=True, activation="gelu_tanh"),
    dict(biases=True, gated=False, activation="relu"),
], ids=["DeepSeek-V3 routing", "sparsemixer", "GPT-OSS experts", "GPT-OSS experts, shared, capacity",
        "biases, gated", "biases, not gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routing_and_expert_options(options, dtype):
    assert_kernel_matches(dtype, **options)


def test_ragged_shapes_and_several_k_steps():
    # H=40, I=24 do not fill 16-wide tiles; BLOCK_K=16 takes 3 steps over H and 2 over I.
    assert_kernel_matches(width=40, inter=24, tiles=dict(block_m=16, block_n=16, block_k=16))
    assert_kernel_matches(width=40, inter=24, tiles=dict(block_m=16, block_n=16, block_k=16), biases=True,
                          interleaved=True, activation="swiglu_clamped", swiglu_limit=0.5)


def test_default_tiles():
    assert triton_moe.default_blocks(8, 4) == (16, 128, 128, 4)        # decode: a few pairs per expert
    assert triton_moe.default_blocks(1024, 64) == (32, 128, 64, 4)
    assert triton_moe.default_blocks(1024, 8) == (64, 128, 64, 4)
    assert triton_moe.default_blocks(8192, 8) == (128, 128, 64, 8)     # prefill: tall tiles
    assert triton_moe.default_blocks(8, 4, itemsize=4) == (16, 128, 64, 4)  # fp32: tiles fit shared memory
    assert triton_moe.default_blocks(8192, 8, itemsize=4) == (128, 128, 32, 8)
    assert_kernel_matches(tiles={})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,num_experts,top_k", [(1, 8, 2), (300, 8, 2), (64, 128, 8), (2048, 64, 6)])
def test_cuda_shapes(tokens, num_experts, top_k, dtype):
    call = make_call(tokens, 1024, 704, num_experts, top_k, shared=True, shared_gate=True, dtype=dtype)
    call = [t.cuda() if isinstance(t, torch.Tensor) else t for t in call]
    y = torch.ops.sparsecc.moe(*call)  # the op's CUDA kernel is the Triton launcher
    in_fp32 = [t.float() if isinstance(t, torch.Tensor) else t for t in call]
    torch.testing.assert_close(y.float(), moe_reference(*in_fp32), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [
    dict(scoring="sigmoid", score_correction_bias=torch.linspace(-1, 1, 8), n_group=4, topk_group=2,
         routed_scaling_factor=2.5, shared=True),
    dict(biases=True, interleaved=True, activation="swiglu_clamped", swiglu_limit=7.0, swiglu_alpha=1.702),
], ids=["DeepSeek-V3 form", "GPT-OSS form"])
def test_cuda_family_forms(options, dtype):
    call = make_call(300, 1024, 704, 8, 2, dtype=dtype, **options)
    on_cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in call]
    y = torch.ops.sparsecc.moe(*on_cuda)
    in_fp32 = [t.float() if isinstance(t, torch.Tensor) else t for t in call]
    torch.testing.assert_close(y.float().cpu(), moe_reference(*in_fp32), rtol=3e-2, atol=3e-2)
