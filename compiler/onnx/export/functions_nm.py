"""Function bodies of the N:M ops in standard ONNX: unpack the index bit stream, scatter, matmul.

The packed positions (layout: `sparsecc.runtime.nm_format`) are read in whole-byte
chunks: a chunk of `chunk_bytes` bytes holds `per_chunk` positions of BITS bits,
so  word = sum_b byte_b * 256**b  and  position_i = (word // 2**(BITS*i)) % 2**BITS,
all in int32 (a chunk is at most 3 bytes).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, numpy_helper
from sparsecc.runtime.nm_format import index_bits, nm_index_bytes

from .body import Body
from .spec import CallSpec


def _chunk(bits: int) -> tuple[int, int]:
    chunk_bits = math.lcm(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def positions(b: Body, indices: str, rows: int, n: int, m: int, k: int) -> str:
    """[rows, K/M, N] int64 in-group positions of a [.., index bytes] uint8 stream."""
    bits = index_bits(m)
    per_chunk, chunk_bytes = _chunk(bits)
    stored, nbytes = k * n // m, nm_index_bytes(k, n, m)
    chunks = -(-nbytes // chunk_bytes)
    idx = b.op("Reshape", b.op("Cast", indices, to=TensorProto.INT32), b.ints(rows, nbytes))
    if chunks * chunk_bytes != nbytes:
        idx = b.op("Pad", idx, b.ints(0, 0, 0, chunks * chunk_bytes - nbytes))
    idx = b.op("Reshape", idx, b.ints(rows, chunks, chunk_bytes))
    scale = b.const([256 ** i for i in range(chunk_bytes)], np.int32)
    word = b.op("ReduceSum", b.op("Mul", idx, scale), b.ints(2), keepdims=1)
    shifted = b.op("Div", word, b.const([2 ** (bits * i) for i in range(per_chunk)], np.int32))
    pos = b.op("Mod", shifted, b.const(2 ** bits, np.int32))
    pos = b.op("Reshape", pos, b.ints(rows, chunks * per_chunk))
    pos = b.op("Slice", pos, b.ints(0), b.ints(stored), b.ints(1))
    return b.op("Reshape", b.op("Cast", pos, to=TensorProto.INT64), b.ints(rows, k // m, n))


def decompress(b: Body, values: str, indices: str, spec: CallSpec, slot: int) -> str:
    """Dense [..., K] weight from values [..., K*N/M] (operand `slot` of the call) and its packed indices."""
    n, m, k = spec.attrs["n"], spec.attrs["m"], spec.attrs["in_features"]
    operand = spec.operand(slot)
    lead = operand.static(f"{spec.op} node '{spec.node}': values")[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    pos = positions(b, indices, rows, n, m, k)
    vals = b.op("Reshape", values, b.ints(rows, k // m, n))
    zero = numpy_helper.from_array(np.zeros(1, dtype=operand.np_dtype), "zero")
    zeros = b.op("ConstantOfShape", b.ints(rows, k // m, m), value=zero)
    dense = b.op("ScatterElements", zeros, pos, vals, axis=2)
    return b.op("Reshape", dense, b.ints(*lead, k))


def nm_decompress_function(spec: CallSpec):
    """sparsecc::nm_decompress(values, indices) -> dense."""
    b = Body("nm_decompress", spec.key(), ["values", "indices"], ["n", "m", "in_features"], spec.opset)
    return b.finish([decompress(b, "values", "indices", spec, 0)])


def nm_linear_function(spec: CallSpec):
    """sparsecc::nm_linear(x, values, indices, bias?) = x @ decompress(values, indices).T (+ bias)."""
    has_bias = spec.operand(3) is not None
    inputs = ["x", "values", "indices"] + (["bias"] if has_bias else [])
    b = Body("nm_linear", spec.key(), inputs, ["n", "m", "in_features"], spec.opset)
    dense = decompress(b, "values", "indices", spec, 1)
    y = b.op("MatMul", "x", b.op("Transpose", dense, perm=[1, 0]))
    return b.finish([b.op("Add", y, "bias") if has_bias else y])


def nm_conv2d_function(spec: CallSpec):
    """sparsecc::nm_conv2d: Conv(x, decompress(values, indices).reshape(out, C, kh, kw), bias)."""
    a = spec.attrs
    has_bias = spec.operand(3) is not None
    inputs = ["x", "values", "indices"] + (["bias"] if has_bias else [])
    b = Body("nm_conv2d", spec.key(), inputs, sorted(a), spec.opset)
    out_channels = spec.operand(1).static(f"nm_conv2d node '{spec.node}': values")[0]
    kh, kw = a["kernel_size"]
    weight = b.op("Reshape", decompress(b, "values", "indices", spec, 1),
                  b.ints(out_channels, a["in_features"] // (kh * kw), kh, kw))
    batched = spec.operand(0).rank == 4
    x = "x" if batched else b.op("Unsqueeze", "x", b.ints(0))
    pads = list(a["padding"]) * 2
    y = b.op("Conv", x, weight, *(["bias"] if has_bias else []), kernel_shape=[kh, kw],
             strides=list(a["stride"]), pads=pads, dilations=list(a["dilation"]))
    return b.finish([y if batched else b.op("Squeeze", y, b.ints(0))])
