"""No silent no-ops: a request that rewrites nothing warns, and the report's first lines say so, per request."""
import warnings

import pytest
import torch

import sparsecc


class NoLinear(torch.nn.Module):
    """An embedding lookup and a nonlinearity: nothing N:M, MoE, attention or token routing can rewrite."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(16, 8)

    def forward(self, ids):
        return torch.tanh(self.table(ids))


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _ids():
    return torch.randint(0, 16, (2, 5))


def test_nm_on_a_model_with_no_linear_warns_and_heads_the_report():
    with pytest.warns(UserWarning, match=r"weights \(prune-nm\{n=2,m=4.*\): rewrote nothing \(1 layer skipped: "
                                         r"table \[16, 8\] read by aten.embedding"):
        compiled = sparsecc.compile(NoLinear().eval(), (_ids(),), sparsity="2:4")
    report = compiled.report()
    assert len(report.noops) == 1
    assert str(report).splitlines()[1] == report.noops[0]
    assert report.to_dict()["noops"] == report.noops


def test_each_request_that_applies_to_nothing_gets_its_own_line():
    with pytest.warns(UserWarning) as caught:
        compiled = sparsecc.compile(TwoLinears().eval(), (torch.randn(2, 6, 16),), sparsity={
            "weights": {"pattern": "2:4"}, "moe": "dispatch", "attention": {"policy": "mask"}})
    lines = compiled.report().noops
    assert [line.split(" (")[0] for line in lines] == ["moe", "attention"]
    assert all("rewrote nothing (nothing in the model has the form it rewrites)" in line for line in lines)
    assert sum("rewrote nothing" in str(w.message) for w in caught) == 2
    assert str(compiled.report()).splitlines()[1:3] == lines


def test_a_request_that_rewrites_something_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = sparsecc.compile(TwoLinears().eval(), (torch.randn(2, 6, 16),), sparsity="2:4")
    assert compiled.report().noops == []


def test_a_pipeline_request_is_named_by_its_pass():
    with pytest.warns(UserWarning, match=r"^sparsecc.compile: moe-dispatch: rewrote nothing"):
        compiled = sparsecc.compile(TwoLinears().eval(), (torch.randn(2, 6, 16),), pipeline="moe-dispatch,cleanup")
    assert compiled.report().noops[0].startswith("moe-dispatch: rewrote nothing")
