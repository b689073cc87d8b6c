"""The pattern matcher on captured graphs: positive, negative, nested, optional, kwargs."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from sparsecc.passes.match import AnyArg, Const, Lit, Op, Var, match

from .helpers import TinyLinear, capture

aten = torch.ops.aten


def _first(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.fixture
def linear_gm():
    return capture(TinyLinear(bias=True), (torch.randn(2, 8),))


@pytest.fixture
def nobias_gm():
    return capture(TinyLinear(bias=False), (torch.randn(2, 8),))


def test_op_captures_args_and_root(linear_gm):
    node = _first(linear_gm, aten.linear.default)
    m = match(Op(aten.linear.default, Var("x"), Const("w"), Var("b"), name="lin"), node)
    assert m is not None and m.node is node and m["lin"] is node
    assert m["x"].op == "placeholder" and m["w"].target == "l.weight" and m["b"].target == "l.bias"
    assert "b" in m and m.get("missing", 7) == 7 and m.nodes == [node]


def test_packet_and_tuple_targets_match_overloads(linear_gm):
    node = _first(linear_gm, aten.linear.default)
    assert match(Op(aten.linear, AnyArg(), AnyArg(), AnyArg()), node)
    assert match(Op((aten.mm.default, aten.linear), AnyArg(), AnyArg(), AnyArg()), node)
    assert match(Op(aten.mm.default, AnyArg(), AnyArg()), node) is None


def test_pattern_omitting_a_passed_arg_does_not_match(linear_gm):
    node = _first(linear_gm, aten.linear.default)
    assert match(Op(aten.linear.default, Var("x"), Const("w")), node) is None


def test_absent_trailing_arg_needs_an_optional_pattern(nobias_gm):
    node = _first(nobias_gm, aten.linear.default)
    assert match(Op(aten.linear.default, Var("x"), Const("w"), Var("b")), node) is None
    m = match(Op(aten.linear.default, Var("x"), Const("w"), Var("b", optional=True)), node)
    assert m is not None and "b" not in m and m.get("b") is None
    assert match(Op(aten.linear.default, Var("x"), Const("w"), AnyArg()), node)
    assert match(Op(aten.linear.default, Var("x"), Const("w")), node)


def test_const_rejects_computed_values(linear_gm):
    node = _first(linear_gm, aten.linear.default)
    assert match(Op(aten.linear.default, Const("x"), AnyArg(), AnyArg()), node) is None


class _MmT(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return torch.mm(x, self.w.t()) * 2 + x.sum(dim=-1, keepdim=True)


def test_nested_op_and_literals():
    gm = capture(_MmT(), (torch.randn(3, 8),))
    mm = _first(gm, aten.mm.default)
    m = match(Op(aten.mm.default, Var("x"), Op(aten.t.default, Const("w"), name="t")), mm)
    assert m["w"].target == "w" and m["t"].target is aten.t.default and m.nodes == [mm, m["t"]]
    assert match(Op(aten.mm.default, Var("x"), Op(aten.relu.default, Const("w"))), mm) is None
    mul = _first(gm, aten.mul.Tensor)
    assert match(Op(aten.mul.Tensor, Op(aten.mm.default, AnyArg(), AnyArg()), Lit(2)), mul)
    assert match(Op(aten.mul.Tensor, AnyArg(), Lit(3)), mul) is None
    assert match(Op(aten.mul.Tensor, AnyArg(), Lit(2.0)), mul) is None  # literal types must agree


def test_kwargs_and_defaults():
    gm = capture(_MmT(), (torch.randn(3, 8),))
    total = _first(gm, aten.sum.dim_IntList)
    assert match(Op(aten.sum.dim_IntList, Var("x"), Lit([-1]), keepdim=Lit(True)), total)
    assert match(Op(aten.sum.dim_IntList, Var("x"), Lit([-1]), Lit(True), dtype=Lit(None)), total)
    assert match(Op(aten.sum.dim_IntList, Var("x"), Lit([-1]), keepdim=Lit(False)), total) is None
    assert match(Op(aten.sum.dim_IntList, Var("x"), Lit([-1])), total) is None  # keepdim=True is not default


def test_repeated_name_binds_the_same_value():
    class Square(nn.Module):
        def forward(self, x, y):
            return x * x, x * y

    gm = capture(Square(), (torch.randn(3), torch.randn(3)))
    square, product = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor]
    pattern = Op(aten.mul.Tensor, Var("a"), Var("a"))
    assert match(pattern, square) is not None
    assert match(pattern, product) is None


def test_python_operator_targets():
    class Split(nn.Module):
        def forward(self, x):
            a, b = x.split(2)
            return a + b

    gm = capture(Split(), (torch.randn(4),))
    second = [n for n in gm.graph.nodes if n.target is operator.getitem][1]
    m = match(Op(operator.getitem, Op(aten.split.Tensor, Var("x"), Lit(2)), Lit(1)), second)
    assert m is not None and m["x"].op == "placeholder"
    assert match(Op(operator.getitem, AnyArg(), Lit(0)), second) is None


def test_non_call_nodes_never_match(linear_gm):
    placeholder = next(n for n in linear_gm.graph.nodes if n.op == "placeholder")
    assert match(Op(aten.linear.default, AnyArg(), AnyArg(), AnyArg()), placeholder) is None
    assert repr(Op(aten.linear.default, Var("x"), Const("w"), Lit(None)))  # readable in failures
