"""The ONNX forms of `sparsecc::moe`'s family options (correction bias, groups, scaling, expert biases,
interleaved and clamped SwiGLU, sparsemixer), each alone against the CPU kernel, then each family's
transformers block exported through the function and through com.microsoft.MoE where it fits."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxscript import ir
from sparsecc.onnx.export.exporter import ExportResult, attach_sparse_semantics
from sparsecc.runtime.kernels.moe_contract import MOE_ARGUMENTS, MoECall
from sparsecc.runtime.ops.moe import sample_moe_arguments, with_options

from ..runtime.test_moe_families_op import FAMILIES, family_case
from .test_op_functions import single_op_model

EXPERTS, WIDTH, INTER = 8, 16, 8
OPTIONS = {   # each alone on a softmax top-2 gated SiLU call; the values are chosen to change the output
    "score_correction_bias": dict(score_correction_bias=torch.linspace(-0.5, 0.5, EXPERTS)),
    "group_limited": dict(n_group=4, topk_group=2),
    "routed_scaling_factor": dict(routed_scaling_factor=2.5),
    "b_gate_up": dict(b_gate_up=torch.randn(EXPERTS, 2 * INTER, generator=torch.Generator().manual_seed(1))),
    "b_down": dict(b_down=torch.randn(EXPERTS, WIDTH, generator=torch.Generator().manual_seed(2))),
    "interleaved": dict(interleaved=True),
    "swiglu_clamped": dict(activation="swiglu_clamped", swiglu_limit=0.3, swiglu_alpha=1.702),
    "sparsemixer": dict(scoring="sparsemixer", normalize=False, sparsemixer_eps=0.5),
}
CONTRIB_FITS = {"b_gate_up", "b_down", "interleaved", "swiglu_clamped"}
CONTRIB_FAMILIES = {"gpt_oss", "qwen3_moe", "olmoe", "granitemoe"}   # softmax routing, no shared expert


def base_call() -> tuple:
    torch.manual_seed(0)
    return (*sample_moe_arguments(12, WIDTH, INTER, EXPERTS, True, False, False), 2, True, "softmax", "silu", True)


def positional(call: tuple) -> tuple:
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in call)


def run_function(call: tuple) -> np.ndarray:
    """The call's node with its local function, in onnxruntime."""
    want = torch.ops.sparsecc.moe(*call)
    model, feeds = single_op_model("moe", call, (want,))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def run_contrib(call: tuple) -> tuple[np.ndarray, ExportResult]:
    """The call's node given its semantics by the exporter with contrib=True, in onnxruntime."""
    model, feeds = single_op_model("moe", call, (torch.ops.sparsecc.moe(*call),))
    del model.functions[:]
    result = ExportResult("", 0)
    proto = attach_sparse_semantics(ir.serde.deserialize_model(model), True, 20, result)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0], result


@pytest.fixture(scope="module")
def option_calls() -> dict[str, tuple]:
    base = base_call()
    return {name: with_options(base, **options) for name, options in OPTIONS.items()}


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_alone_matches_the_cpu_kernel_and_is_not_ignored(option, option_calls):
    call = option_calls[option]
    got = run_function(call)
    np.testing.assert_allclose(got, torch.ops.sparsecc.moe(*call).numpy(), rtol=1e-5, atol=1e-6)
    without = torch.ops.sparsecc.moe(*with_options(base_call())).numpy()
    assert not np.allclose(got, without, rtol=1e-3, atol=1e-3), f"{option} changes nothing"


@pytest.mark.parametrize("option", OPTIONS)
def test_contrib_maps_only_the_options_it_computes(option, option_calls):
    call = option_calls[option]
    got, result = run_contrib(call)
    np.testing.assert_allclose(got, torch.ops.sparsecc.moe(*call).numpy(), rtol=1e-5, atol=1e-6)
    assert bool(result.contrib_nodes) == (option in CONTRIB_FITS), result.log
    assert option in CONTRIB_FITS or "does not fit" in result.log[0], result.log


def test_sparsemixer_eps_is_exported():
    loose = with_options(base_call(), scoring="sparsemixer", normalize=False, sparsemixer_eps=0.5)
    tight = with_options(base_call(), scoring="sparsemixer", normalize=False, sparsemixer_eps=0.01)
    np.testing.assert_allclose(run_function(tight), torch.ops.sparsecc.moe(*tight).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(run_function(tight), run_function(loose), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> tuple[str, torch.Tensor, tuple]:
    torch.manual_seed(0)
    expected, call = family_case(request.param)
    bound = MoECall(**call)
    return request.param, expected, positional(getattr(bound, name) for name in MOE_ARGUMENTS)


def test_family_block_exports_exactly(family):
    name, expected, call = family
    np.testing.assert_allclose(run_function(call), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_family_block_contrib_or_reason(family):
    name, expected, call = family
    got, result = run_contrib(call)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert result.contrib_nodes == ({"com.microsoft.MoE": 1} if name in CONTRIB_FAMILIES else {}), result.log
