"""The example model compiled on CUDA: Triton backend against the pruned dense model."""
import pytest
import torch

import sparsecc
from examples.tiny_transformer import build


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.float16, 2e-2)])
def test_example_on_cuda_matches_pruned_dense(dtype, tol):
    model, (tokens,) = build(batch=4, seq=64)
    model = model.to("cuda", dtype)
    tokens = tokens.cuda()
    compiled = sparsecc.compile(model, (tokens,), sparsity="2:4")
    assert compiled.backend == "triton"
    assert len(compiled.report().layers) == 11
    reference = torch.func.functional_call(model, compiled.pruned_state_dict(), (tokens,))
    torch.testing.assert_close(compiled(tokens), reference, rtol=tol, atol=tol)
    assert compiled.report().error_vs_reference < tol
