"""Function bodies of the token-routing ops in standard ONNX: TopK for route, GatherND / ScatterND for the rows.

    route(scores [B, S], capacity)      TopK of the K largest (NaN as -inf), then the K positions
                                        sorted ascending (a second TopK, smallest first)
    route_gather(x [B|1, S, ...], idx)  GatherND with batch_dims=1 (x shared: Gather on x[0])
    unroute(residual, rows, idx)        ScatterND of rows at (b, idx[b, k]) into residual

K is static: `kept_tokens(S, capacity)` of the op itself, so S must be static.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from sparsecc.runtime.kernels.cpu.route import kept_tokens

from .body import Body
from .spec import CallSpec


def route_function(spec: CallSpec):
    batch, seq = spec.operand(0).static(f"route node '{spec.node}': scores")
    kept = kept_tokens(seq, spec.attrs["capacity"])
    b = Body("route", spec.key(), ["scores"], ["capacity"], spec.opset)
    scores = b.op("Cast", "scores", to=TensorProto.FLOAT)
    scores = b.op("Where", b.op("IsNaN", scores), b.const(-np.inf, np.float32), scores)
    _, top = b.op("TopK", scores, b.ints(kept), axis=-1, largest=1, sorted=1, outputs=2)
    positions, _ = b.op("TopK", b.op("Cast", top, to=TensorProto.FLOAT), b.ints(kept), axis=-1, largest=0,
                        sorted=1, outputs=2)  # positions < 2**24: exact in float32
    return b.finish([b.op("Cast", positions, to=TensorProto.INT64)])


def route_gather_function(spec: CallSpec):
    x_batch = spec.operand(0).static(f"route_gather node '{spec.node}': x")[0]
    batch = spec.operand(1).static(f"route_gather node '{spec.node}': indices")[0]
    b = Body("route_gather", spec.key(), ["x", "indices"], [], spec.opset)
    if x_batch == 1 and batch != 1:  # one table (rotary cos/sin) read for every sequence
        out = b.op("Gather", b.op("Squeeze", "x", b.ints(0)), "indices", axis=0)
    else:
        out = b.op("GatherND", "x", b.op("Unsqueeze", "indices", b.ints(-1)), batch_dims=1)
    return b.finish([out])


def unroute_function(spec: CallSpec):
    batch, kept = spec.operand(2).static(f"unroute node '{spec.node}': indices")
    b = Body("unroute", spec.key(), ["residual", "rows", "indices"], [], spec.opset)
    sequence = b.op("Expand", b.op("Reshape", b.op("Range", b.const(0), b.const(batch), b.const(1)),
                                   b.ints(batch, 1)), b.ints(batch, kept))
    where = b.op("Concat", b.op("Unsqueeze", sequence, b.ints(-1)), b.op("Unsqueeze", "indices", b.ints(-1)),
                 axis=-1)  # [B, K, 2] = (b, position)
    rows = b.op("Cast", "rows", to=spec.operand(0).elem_type)
    return b.finish([b.op("ScatterND", "residual", where, rows)])
