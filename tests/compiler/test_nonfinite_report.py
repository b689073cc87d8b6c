"""A non-finite error reads nan/inf in the report and names the first layer that went non-finite."""
import json
import math

import pytest
import torch
import torch.nn as nn

import sparsecc
from sparsecc import numerics
from sparsecc.numerics import locate_non_finite, relative_error


class Stack(nn.Module):
    """Three linears with a ReLU between them: layers.1 is where a bad weight goes."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def _strict_json(text: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"invalid JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("bad, expected", [(math.nan, "nan"), (math.inf, "inf")])
def test_relative_error_keeps_non_finite(bad, expected):
    want = torch.ones(4)
    got = torch.tensor([1.0, 1.0, bad, 1.0])
    error = relative_error((torch.ones(2), got), (torch.ones(2), want))   # a finite pair first: max() must not hide it
    assert str(error) == expected
    assert str(relative_error(want, got)) == expected                     # the reference non-finite too


def test_nan_beats_inf_and_finite_stays_finite():
    assert math.isnan(relative_error((torch.tensor([math.inf]), torch.tensor([math.nan])),
                                     (torch.ones(1), torch.ones(1))))
    assert relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0


def test_inf_weight_is_reported_and_located():
    model, x = Stack(), torch.randn(2, 5, 32)
    with torch.no_grad():
        model.layers[1].weight[3, 7] = math.inf    # the largest magnitude: 2:4 pruning keeps it
    report = sparsecc.compile(model, (x,), sparsity="2:4").report()
    assert math.isnan(report.error_vs_dense)       # inf reaches the output, inf - inf downstream gives nan
    site = report.non_finite
    assert (site.graph, site.layer, site.op) == ("rewritten", "layers.1", "sparsecc.nm_linear")
    text = str(report)
    assert "error vs dense model:         nan" in text
    assert f"first non-finite output: layers.1 (sparsecc.nm_linear, node %{site.node})" in text
    data = _strict_json(report.to_json())
    assert data["error_vs_dense"] == "nan"
    assert data["non_finite"] == {"graph": "rewritten", "layer": "layers.1", "op": "sparsecc.nm_linear",
                                  "node": site.node}


def test_fp16_overflow_names_the_layer_that_overflowed():
    model, x = Stack().half(), (100 * torch.randn(2, 5, 32)).half()
    with torch.no_grad():
        model.layers[0].weight.mul_(2e4)            # layer 0's outputs pass 65504, fp16's largest finite value
    report = sparsecc.compile(model, (x,), sparsity="2:4").report()
    assert not math.isfinite(report.error_vs_dense)
    assert (report.non_finite.layer, report.non_finite.op) == ("layers.0", "sparsecc.nm_linear")


def test_dense_graph_is_traced_when_only_the_reference_is_non_finite():
    model, x = Stack(), torch.randn(2, 5, 32)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4")
    dense_gm = compiled.captured.dense_gm
    last = dense_gm.get_submodule("layers.2")
    weight = last.weight.detach().clone()
    weight[0, 0] = math.nan
    last.weight = nn.Parameter(weight)             # the dense graph only: the rewritten one holds its own copy
    with torch.no_grad():
        got, dense = compiled(x), dense_gm(x)
    site = locate_non_finite(got, dense, compiled.graph_module, dense_gm, (x,))
    assert (site.graph, site.layer, site.op) == ("dense", "layers.2", "aten.linear")


def test_non_finite_inputs_are_not_blamed_on_a_layer():
    model = Stack()
    x = torch.randn(2, 5, 32)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4")
    x[0, 0, 0] = math.nan
    site = locate_non_finite(compiled(x), compiled(x), compiled.graph_module, compiled.captured.dense_gm, (x,))
    assert site is None


def test_finite_errors_run_no_diagnosis(monkeypatch):
    def traced(*args):
        raise AssertionError("the node-by-node diagnosis ran for a finite error")
    monkeypatch.setattr(numerics, "first_non_finite", traced)
    report = sparsecc.compile(Stack(), (torch.randn(2, 5, 32),), sparsity="2:4").report()
    assert math.isfinite(report.error_vs_dense) and report.non_finite is None
    assert "non-finite" not in str(report) and _strict_json(report.to_json())["non_finite"] is None


class Counting(nn.Module):
    """A forward that writes program state (a call counter) and overflows to inf."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * 1e38 * 1e38


def test_diagnosis_leaves_program_state_as_it_was():
    x = torch.randn(2, 8)
    compiled = sparsecc.compile(Counting(), (x,), check=False)
    gm = compiled.graph_module
    before = gm.get_buffer("calls").clone()
    site = numerics.first_non_finite(gm, (x,), "rewritten")
    assert (site.op, site.layer) == ("aten.mul.Tensor", "")
    assert torch.equal(gm.get_buffer("calls"), before)
