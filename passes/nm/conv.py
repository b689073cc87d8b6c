"""The prune-nm rule for `aten.conv2d` with a constant weight: N:M along the im2col reduction dim.

A weight W [out, C, kh, kw] is read as the matrix W.reshape(out, C*kh*kw),
whose columns are ordered like the rows of `F.unfold(x)` (channel, then
kernel row, then kernel column); each group of M consecutive columns keeps N.
The layer becomes `sparsecc::nm_conv2d` (im2col + the N:M matmul). Grouped and
depthwise convolutions are skipped: their reduction dim is C/groups*kh*kw per
group, and one compressed matrix cannot hold the block-diagonal weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import Node

from ..match import AnyArg, Const, Match, Op, Var
from ..rewrite import CheckResult, fail, ok
from ..rewriter import Rewriter
from .compressed import layer_path
from .layerwise import LayerTarget
from .linear import layouts_of
from .records import nm_record, size_hint
from .rule import NMRule

aten = torch.ops.aten
# conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1); string padding is another overload.
CONV_PATTERN = Op(aten.conv2d.default, Var("x"), Const("w"), Var("b", optional=True),
                  AnyArg(), AnyArg(), AnyArg(), AnyArg())
_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def conv_params(node: Node) -> dict:
    """stride/padding/dilation as [h, w] lists and groups, from the node's args, kwargs and schema defaults."""
    params = dict(_DEFAULTS)
    params.update(zip(_DEFAULTS, node.args[3:]))
    params.update({k: v for k, v in node.kwargs.items() if k in _DEFAULTS})
    for key in ("stride", "padding", "dilation"):
        value = params[key]
        params[key] = [int(v) for v in value] * (2 // len(value)) if isinstance(value, (list, tuple)) else [int(value)] * 2
    return params


class ConvRule(NMRule):
    """Check, replace and calibration target of the conv2d rule."""
    rule_name, pattern = "nm-conv2d", CONV_PATTERN

    def weight_problem(self, m: Match) -> CheckResult:
        opts = self.weights.options
        w = self.weights.stored(m["w"])
        if w.dim() != 4 or not w.is_floating_point():
            return fail(f"conv weight is {w.dim()}-D {w.dtype}; nm_conv2d needs a 4-D floating-point weight")
        groups = conv_params(m.node)["groups"]
        if groups != 1:
            kind = "depthwise" if groups == w.shape[0] and w.shape[1] == 1 else "grouped"
            return fail(f"{kind} convolution (groups={groups}): its reduction dim is per group, so one N:M "
                        "matrix cannot hold it; kept dense")
        if any(layout is None for layout in layouts_of(m["w"]).values()):
            return fail("conv weight is also used by another op; pruning it would change that use too")
        k = w[0].numel()
        if k % opts.m:
            return fail(f"reduction dim C*kh*kw = {k} is not divisible by M={opts.m} (pattern {opts.n}:{opts.m})")
        x = m["x"].meta["val"]
        if x.dtype != w.dtype:
            return fail(f"input dtype {x.dtype} differs from weight dtype {w.dtype}")
        return ok()

    def targets(self, m: Match) -> list[LayerTarget]:
        shape, p, x = tuple(self.weights.stored(m["w"]).shape), conv_params(m.node), m["x"]

        def columns(values: dict, _: int) -> torch.Tensor:
            image = values[x] if values[x].dim() == 4 else values[x].unsqueeze(0)
            cols = F.unfold(image, shape[2:], dilation=p["dilation"], padding=p["padding"], stride=p["stride"])
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])

        return [LayerTarget(node=m.node, weight=m["w"], layer=layer_path(m["w"]), columns=columns,
                            to_matrix=lambda t: t.reshape(shape[0], -1), from_matrix=lambda t: t.reshape(shape))]

    def replace(self, m: Match, rw: Rewriter) -> Node:
        opts, p = self.weights.options, conv_params(m.node)
        w = self.weights.stored(m["w"])
        matrix = w.reshape(w.shape[0], -1)
        values, indices = self.weights.compress(m["w"].target, matrix, rw)
        out = rw.call(torch.ops.sparsecc.nm_conv2d.default, m["x"], values, indices, m.get("b"), opts.n, opts.m,
                      matrix.shape[1], list(w.shape[2:]), p["stride"], p["padding"], p["dilation"])
        self.weights.ctx.records.append(self._record(m, w, values, indices))
        return out

    def _record(self, m: Match, w: torch.Tensor, values: Node, indices: Node):
        positions = size_hint(m.node.meta["val"].numel()) // w.shape[0]
        details = self.weights.layer_details(m["w"], values, indices, w[0].numel(), False)
        return nm_record(self.weights.gm, layer=layer_path(m["w"]), op="sparsecc.nm_conv2d", source_op="aten.conv2d",
                         n=self.weights.options.n, m=self.weights.options.m, shape=[w.shape[0], w[0].numel()],
                         dense=[w], compressed=[(values, indices)], flops=2 * positions * w.numel(),
                         details={**details, "weight_shape": list(w.shape)})
