"""cleanup: dead nodes go, duplicate constants merge, unread attributes are deleted, numerics unchanged."""
from __future__ import annotations

import torch
from torch import nn

from sparsecc.passes.cleanup import Cleanup, content_hash
from sparsecc.passes.manager import PassContext
from sparsecc.passes.rewriter import Rewriter
from sparsecc.passes.verify import verify_graph

from .helpers import call_targets, capture

X = torch.randn(2, 8)


class _Scaled(nn.Module):
    """Two equal scale buffers, a different one, an unused buffer and an unused computation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale_a", torch.full((8,), 2.0))
        self.register_buffer("scale_b", torch.full((8,), 2.0))
        self.register_buffer("scale_c", torch.full((8,), 3.0))
        self.register_buffer("unused", torch.zeros(3))

    def forward(self, x):
        _ = x.sin()
        h = self.fc(x).float()
        return h * self.scale_a + h * self.scale_b + x * self.scale_c


def test_cleanup_removes_dead_merges_and_deletes():
    model = _Scaled().eval()
    gm = capture(model, (X,))
    kept = gm.scale_a
    assert "aten.sin" in call_targets(gm)
    result = Cleanup().run(gm, PassContext())
    extra = result.stats.extra
    assert result.modified and extra["constants_merged"] == 1 and extra["constants_removed"] == 2
    assert extra["dead_nodes"] >= 2  # the sin and the unused buffer's get_attr
    assert "aten.sin" not in call_targets(gm) and "aten._assert_tensor_metadata" in call_targets(gm)  # impure stays
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert sorted(targets) == ["fc.bias", "fc.weight", "scale_a", "scale_c"]
    assert not hasattr(gm, "scale_b") and not hasattr(gm, "unused") and gm.scale_a is kept
    assert torch.equal(kept, torch.full((8,), 2.0)) and torch.equal(model.scale_b, torch.full((8,), 2.0))
    gm.recompile()
    verify_graph(gm)
    torch.testing.assert_close(gm(X), model(X))


def test_same_target_get_attrs_merge_and_second_run_is_a_no_op():
    model = _Scaled().eval()
    gm = capture(model, (X,))
    linear = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    linear.args = (linear.args[0], Rewriter(gm, linear).get_constant("fc.weight"), linear.args[2])
    Cleanup().run(gm, PassContext())
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"].count("fc.weight") == 1
    again = Cleanup().run(gm, PassContext())
    assert not again.modified and again.stats.extra == {"dead_nodes": 0, "constants_merged": 0,
                                                        "constants_removed": 0}
    gm.recompile()
    torch.testing.assert_close(gm(X), model(X))


def test_content_hash_depends_on_bytes_only():
    a = torch.arange(6.0).reshape(2, 3)
    assert content_hash(a) == content_hash(a.clone()) == content_hash(a.t().contiguous().t().contiguous())
    assert content_hash(a) != content_hash(a + 1) and content_hash(torch.tensor(True)) != content_hash(torch.tensor(False))


def test_parameter_never_merges_into_an_equal_buffer():
    """A default BatchNorm has weight == running_var and bias == running_mean; merging them broke batch norm."""
    import sparsecc

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU()).eval()
    x = torch.randn(1, 8, 8, 8)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4")
    assert compiled.report().error_vs_reference < 1e-5
