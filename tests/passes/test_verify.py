"""The verifier accepts captured graphs and names the node and the problem in broken ones."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from sparsecc.passes.verify import VerificationError, verify_graph

from .helpers import TinyLinear, capture
from .sparse_ops import nm_linear_graph

aten = torch.ops.aten


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


@pytest.fixture
def gm():
    return capture(TinyLinear(), (torch.randn(2, 8),))


class _Dynamic(nn.Module):
    """View with SymInt arithmetic, a split, a dtype cast and a data-dependent nonzero."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.fc(x).view(b * t, 4)
        a, c = h.split(2, dim=-1)
        return (a * 2 + c).reshape(b, t, 2), h.half(), h.nonzero()


def test_captured_graphs_verify(gm):
    verify_graph(gm)
    dynamic = capture(_Dynamic(), (torch.randn(2, 3, 8),), dynamic_shapes=({0: Dim("b"), 1: Dim("t")},))
    verify_graph(dynamic)


def test_wrong_meta_shape_names_node_expected_and_got(gm):
    linear = _node(gm, aten.linear.default)
    linear.meta["val"] = _node(gm, "l.weight").meta["val"]  # f32[4,8] instead of f32[2,4]
    with pytest.raises(VerificationError) as info:
        verify_graph(gm)
    message = str(info.value)
    assert "%linear" in message and "expected f32[2,4], got f32[4,8]" in message and info.value.node == "linear"


def test_a_change_after_a_passing_check_is_still_caught(gm):
    """Nodes whose inputs are the objects their last check saw are not re-run: any change re-runs them."""
    verify_graph(gm)
    linear = _node(gm, aten.linear.default)
    linear.meta["val"] = _node(gm, "l.weight").meta["val"]          # its own val replaced
    with pytest.raises(VerificationError, match="expected f32"):
        verify_graph(gm)
    fresh = capture(TinyLinear(), (torch.randn(2, 8),))
    verify_graph(fresh)
    fresh.l.weight = nn.Parameter(torch.zeros(4, 3))                  # a constant it reads replaced
    with pytest.raises(VerificationError):
        verify_graph(fresh)
    again = capture(TinyLinear(), (torch.randn(2, 8),))
    verify_graph(again)
    linear = _node(again, aten.linear.default)
    linear.args = (linear.args[0], linear.args[0], *linear.args[2:])   # an argument rewired
    with pytest.raises(VerificationError):
        verify_graph(again)


def test_what_a_check_saw_is_not_kept_alive(gm):
    """The record of a passing check refers to the weights weakly: a weight the graph no longer reads (a
    layer rewritten to a compressed one) is freed."""
    import gc
    import weakref
    verify_graph(gm)
    old = weakref.ref(gm.l.weight)
    gm.l.weight = nn.Parameter(torch.zeros(4, 8))
    gc.collect()
    assert old() is None
    verify_graph(gm)   # and the replaced weight's node is checked again, against the new one


def test_wrong_meta_dtype_is_caught(gm):
    linear = _node(gm, aten.linear.default)
    linear.meta["val"] = linear.meta["val"].to(torch.float16)
    with pytest.raises(VerificationError, match=r"expected f32\[2,4\], got f16\[2,4\]"):
        verify_graph(gm)


def test_dangling_get_attr(gm):
    del gm.l.bias
    with pytest.raises(VerificationError, match="get_attr target 'l.bias' does not exist"):
        verify_graph(gm)


def test_constant_disagreeing_with_its_meta(gm):
    gm.l.bias = nn.Parameter(torch.zeros(5))
    with pytest.raises(VerificationError, match=r"attribute 'l.bias': expected f32\[5\], got f32\[4\]"):
        verify_graph(gm)


def test_missing_meta_val(gm):
    del _node(gm, aten.linear.default).meta["val"]
    with pytest.raises(VerificationError, match=r"%linear .* has no meta\['val'\]"):
        verify_graph(gm)


def test_disallowed_targets(gm):
    linear = _node(gm, aten.linear.default)
    linear.target = aten.linear
    with pytest.raises(VerificationError, match="overload packet"):
        verify_graph(gm)
    linear.target = torch.nn.functional.linear
    with pytest.raises(VerificationError, match="neither an OpOverload nor an allowed Python operator"):
        verify_graph(gm)


def test_aten_overloads_outside_the_runtime_table_are_refused(gm):
    linear = _node(gm, aten.linear.default)
    linear.target = aten._reshape_alias.default   # any overload the runtime's op table leaves out
    with pytest.raises(VerificationError, match=r"%linear .*_reshape_alias.default in module l is outside the op "
                                                r"table: the sparsecc runtime cannot run it"):
        verify_graph(gm)


def test_call_module_nodes_are_rejected():
    gm = torch.export.export(TinyLinear(), (torch.randn(2, 8),), strict=False).module()  # keeps _guards_fn
    with pytest.raises(VerificationError, match="call_module nodes are not part of the IR"):
        verify_graph(gm)


def test_ops_that_no_longer_accept_their_inputs(gm):
    linear = _node(gm, aten.linear.default)
    x, weight, bias = linear.args
    linear.args = (x, bias, weight)
    with pytest.raises(VerificationError, match="re-running on the recorded input types failed"):
        verify_graph(gm)


def test_lint_failure_is_a_verification_error(gm):
    linear = _node(gm, aten.linear.default)
    output = _node(gm, "output")
    linear.args = (output,) + linear.args[1:]
    with pytest.raises(VerificationError, match="lint"):
        verify_graph(gm)


def test_sparse_op_runs_its_registry_verifier():
    verify_graph(nm_linear_graph())
    with pytest.raises(VerificationError, match="sparsecc::nm_linear verifier: indices dtype"):
        verify_graph(nm_linear_graph(indices_dtype=torch.int8))
