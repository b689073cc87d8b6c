"""FakeTensor plumbing: the graph's own fake mode, attribute lookup, fake arguments of a node."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

from sparsecc.passes.fake import fake_args_of, graph_fake_mode, resolve_attr, to_fake

from .helpers import TinyLinear, capture


def test_fake_args_come_from_meta_and_real_constants():
    gm = capture(TinyLinear(), (torch.randn(2, 8),))
    mode = graph_fake_mode(gm)
    linear = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert mode is linear.meta["val"].fake_mode
    (x, weight, bias), kwargs = fake_args_of(gm, linear, mode)
    assert kwargs == {} and all(isinstance(t, FakeTensor) and t.fake_mode is mode for t in (x, weight, bias))
    assert tuple(weight.shape) == (4, 8) and x is linear.args[0].meta["val"]


def test_resolve_attr_and_to_fake():
    gm = capture(TinyLinear(), (torch.randn(2, 8),))
    assert resolve_attr(gm, "l.weight") is gm.l.weight and resolve_attr(gm, "l.nothing") is None
    fake = to_fake(torch.ones(3), graph_fake_mode(gm))
    assert isinstance(fake, FakeTensor) and tuple(fake.shape) == (3,) and to_fake(5, graph_fake_mode(gm)) == 5
