"""The prune-nm rule for `aten.conv2d` with a constant weight: N:M along the im2col reduction dim.

A weight W [out, C, kh, kw] is read as the matrix W.reshape(out, C*kh*kw),
whose columns are ordered like the rows of `F.unfold(x)` (channel, then
kernel row, then kernel column); each group of M consecutive columns keeps N.
The layer becomes `sparsecc::nm_conv2d` (im2col + the N:M matmul). Grouped and
depthwise convolutions are skipped: their reduction dim is C/groups*kh*kw per
group, and one compressed matrix cannot hold the block-diagonal weight.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.fx import Node

from .fake import resolve_attr
from .layerwise import LayerTarget
from .match import AnyArg, Const, Match, Op, Var
from .records import RewriteRecord
from .rewrite import CheckResult, Rewriter, fail, ok

if TYPE_CHECKING:
    from .prune_nm import _NMRewrite

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


class ConvRule:
    """Check, replace and calibration target of the conv2d rule, sharing prune-nm's compressed weights."""

    def __init__(self, owner: "_NMRewrite"):
        self.owner = owner

    def check(self, m: Match, ctx) -> CheckResult:
        result = self._check(m)
        return result if result else fail(result.reason, where=_layer(m))

    def _check(self, m: Match) -> CheckResult:
        from .prune_nm import _layouts_of
        opts = self.owner.options
        chosen = opts.selects(_layer(m))
        if not chosen:
            return chosen
        w = resolve_attr(self.owner.gm, m["w"].target)
        if w.dim() != 4 or not w.is_floating_point():
            return fail(f"conv weight is {w.dim()}-D {w.dtype}; nm_conv2d needs a 4-D floating-point weight")
        groups = conv_params(m.node)["groups"]
        if groups != 1:
            kind = "depthwise" if groups == w.shape[0] and w.shape[1] == 1 else "grouped"
            return fail(f"{kind} convolution (groups={groups}): its reduction dim is per group, so one N:M "
                        "matrix cannot hold it; kept dense")
        if any(layout is None for layout in _layouts_of(m["w"]).values()):
            return fail("conv weight is also used by another op; pruning it would change that use too")
        k = w[0].numel()
        if k % opts.m:
            return fail(f"reduction dim C*kh*kw = {k} is not divisible by M={opts.m} (pattern {opts.n}:{opts.m})")
        x = m["x"].meta["val"]
        if x.dtype != w.dtype:
            return fail(f"input dtype {x.dtype} differs from weight dtype {w.dtype}")
        return ok()

    def target(self, m: Match) -> LayerTarget:
        w = resolve_attr(self.owner.gm, m["w"].target)
        shape, p = tuple(w.shape), conv_params(m.node)

        def columns(x: torch.Tensor) -> torch.Tensor:
            x = x if x.dim() == 4 else x.unsqueeze(0)
            cols = F.unfold(x, shape[2:], dilation=p["dilation"], padding=p["padding"], stride=p["stride"])
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])

        return LayerTarget(node=m.node, x=m["x"], weight=m["w"], layer=_layer(m), columns=columns,
                           to_matrix=lambda t: t.reshape(shape[0], -1), from_matrix=lambda t: t.reshape(shape))

    def replace(self, m: Match, rw: Rewriter) -> Node:
        opts, p = self.owner.options, conv_params(m.node)
        w = resolve_attr(self.owner.gm, m["w"].target)
        matrix = w.reshape(w.shape[0], -1)
        values, indices = self.owner.compress(m["w"].target, matrix, rw)
        out = rw.call(torch.ops.sparsecc.nm_conv2d.default, m["x"], values, indices, m.get("b"), opts.n, opts.m,
                      matrix.shape[1], list(w.shape[2:]), p["stride"], p["padding"], p["dilation"])
        self.owner.ctx.records.append(self._record(m, w, values, indices))
        return out

    def _record(self, m: Match, w: torch.Tensor, values: Node, indices: Node) -> RewriteRecord:
        gm, n, mm = self.owner.gm, self.owner.options.n, self.owner.options.m
        v, i = resolve_attr(gm, values.target), resolve_attr(gm, indices.target)
        out = m.node.meta["val"]
        positions = _hint(out.numel()) // w.shape[0]
        flops = 2 * positions * w.numel()
        return RewriteRecord(
            layer=_layer(m), op="sparsecc.nm_conv2d", source_op="aten.conv2d", pattern=f"{n}:{mm}",
            shape=[w.shape[0], w[0].numel()], params_before=w.numel(), params_after=v.numel(),
            bytes_before=w.numel() * w.element_size(),
            bytes_after=v.numel() * v.element_size() + i.numel() * i.element_size(),
            flops_before=flops, flops_after=flops * n // mm,
            details={"weight": m["w"].target, "values": values.target, "indices": indices.target, "n": n, "m": mm,
                     "in_features": w[0].numel(), "transposed": False, "weight_shape": list(w.shape),
                     **self.owner.method_details()})


def _layer(m: Match) -> str:
    return m["w"].target.rpartition(".")[0] or m["w"].target


def _hint(size) -> int:
    return int(size) if isinstance(size, int) else int(size.node.hint)
