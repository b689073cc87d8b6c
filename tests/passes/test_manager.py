"""PassManager: stats per pass, verification after each pass, IR printing and dumps."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import sparsecc.passes.manager as pass_manager
from sparsecc.passes import PASSES, Cleanup, build_pipeline
from sparsecc.passes.manager import Pass, PassContext, PassManager, PassResult, PassStats, Skip
from sparsecc.passes.match import Const, Op, Var
from sparsecc.passes.rewrite import Rule, RuleSet, apply_rules
from sparsecc.passes.verify import VerificationError

from .helpers import TwoLayer, call_targets, capture

aten = torch.ops.aten
X = torch.randn(2, 3, 8)


@dataclass(frozen=True)
class LinearToMatmul(Pass):
    """Bias-free linears become matmul(x, t(w))."""
    name: ClassVar[str] = "linear-to-matmul"

    def run(self, gm, ctx):
        rule = Rule("linear-to-matmul", Op(aten.linear.default, Var("x"), Const("w")),
                    lambda m, rw: rw.call(aten.matmul.default, m["x"], rw.call(aten.t.default, m["w"])))
        stats = apply_rules(gm, RuleSet("toy", [rule]), ctx)
        return PassResult(gm, stats.rewritten > 0, stats)


@dataclass(frozen=True)
class BreakShapes(Pass):
    """Records a wrong shape on the first relu, as a buggy pass would; `modified` is what it claims."""
    name: ClassVar[str] = "break-shapes"
    modified: bool = True

    def run(self, gm, ctx):
        relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
        relu.meta["val"] = relu.meta["val"][:1]
        return PassResult(gm, self.modified)


@dataclass(frozen=True)
class Look(Pass):
    """Reads the graph and changes nothing."""
    name: ClassVar[str] = "look"

    def run(self, gm, ctx):
        return PassResult(gm, False, PassStats(extra={"nodes": len(gm.graph.nodes)}))


@dataclass(frozen=True)
class Explode(Pass):
    name: ClassVar[str] = "explode"
    level: int = 1

    def run(self, gm, ctx):
        raise RuntimeError("boom")


def test_runs_passes_and_records_stats():
    model = TwoLayer().eval()
    ctx = PassContext()
    gm = PassManager([LinearToMatmul(), Cleanup(), Cleanup()]).run(capture(model, (X,)), ctx)
    assert list(ctx.stats) == ["linear-to-matmul", "cleanup", "cleanup#2"]
    assert ctx.stats["linear-to-matmul"].rewritten == 2 and ctx.stats["cleanup#2"].extra["dead_nodes"] == 0
    assert call_targets(gm).count("aten.matmul") == 2
    torch.testing.assert_close(gm(X), model(X))


def test_verification_failure_names_the_pass_and_node():
    with pytest.raises(VerificationError) as info:
        PassManager([Cleanup(), BreakShapes()]).run(capture(TwoLayer(), (X,)))
    assert "after pass 'break-shapes'" in str(info.value) and "%relu" in str(info.value)
    assert info.value.node == "relu"
    PassManager([BreakShapes()], verify=False).run(capture(TwoLayer(), (X,)))  # lint alone does not look at meta


def test_only_a_pass_that_modified_the_graph_is_verified_after(monkeypatch):
    verified = []
    monkeypatch.setattr(pass_manager, "verify_graph", lambda gm: verified.append(len(gm.graph.nodes)))
    ctx = PassContext()
    PassManager([Look(), LinearToMatmul(), Look()]).run(capture(TwoLayer(), (X,)), ctx)
    before, after = ctx.stats["look"].extra["nodes"], ctx.stats["look#2"].extra["nodes"]
    assert verified == [before, after] and after == before + 2   # the input graph, then linear-to-matmul


def test_a_pass_that_claims_no_change_but_changed_the_graph_is_caught():
    with pytest.raises(VerificationError, match="'break-shapes' returned modified=False but changed the graph"):
        PassManager([BreakShapes(modified=False)]).run(capture(TwoLayer(), (X,)))


def test_pass_errors_carry_the_pass_spelling():
    with pytest.raises(RuntimeError) as info:
        PassManager([Explode(level=2)]).run(capture(TwoLayer(), (X,)))
    assert "while running pass 'explode{level=2}'" in info.value.__notes__


def test_print_ir_after_all_and_progress():
    out, logged = io.StringIO(), []
    ctx = PassContext(progress=True, log=logged.append)
    PassManager([LinearToMatmul(), Cleanup()], print_ir_after_all=True, out=out).run(capture(TwoLayer(), (X,)), ctx)
    text = out.getvalue()
    assert text.index("// -----// IR after linear-to-matmul //----- //\nfunc @forward(") < \
        text.index("// -----// IR after cleanup //----- //")
    assert "aten.matmul(%relu_1, %t)" in text
    assert logged[0].startswith("[1/2] linear-to-matmul: matched 2, rewritten 2, skipped 0")


def test_dump_dir_holds_ir_and_dot_per_pass(tmp_path):
    PassManager(build_pipeline("cleanup"), dump_dir=tmp_path / "dump").run(capture(TwoLayer(), (X,)))
    names = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert names == ["00-input.dot", "00-input.mlir", "01-cleanup.dot", "01-cleanup.mlir"]
    assert (tmp_path / "dump" / "01-cleanup.mlir").read_text().startswith("func @forward(")
    assert (tmp_path / "dump" / "01-cleanup.dot").read_text().startswith('digraph "forward" {')


def test_stats_and_pass_declarations():
    stats = PassStats(3, 2, [Skip("layers.0.fc1", "rule", "why")], {"dead_nodes": 1})
    assert stats.to_dict() == {"matched": 3, "rewritten": 2, "extra": {"dead_nodes": 1},
                               "skipped": [{"where": "layers.0.fc1", "rule": "rule", "reason": "why"}]}
    assert stats.summary() == "matched 3, rewritten 2, skipped 1, dead_nodes 1"
    assert Explode.option_types() == {"level": int} and Cleanup.option_types() == {}
    assert all(cls.name == name for name, cls in PASSES.items())
    with pytest.raises(Exception):
        Explode().level = 3  # passes are frozen
