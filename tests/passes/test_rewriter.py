"""`Rewriter`: new calls get fake vals and provenance; new constants are buffers under the layer."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from sparsecc.passes.rewriter import RewriteError, Rewriter
from sparsecc.passes.verify import verify_graph

from .helpers import TinyLinear, capture

aten = torch.ops.aten


def _rewriter(gm):
    root = next(n for n in gm.graph.nodes if n.target == aten.linear.default)
    return Rewriter(gm, root), root


def test_call_infers_val_and_copies_provenance():
    gm = capture(TinyLinear(), (torch.randn(2, 8),))
    rw, root = _rewriter(gm)
    weight = next(n for n in gm.graph.nodes if n.target == "l.weight")
    t = rw.call(aten.t, weight)  # a packet resolves to .default
    assert t.target is aten.t.default and t.name == "t" and tuple(t.meta["val"].shape) == (8, 4)
    assert t.meta["nn_module_stack"] == root.meta["nn_module_stack"] and t.next is root
    assert rw.created == [t]


def test_call_with_wrong_arguments_names_the_op():
    gm = capture(TinyLinear(), (torch.randn(2, 8),))
    rw, _ = _rewriter(gm)
    weight = next(n for n in gm.graph.nodes if n.target == "l.weight")
    with pytest.raises(RewriteError, match="aten.mm.default"):
        rw.call(aten.mm.default, weight, weight)
    with pytest.raises(RewriteError, match="name the overload"):
        rw.call(aten.add, weight, weight)
    assert rw.created == []


def test_add_constant_nests_under_the_layer_with_unique_names():
    gm = capture(TinyLinear(), (torch.randn(2, 8),))
    rw, _ = _rewriter(gm)
    values = torch.randn(4, 4)
    first = rw.add_constant("l.weight_nm_values", values)
    second = rw.add_constant("l.weight_nm_values", values)
    assert (first.target, second.target) == ("l.weight_nm_values", "l.weight_nm_values_1")
    assert "weight_nm_values" in dict(gm.l.named_buffers()) and gm.l.weight_nm_values is not None
    assert tuple(first.meta["val"].shape) == (4, 4) and first.meta["val"].dtype == torch.float32
    assert rw.constant(first) is gm.l.weight_nm_values
    assert rw.get_constant("l.weight").target == "l.weight"
    verify_graph(gm)


def test_add_constant_creates_missing_modules_and_sanitizes():
    gm = capture(TinyLinear(), (torch.randn(2, 8),))
    rw, _ = _rewriter(gm)
    node = rw.add_constant("blocks.3.gate.table-2", torch.zeros(2))
    assert node.target == "blocks.3.gate.table_2" and isinstance(gm.get_submodule("blocks.3.gate"), torch.nn.Module)
    flat = rw.add_constant("l.weight.extra", torch.zeros(1))  # `l.weight` is a tensor, not a module
    assert flat.target == "l_weight_extra"
    with pytest.raises(RewriteError, match="not a tensor"):
        rw.get_constant("l")


def test_call_under_dynamic_shapes_keeps_symbols():
    gm = capture(TinyLinear(), (torch.randn(3, 8),), dynamic_shapes=({0: Dim("batch")},))
    rw, root = _rewriter(gm)
    x, w, b = root.args
    mm = rw.call(aten.matmul.default, x, rw.call(aten.t.default, w))
    out = rw.call(aten.add.Tensor, mm, b)
    assert str(out.meta["val"].shape[0]) == str(root.meta["val"].shape[0]) != "3"
    root.replace_all_uses_with(out)
    gm.graph.erase_node(root)
    verify_graph(gm)
