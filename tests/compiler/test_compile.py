"""sparsecc.compile end to end on small modules: rewrites, exactness, the report, no mutation."""
import pytest
import torch

import sparsecc

from ..untouched import assert_untouched, snapshot
from .models import Projections, TiedLM


def test_every_linear_form_is_rewritten_and_exact():
    model, x = Projections(), torch.randn(2, 5, 32)
    before = snapshot(model)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4")
    report = compiled.report()
    assert sorted(r.source_op for r in report.layers) == ["aten.addmm", "aten.linear", "aten.matmul", "aten.matmul"]
    assert "sparsecc.nm_linear" in compiled.ir() and "aten.linear" not in compiled.ir()
    assert report.error_vs_reference < 1e-5
    reference = torch.func.functional_call(model, compiled.pruned_state_dict(), (x,))
    torch.testing.assert_close(compiled(x), reference, rtol=1e-5, atol=1e-5)
    assert_untouched(model, before)


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "4:8", "2:8", "8:16"])
def test_patterns_keep_n_of_every_m(pattern):
    n, m = map(int, pattern.split(":"))
    model, x = Projections(dim=32), torch.randn(4, 32)
    compiled = sparsecc.compile(model, (x,), sparsity=pattern)
    for name, weight in compiled.pruned_state_dict().items():
        w = weight.t() if name.endswith("w_mm") or "conv1d" in name else weight
        nonzero = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        assert int(nonzero.max()) <= n, name
    assert compiled.report().error_vs_reference < 1e-5


def test_tied_and_indivisible_weights_are_skipped_with_reasons():
    model, tokens = TiedLM(), torch.randint(0, 64, (2, 6))
    before = snapshot(model)
    compiled = sparsecc.compile(model, (tokens,), sparsity="2:4")
    report = compiled.report()
    assert [r.layer for r in report.layers] == ["odd"]
    reasons = {s["layer"]: s["reason"] for s in report.skipped}
    assert "reduction dim 10 is not divisible by M=4" in reasons["back"]
    assert reasons["head"].startswith("weight is tied to aten.embedding")
    assert torch.equal(model.head.weight, model.embed.weight)
    assert_untouched(model, before)


def test_include_and_exclude_globs():
    model, x = Projections(), torch.randn(3, 32)
    compiled = sparsecc.compile(model, (x,), sparsity={"weights": {"pattern": "2:4", "exclude": ["conv*", "w_*"]}})
    assert [r.layer for r in compiled.report().layers] == ["linear"]
    assert {s["reason"] for s in compiled.report().skipped} == {"excluded by 'conv*'", "excluded by 'w_*'"}
    only = sparsecc.compile(model, (x,), sparsity={"weights": {"pattern": "2:4", "include": ["conv1d"]}})
    assert [r.layer for r in only.report().layers] == ["conv1d"]


def test_report_numbers_and_json():
    model, x = Projections(), torch.randn(2, 5, 32)
    report = sparsecc.compile(model, (x,), sparsity="2:4").report()
    layer = next(r for r in report.layers if r.layer == "linear")
    assert layer.shape == [32, 32] and layer.params_after == 32 * 16
    assert layer.bytes_after == 32 * 16 * 4 + 32 * 4   # fp32 values + 2-bit indices
    assert layer.flops_before == 2 * 10 * 32 * 32 and layer.flops_after == layer.flops_before // 2
    data = report.to_dict()
    assert data["totals"]["params_after"] * 2 == data["totals"]["params_before"]
    assert 0 < data["error_vs_dense"] < 1 and data["error_vs_reference"] < 1e-5
    text = str(report)
    assert "linear" in text and "error vs dense model" in text


def test_output_structure_and_dynamic_batch():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)

        def forward(self, x, scale=1.0):
            return {"a": self.a(x) * scale, "pair": (self.b(x), x.sum())}

    model = TwoHeads()
    batch = torch.export.Dim("batch", min=1, max=32)
    compiled = sparsecc.compile(model, (torch.randn(4, 16),), sparsity="2:4", dynamic_shapes=({0: batch},))
    x = torch.randn(9, 16)
    out = compiled(x)       # plain positional tensors: no pytree walk over the inputs
    assert set(out) == {"a", "pair"} and out["a"].shape == (9, 8) and out["pair"][0].shape == (9, 4)
    walked = compiled(torch.nn.Parameter(x, requires_grad=False))   # a tensor subclass: the pytree path
    torch.testing.assert_close(walked, out)
    with pytest.raises(sparsecc.runtime.InputMismatchError, match="structure"):
        compiled((x,))


@pytest.mark.parametrize("dim", [torch.export.Dim("batch"), torch.export.Dim.DYNAMIC, torch.export.Dim.AUTO])
def test_dims_without_an_upper_bound(dim):
    model = torch.nn.Linear(16, 16).eval()
    compiled = sparsecc.compile(model, (torch.randn(4, 16),), sparsity="2:4", dynamic_shapes=({0: dim},))
    assert [upper for _, upper in compiled.program.symbol_ranges.values()] == [None]
    assert compiled(torch.randn(300, 16)).shape == (300, 16)


@pytest.mark.interpreter
def test_triton_backend_matches_torch_backend():
    model, x = Projections(dim=32), torch.randn(8, 32)
    on_torch = sparsecc.compile(model, (x,), sparsity="2:4", backend="torch")
    on_triton = sparsecc.compile(model, (x,), sparsity="2:4", backend="triton", check=False)
    torch.testing.assert_close(on_triton(x), on_torch(x), rtol=1e-4, atol=1e-4)


def test_pipeline_string_overrides_sparsity():
    model, x = Projections(), torch.randn(3, 32)
    compiled = sparsecc.compile(model, (x,), pipeline="prune-nm{n=1,m=4,include=[linear]},cleanup")
    assert [(r.layer, r.pattern) for r in compiled.report().layers] == [("linear", "1:4")]
