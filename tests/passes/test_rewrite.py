"""Rules applied by `apply_rules`: counts, op types, numerics against the original, verifier, skips."""
from __future__ import annotations

import pytest
import torch

from sparsecc.passes.manager import PassContext, Skip
from sparsecc.passes.graph import layer_name
from sparsecc.passes.match import Const, Op, Var
from sparsecc.passes.rewrite import CheckResult, Rule, RuleIndex, RuleSet, apply_rules, fail, ok
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


def test_skips_name_the_layer_else_the_node(gm):
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    linear = next(n for n in gm.graph.nodes if n.target == aten.linear.default)
    assert layer_name(placeholder) == "x" and layer_name(linear) == "layers.0.fc1"


class CountingOp(Op):
    """An `Op` pattern that records the target of every node it is tried at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tried = []

    def bind(self, value, m):
        if value is m.node:
            self.tried.append(value.target)
        return super().bind(value, m)


class CountingVar(Var):
    """A root `Var` (any node) that records the targets it is tried at."""

    def __init__(self, name):
        super().__init__(name)
        self.tried = []

    def bind(self, value, m):
        self.tried.append(value.target)
        return False


def test_a_node_tries_only_the_rules_for_its_op(gm):
    relu, anywhere = CountingOp(aten.relu.default, Var("x")), CountingVar("x")
    rules = RuleSet("toy", [Rule("relu", relu, lambda m, rw: m["x"], lambda m, ctx: fail("kept")),
                            Rule("any", anywhere, lambda m, rw: m["x"]), LINEAR_NO_BIAS])
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    stats = apply_rules(gm, rules, PassContext())
    assert relu.tried == [aten.relu.default] * calls.count(aten.relu.default) and anywhere.tried == calls
    assert stats.rewritten == 2 and {s.rule for s in stats.skipped} == {"relu"}


def test_rule_index_keeps_the_rule_set_order_and_matches_packets():
    by_packet = Rule("packet", Op(aten.linear, Var("x"), Const("w")), _linear_to_matmul)
    anywhere = Rule("any", Var("x"), lambda m, rw: m["x"])
    index = RuleIndex(RuleSet("toy", [by_packet, DOUBLE_RELU, anywhere, LINEAR_NO_BIAS]))
    assert index.rules_for(aten.linear.default) == (by_packet, anywhere, LINEAR_NO_BIAS)
    assert index.rules_for(aten.relu.default) == (DOUBLE_RELU, anywhere)
    assert index.rules_for(aten.mm.default) == (anywhere,)
