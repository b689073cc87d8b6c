"""Rules applied by `apply_rules`: counts, op types, numerics against the original, verifier, skips."""
from __future__ import annotations

import pytest
import torch

from sparsecc.passes.manager import PassContext, Skip
from sparsecc.passes.match import Const, Op, Var
from sparsecc.passes.rewrite import CheckResult, Rule, RuleSet, apply_rules, fail, ok, where
from sparsecc.passes.rewriter import RewriteError
from sparsecc.passes.verify import verify_graph

from .helpers import TwoLayer, call_targets, capture

aten = torch.ops.aten
X = torch.randn(2, 3, 8)


def _linear_to_matmul(m, rw):
    return rw.call(aten.matmul.default, m["x"], rw.call(aten.t.default, m["w"]))


LINEAR_NO_BIAS = Rule("linear-to-matmul", Op(aten.linear.default, Var("x"), Const("w")), _linear_to_matmul)
DOUBLE_RELU = Rule("relu-relu", Op(aten.relu.default, Op(aten.relu.default, Var("x"), name="inner")),
                   lambda m, rw: m["inner"])


@pytest.fixture
def model():
    return TwoLayer().eval()


@pytest.fixture
def gm(model):
    return capture(model, (X,))


def test_linear_without_bias_becomes_matmul(model, gm):
    stats = apply_rules(gm, RuleSet("toy", [LINEAR_NO_BIAS]), PassContext())
    assert (stats.matched, stats.rewritten, stats.skipped) == (2, 2, [])
    targets = call_targets(gm)
    assert targets.count("aten.linear") == 2 and targets.count("aten.matmul") == 2 and targets.count("aten.t") == 2
    verify_graph(gm)
    gm.recompile()
    torch.testing.assert_close(gm(X), model(X))


def test_replacement_may_be_an_existing_node(model, gm):
    stats = apply_rules(gm, RuleSet("toy", [DOUBLE_RELU]), PassContext())
    assert stats.rewritten == 2 and call_targets(gm).count("aten.relu") == 2
    verify_graph(gm)
    gm.recompile()
    torch.testing.assert_close(gm(X), model(X))


def test_failed_check_records_reason_and_module_path(gm):
    rule = Rule("linear-to-matmul", LINEAR_NO_BIAS.pattern, _linear_to_matmul,
                lambda m, ctx: fail("weight is too small"))
    stats = apply_rules(gm, RuleSet("toy", [rule]), PassContext())
    assert (stats.matched, stats.rewritten) == (2, 0)
    assert stats.skipped == [Skip("layers.0.fc2", "linear-to-matmul", "weight is too small"),
                             Skip("layers.1.fc2", "linear-to-matmul", "weight is too small")]
    assert call_targets(gm).count("aten.linear") == 4


def test_check_may_name_where_the_skip_belongs(gm):
    rule = Rule("r", LINEAR_NO_BIAS.pattern, _linear_to_matmul, lambda m, ctx: fail("tied", where=m["w"].target))
    stats = apply_rules(gm, RuleSet("toy", [rule]), PassContext())
    assert [s.where for s in stats.skipped] == ["layers.0.fc2.weight", "layers.1.fc2.weight"]


def test_first_passing_rule_wins_and_hides_earlier_skips(gm):
    declined = Rule("declined", LINEAR_NO_BIAS.pattern, _linear_to_matmul, lambda m, ctx: fail("no"))
    stats = apply_rules(gm, RuleSet("a", [declined]) + RuleSet("b", [LINEAR_NO_BIAS]), PassContext())
    assert (stats.matched, stats.rewritten, stats.skipped) == (2, 2, [])


def test_created_nodes_are_not_revisited(model, gm):
    grow = Rule("relu-grows", Op(aten.relu.default, Var("x")),
                lambda m, rw: rw.call(aten.relu.default, rw.call(aten.relu.default, m["x"])))
    stats = apply_rules(gm, RuleSet("grow", [grow]), PassContext())
    assert stats.rewritten == 4 and call_targets(gm).count("aten.relu") == 8
    gm.recompile()
    torch.testing.assert_close(gm(X), model(X))


def test_check_must_return_a_check_result(gm):
    rule = Rule("bad-check", LINEAR_NO_BIAS.pattern, _linear_to_matmul, lambda m, ctx: None)
    with pytest.raises(TypeError, match="ok\\(\\) or fail"):
        apply_rules(gm, RuleSet("toy", [rule]), PassContext())


def test_type_changing_replacement_is_refused_and_undone(gm):
    before = len(gm.graph.nodes)
    rule = Rule("wrong", LINEAR_NO_BIAS.pattern, lambda m, rw: rw.call(aten.t.default, m["w"]))
    with pytest.raises(RewriteError, match="changed the type of %linear_1"):
        apply_rules(gm, RuleSet("toy", [rule]), PassContext())
    assert len(gm.graph.nodes) == before
    verify_graph(gm)


def test_check_results_and_rule_sets():
    assert ok() and not fail("why") and fail("why").reason == "why"
    assert isinstance(ok(), CheckResult) and ok().reason is None
    with pytest.raises(ValueError):
        fail("")
    combined = RuleSet("a", [LINEAR_NO_BIAS]) + RuleSet("b", [DOUBLE_RELU])
    assert combined.name == "a+b" and combined.rules == (LINEAR_NO_BIAS, DOUBLE_RELU) and len(combined) == 2


def test_where_falls_back_to_node_name(gm):
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    linear = next(n for n in gm.graph.nodes if n.target == aten.linear.default)
    assert where(placeholder) == "x" and where(linear) == "layers.0.fc1"
