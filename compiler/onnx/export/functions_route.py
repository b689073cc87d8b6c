"""Function bodies of the token-routing ops in standard ONNX: TopK for route, GatherND / ScatterND for the rows.

    route(scores [B, S], capacity)      TopK of the K largest (NaN as -inf), then the K positions
                                        sorted ascending (a second TopK, smallest first)
    route_gather(x [B|1, S, ...], idx)  GatherND with batch_dims=1 (x shared: Gather on x[0])
    unroute(residual, rows, idx)        ScatterND of rows at (b, idx[b, k]) into residual

K is static: `kept_tokens(S, capacity)` of the op itself, so S must be static; the batch may be
a symbolic dim (the bodies read it with Shape).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from sparsecc.runtime.kernels.cpu.route import kept_tokens

from .body import Body
from .spec import CallSpec


def _kept(spec: CallSpec) -> int:
    """K of a route node: fixed by its compiled sequence length."""
    seq = spec.operand(0).shape[1]
    if isinstance(seq, int):
        return kept_tokens(seq, spec.attrs["capacity"])
    raise ValueError(f"the routed token count K = kept_tokens(S, capacity) is fixed by the compiled "
                     f"sequence length, and scores {list(spec.operand(0).shape)} have the dynamic length "
                     f"{seq!r}; compile with a static sequence dim")


def route_function(spec: CallSpec):
    kept = _kept(spec)
    b = Body("route", spec.key(), ["scores"], ["capacity"], spec.opset)
    scores = b.op("Cast", "scores", to=TensorProto.FLOAT)
    scores = b.op("Where", b.op("IsNaN", scores), b.const(-np.inf, np.float32), scores)
    _, top = b.op("TopK", scores, b.ints(kept), axis=-1, largest=1, sorted=1, outputs=2)
    positions, _ = b.op("TopK", b.op("Cast", top, to=TensorProto.FLOAT), b.ints(kept), axis=-1, largest=0,
                        sorted=1, outputs=2)  # positions < 2**24: exact in float32
    return b.finish([b.op("Cast", positions, to=TensorProto.INT64)])


def route_gather_function(spec: CallSpec):
    x_batch, batch = spec.operand(0).shape[0], spec.operand(1).shape[0]   # ints or symbolic names
    b = Body("route_gather", spec.key(), ["x", "indices"], [], spec.opset)
    if x_batch == 1 and batch != 1:  # one table (rotary cos/sin) read for every sequence
        out = b.op("Gather", b.op("Squeeze", "x", b.ints(0)), "indices", axis=0)
    else:
        out = b.op("GatherND", "x", b.op("Unsqueeze", "indices", b.ints(-1)), batch_dims=1)
    return b.finish([out])


def unroute_function(spec: CallSpec):
    b = Body("unroute", spec.key(), ["residual", "rows", "indices"], [], spec.opset)
    shape = b.op("Shape", "indices")                                    # [B, K]; B may be symbolic
    batch = b.op("Squeeze", b.op("Slice", shape, b.ints(0), b.ints(1)), b.ints(0))
    sequence = b.op("Expand", b.op("Unsqueeze", b.op("Range", b.const(0), batch, b.const(1)), b.ints(1)), shape)
    where = b.op("Concat", b.op("Unsqueeze", sequence, b.ints(-1)), b.op("Unsqueeze", "indices", b.ints(-1)),
                 axis=-1)  # [B, K, 2] = (b, position)
    rows = b.op("Cast", "rows", to=spec.operand(0).elem_type)
    return b.finish([b.op("ScatterND", "residual", where, rows)])
