"""Library ops are lowered, not refused: ops outside the runtime's op table are decomposed into ATen ops
before lowering, region higher-order ops inlined, and what cannot be decomposed is named with its layer.

Stock MoE models use transformers' default expert path (`grouped_mm`), which leaves
`transformers::grouped_mm_fallback` in the captured graph; tiny random-init models, no downloads.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import sparsecc
from sparsecc.errors import LoweringError
from sparsecc.library_ops import grouped_mm_by_rows
from sparsecc.runtime.op_table import qualname_of

transformers = pytest.importorskip("transformers")

VOCAB = 128
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB,
            num_attention_heads=4, num_key_value_heads=2)


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **TINY)
        return transformers.MixtralForCausalLM(config).eval()
    if family == "qwen3-moe":
        config = transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                             head_dim=8, **TINY)
        return transformers.Qwen3MoeForCausalLM(config).eval()
    config = transformers.PhimoeConfig(num_local_experts=4, num_experts_per_tok=2, **TINY)
    return transformers.PhimoeForCausalLM(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))


def _compile(model, inputs, sparsity=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the dropped KV cache of a stock model
        return sparsecc.compile(model, inputs, sparsity=sparsity)


def _program_ops(compiled) -> set[str]:
    return {instruction.op for instruction in compiled.program.instructions}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module", params=["mixtral", "qwen3-moe"])
def moe_model(request):
    model = _model(request.param)
    assert model.config._experts_implementation == "grouped_mm"   # the default path, left as it is
    return model


@pytest.fixture(scope="module")
def dense(moe_model):
    """(moe_model compiled with no sparsity request, the UserWarnings compiling it gave): two tests read it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = sparsecc.compile(moe_model, (_ids(),))
    return compiled, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("sparsity", [None, "2:4"])
def test_default_expert_path_compiles_runs_and_reports_its_error(moe_model, dense, sparsity):
    compiled, ids = (dense[0] if sparsity is None else _compile(moe_model, (_ids(),), sparsity)), _ids()
    assert not any(op.startswith("transformers::") for op in _program_ops(compiled))
    report = compiled.report()
    assert report.error_vs_dense is not None
    if sparsity is None:   # the decomposed experts compute what the model does
        assert report.error_vs_dense < 1e-5
        assert _relative(compiled(ids).logits, moe_model(ids).logits) < 1e-5
    else:                  # pruned: lossy vs dense, exact vs the pruned model
        assert report.layers and 0 < report.error_vs_dense < 1
        assert report.error_vs_reference < 1e-5


def test_phimoe_compiles_and_matches():
    model, ids = _model("phimoe"), _ids()
    compiled = _compile(model, (ids,))
    assert compiled.report().error_vs_dense < 1e-5
    assert _relative(compiled(ids).logits, model(ids).logits) < 1e-5


@pytest.mark.parametrize("offsets", [[3, 3, 7, 10], [0, 4, 4, 8]])   # empty groups; rows past the last offset
def test_grouped_mm_decomposition_equals_torch_and_the_transformers_fallback(offsets):
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)
    rows, weights = torch.randn(10, 8), torch.randn(4, 8, 12)
    offs = torch.tensor(offsets, dtype=torch.int32)
    fallback = torch.ops.transformers.grouped_mm_fallback(rows, weights, offs)
    torch.testing.assert_close(grouped_mm_by_rows(rows, weights, offs), fallback)
    if offsets[-1] == rows.shape[0]:   # torch leaves rows past the last offset unspecified
        torch.testing.assert_close(grouped_mm_by_rows(rows, weights, offs), torch._grouped_mm(rows, weights, offs))


def test_default_expert_path_keeps_dynamic_sequence_length():
    model, seq = _model("mixtral"), torch.export.Dim("seq", min=2, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = sparsecc.compile(model, (_ids(),), dynamic_shapes={"input_ids": {1: seq}})
    longer = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(2))
    assert _relative(compiled(longer).logits, model(longer).logits) < 1e-5


class GroupedExperts(torch.nn.Module):
    """torch's own grouped GEMM (what transformers calls in eager bf16): outside the runtime's op table."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 16, 8, dtype=torch.bfloat16))

    def forward(self, rows, offs):
        return torch._grouped_mm(rows, self.weight, offs)


def test_aten_grouped_mm_is_decomposed():
    model, rows = GroupedExperts().eval(), torch.randn(12, 16, dtype=torch.bfloat16)
    offs = torch.tensor([3, 3, 9, 12], dtype=torch.int32)
    compiled = _compile(model, (rows, offs))
    assert "aten::bmm.default" in _program_ops(compiled) and not any("grouped" in op for op in _program_ops(compiled))
    torch.testing.assert_close(compiled(rows, offs), model(rows, offs))


class TensorLiteral(torch.nn.Module):
    """`torch.tensor(...)` in a forward: export records it as lift_fresh_copy + detach_ (GraniteMoE's cache does)."""

    def forward(self, x):
        return x * torch.tensor([2.0, 3.0])


def test_detach_of_a_tensor_literal_is_decomposed():
    model, x = TensorLiteral().eval(), torch.randn(3, 2)
    compiled = _compile(model, (x,))
    assert "aten::detach_.default" not in _program_ops(compiled)
    torch.testing.assert_close(compiled(x), model(x))


@torch.library.custom_op("sparsecc_test::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("sparsecc_test::count_loop", mutates_args=())
def count_loop(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i, count in enumerate(counts.tolist()):   # data-dependent: cannot be traced into a static graph
        if count:
            out[i] = x[i] * count
    return out


@count_loop.register_fake
def _(x, counts):
    return torch.empty_like(x)


class Activation(torch.nn.Module):
    def forward(self, x):
        return scaled_tanh(x, 0.5)


class Counter(torch.nn.Module):
    def forward(self, x):
        return count_loop(x, (x[:, 0] > 0).to(torch.int64))


class LinearThen(torch.nn.Module):
    """A linear layer, then `tail` (a module calling the op under test, so errors can name its layer)."""

    def __init__(self, tail: torch.nn.Module):
        super().__init__()
        self.fc, self.tail = torch.nn.Linear(8, 8), tail

    def forward(self, x):
        return self.tail(self.fc(x))


def test_custom_op_with_a_python_implementation_is_decomposed():
    model, x = LinearThen(Activation()).eval(), torch.randn(4, 8)
    compiled = _compile(model, (x,))
    assert {"aten::tanh.default", "aten::mul.Tensor"} <= _program_ops(compiled)
    assert not any(op.startswith("sparsecc_test::") for op in _program_ops(compiled))
    torch.testing.assert_close(compiled(x), model(x))


def test_an_op_that_cannot_be_decomposed_is_named_with_its_layer():
    with pytest.raises(LoweringError, match=r"op sparsecc_test::count_loop .* in module tail is outside the "
                                            r"sparsecc runtime's op table and cannot be decomposed.*Python "
                                            r"implementation for cpu: GuardOnDataDependentSymNode"):
        _compile(LinearThen(Counter()).eval(), (torch.randn(4, 8),))


class Regions(torch.nn.Module):
    """A grad-enabled router and an autocast-off projection: export keeps both as higher-order ops."""

    def __init__(self, autocast: bool = False):
        super().__init__()
        self.fc, self.router, self.autocast = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), autocast

    def forward(self, x):
        with torch.enable_grad():
            weights = self.router(x).softmax(-1)
        with torch.autocast("cpu", enabled=self.autocast):
            y = self.fc(x).float()
        return y * weights.sum(-1, keepdim=True)


def test_no_grad_and_autocast_off_regions_are_inlined():
    model, x = Regions().eval(), torch.randn(3, 8)
    compiled = _compile(model, (x,))
    assert all(qualname_of(node.target) for node in compiled.graph_module.graph.nodes if node.op == "call_function")
    assert not any(isinstance(m, torch.fx.GraphModule) for m in compiled.graph_module.children())
    torch.testing.assert_close(compiled(x), model(x))


def test_an_autocast_on_region_is_refused_with_its_op():
    with pytest.raises(LoweringError, match=r"op wrap_with_autocast .* cannot be lowered"):
        _compile(Regions(autocast=True).eval(), (torch.randn(3, 8),))


def test_lowering_grouped_expert_products_says_what_it_costs_and_what_avoids_it(moe_model, dense):
    cost = r"grouped expert product\(s\) \(model\.layers\.0\..*E times the expert FLOPs"
    assert any(re.search(cost, message) for message in dense[1]), dense[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(KV cache|cache).*")   # the dropped cache output
        sparsecc.compile(moe_model, (_ids(),), sparsity={"moe": "dispatch"})   # absorbed: no such warning
