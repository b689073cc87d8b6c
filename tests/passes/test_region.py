"""The region driver on a toy rule: relu(relu(a)) regions, read as relu(a) (right) or abs(a) (wrong)."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from sparsecc.passes.graph import layer_name
from sparsecc.passes.manager import Pass, PassContext
from sparsecc.passes.records import RewriteRecord
from sparsecc.passes.region import (NotARegion, RegionRule, confirmation_tolerance, erase_region,
                                    record_values, rewrite_regions)
from sparsecc.passes.rewriter import Rewriter

from .helpers import Block, call_targets, capture

aten = torch.ops.aten
READINGS = {"relu": aten.relu.default, "abs": aten.abs.default}


@dataclass(frozen=True)
class FoldRelu(Pass):
    name: ClassVar[str] = "fold-relu"
    readings: tuple[str, ...] = ("abs", "relu")
    tolerance: float = 1e-6


@dataclass
class DoubleRelu:
    inner: torch.fx.Node
    output: torch.fx.Node

    @property
    def layer(self) -> str:
        return layer_name(self.output)

    @property
    def nodes(self) -> list:
        return [self.inner, self.output]


class FoldReluRule(RegionRule):
    def find(self, gm, ctx):
        relus = [n for n in gm.graph.nodes if n.target is aten.relu.default]
        pairs = [DoubleRelu(n.args[0], n) for n in relus if n.args[0] in relus]
        return pairs, [("somewhere", "a miss found while looking")]

    def recorded(self, region):
        return region.inner.args[0], region.output

    def readings(self, gm, region, values):
        if "refuse" in self.options.readings:
            raise NotARegion("refused before any reading")
        return self.options.readings

    def reproduce(self, gm, region, reading, values):
        return READINGS[reading](values[region.inner.args[0]]), values[region.output]

    def unconfirmed(self, region, best, tolerance):
        return f"closest {best:.1e} > {tolerance:.0e}"

    def insert(self, gm, region, reading, values, error):
        out = Rewriter(gm, region.output).call(READINGS[reading], region.inner.args[0])
        return out, RewriteRecord(region.layer, reading, "relu/relu", "", [], 0, 0, 0, 0, 0, 0, {"error": error})


def _run(readings):
    model, x = Block().eval(), torch.randn(2, 8)
    gm, ctx = capture(model, (x,)), PassContext(example_inputs=(x,))
    result = rewrite_regions(gm, ctx, FoldReluRule(FoldRelu(readings=readings)))
    gm.recompile()
    return model, x, gm, ctx, result.stats


def test_the_first_reading_that_reproduces_the_region_replaces_it():
    model, x, gm, ctx, stats = _run(("abs", "relu"))
    assert (stats.matched, stats.rewritten) == (1, 1)
    assert call_targets(gm).count("aten.relu") == 1 and "aten.abs" not in call_targets(gm)
    torch.testing.assert_close(gm(x), model(x))
    assert [r.op for r in ctx.records] == ["relu"] and ctx.records[0].details["error"] == 0.0
    assert [(s.where, s.rule, s.reason) for s in stats.skipped] == [("somewhere", "fold-relu",
                                                                     "a miss found while looking")]


def test_a_region_no_reading_reproduces_is_left_with_the_closest_error():
    _, _, gm, ctx, stats = _run(("abs",))
    assert stats.rewritten == 0 and call_targets(gm).count("aten.relu") == 2 and ctx.records == []
    assert stats.skipped[-1].reason.startswith("closest ") and stats.skipped[-1].reason.endswith("> 1e-06")


def test_not_a_region_from_a_rule_becomes_the_skip_reason():
    _, _, gm, _, stats = _run(("refuse",))
    assert stats.rewritten == 0 and stats.skipped[-1].reason == "refused before any reading"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-4),
                                              (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
def test_sixteen_bit_outputs_get_the_slack_of_their_rounding(dtype, tolerance):
    assert confirmation_tolerance(1e-4, dtype) == pytest.approx(tolerance)


def test_erasing_a_region_takes_its_dead_nodes_and_their_shape_asserts():
    x = torch.randn(2, 8)
    gm = capture(Block().eval(), (x,))
    relus = [n for n in gm.graph.nodes if n.target is aten.relu.default]
    with gm.graph.inserting_after(relus[1]):
        check = gm.graph.call_function(aten._assert_tensor_metadata.default, (relus[1],), {"dtype": torch.float32})
    relus[1].replace_all_uses_with(relus[0], delete_user_cb=lambda user: user is not check)
    erase_region(gm, relus)   # the outer relu is read only by its assert now
    assert call_targets(gm).count("aten.relu") == 1 and "aten._assert_tensor_metadata" not in call_targets(gm)
    assert record_values(gm, (x,), [relus[0]])[relus[0]].shape == (2, 8)
