"""The README's main job: the bundled example transformer compiled with 2:4."""
import pytest
import torch

import sparsecc
from examples.tiny_transformer import TinyTransformer, build


def test_example_compiles_with_every_linear_rewritten():
    model, inputs = build()
    compiled = sparsecc.compile(model, inputs, sparsity="2:4")
    report = compiled.report()
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(r.layer for r in report.layers) == sorted(linears)
    assert [(s["layer"], s["rule"]) for s in report.skipped] == [("embed (weight)", "nm-dense-weights")]  # a lookup
    assert report.error_vs_reference < 1e-5
    reference = torch.func.functional_call(model, compiled.pruned_state_dict(), inputs)
    torch.testing.assert_close(compiled(*inputs), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_example_under_triton_interpreter_matches_pruned_dense():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=64, dim=32, heads=2, hidden=64, layers=1).eval()
    tokens = torch.randint(0, 64, (1, 8))
    compiled = sparsecc.compile(model, (tokens,), sparsity="2:4", backend="triton")
    assert compiled.report().error_vs_reference < 1e-4
    reference = torch.func.functional_call(model, compiled.pruned_state_dict(), (tokens,))
    torch.testing.assert_close(compiled(tokens), reference, rtol=1e-4, atol=1e-4)
