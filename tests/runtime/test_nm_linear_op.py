"""sparsecc::nm_linear: fake shapes, the CPU kernel against F.linear, verifier, registry, export."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsecc.runtime.kernels.cpu.nm_linear import nm_linear_cpu
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask
from sparsecc.runtime.ops import get_op
from sparsecc.runtime.ops.nm_linear import NM_LINEAR, verify_nm_linear

nm_linear = torch.ops.sparsecc.nm_linear.default


def make_weight(out_features, k, n=2, m=4, dtype=torch.float32):
    """(values, indices, dense pruned weight) for a random [out_features, k] weight."""
    weight = torch.randn(out_features, k, dtype=dtype)
    pruned = weight * nm_mask(weight.abs(), n, m)
    values, indices = compress_nm(pruned, n, m)
    return values, indices, pruned


@pytest.mark.parametrize("batch", [(5,), (2, 3), (1,)])
def test_fake_shapes_match_cpu_kernel(batch):
    values, indices, _ = make_weight(24, 32)
    args = (torch.randn(*batch, 32), values, indices, torch.randn(24), 2, 4, 32)
    real = nm_linear_cpu(*args)
    with FakeTensorMode() as mode:
        fake = nm_linear(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert fake.shape == real.shape == (*batch, 24) and fake.dtype == real.dtype


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16)])
def test_cpu_kernel_equals_dense_linear(dtype, tol, has_bias, pattern):
    n, m = pattern
    values, indices, pruned = make_weight(40, 64, n, m, dtype)
    bias = torch.randn(40, dtype=dtype) if has_bias else None
    x = torch.randn(2, 3, 64, dtype=dtype)
    expected = F.linear(x, decompress_nm(values, indices, n, m, 64), bias)
    assert torch.equal(decompress_nm(values, indices, n, m, 64), pruned)
    got = nm_linear(x, values, indices, bias, n, m, 64)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_cpu_kernel_spans_several_row_blocks():
    values, indices, pruned = make_weight(600, 16)  # BLOCK_ROWS == 256: three blocks, the last one short
    x, bias = torch.randn(3, 16), torch.randn(600)
    torch.testing.assert_close(nm_linear_cpu(x, values, indices, bias, 2, 4, 16), F.linear(x, pruned, bias))


def test_opcheck_passes():
    values, indices, _ = make_weight(8, 16)
    torch.library.opcheck(nm_linear, (torch.randn(3, 16), values, indices, torch.randn(8), 2, 4, 16))


def test_registry_entry():
    assert get_op("sparsecc::nm_linear") is NM_LINEAR
    assert NM_LINEAR.op is nm_linear and NM_LINEAR.kernel("torch") is nm_linear_cpu
    assert NM_LINEAR.attrs == ("n", "m", "in_features") and NM_LINEAR.onnx_export == "nm_linear"


def test_verifier_accepts_a_well_formed_call():
    values, indices, _ = make_weight(8, 16)
    assert verify_nm_linear(torch.randn(2, 16), values, indices, torch.randn(8), 2, 4, 16) is None


@pytest.mark.parametrize("change,reason", [
    ({"x": torch.randn(2, 12)}, "in_features=16"),
    ({"n": 4}, "4:4"),
    ({"in_features": 20}, "values"),
    ({"indices": torch.zeros(8, 2, dtype=torch.int32)}, "uint8"),
    ({"indices": torch.zeros(8, 3, dtype=torch.uint8)}, r"indices \[8, 3\] must be \[8, 2\]"),
    ({"bias": torch.randn(7)}, "bias"),
    ({"x": torch.randn(2, 16, dtype=torch.float64)}, "dtype"),
])
def test_verifier_names_the_problem(change, reason):
    values, indices, _ = make_weight(8, 16)
    call = dict(x=torch.randn(2, 16), values=values, indices=indices, bias=None, n=2, m=4, in_features=16)
    problem = verify_nm_linear(**{**call, **change})
    assert problem is not None
    assert re.search(reason, problem), problem


class NMLinear(torch.nn.Module):
    def __init__(self, out_features, k):
        super().__init__()
        values, indices, _ = make_weight(out_features, k)
        self.register_buffer("nm_values", values)
        self.register_buffer("nm_indices", indices)
        self.bias = torch.nn.Parameter(torch.randn(out_features))

    def forward(self, x):
        return torch.relu(nm_linear(x, self.nm_values, self.nm_indices, self.bias, 2, 4, x.shape[-1]))


def test_op_survives_torch_export():
    module, x = NMLinear(12, 32), torch.randn(2, 5, 32)
    program = torch.export.export(module, (x,))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert nm_linear in targets
    torch.testing.assert_close(program.module()(x), module(x))
