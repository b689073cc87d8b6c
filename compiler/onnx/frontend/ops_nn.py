"""ONNX operators as torch code, part 3: matmuls, convolution, pooling, normalisation, attention
(calling convention: `op_table`).

A MatMul or Gemm whose B is a constant 2-D float becomes `F.linear` over a
weight stored [out, in] (the importer keeps it under the layer's name), the
form the prune-nm rules match.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _matmul(ctx, a, b):
    """F.linear for a constant 2-D B; aten.bmm for 3-D operands of one batch size (what
    torch.bmm captures as, e.g. per-token expert matmuls); else matmul's broadcasting rules."""
    weight = ctx.linear_weight(1)
    if weight is not None:
        return F.linear(a, weight)
    if a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return torch.matmul(a, b)


def _gemm(ctx, a, b, c=None):
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    a = a.t() if ctx.attr("transA", 0) else a
    weight = ctx.linear_weight(1, transposed=bool(ctx.attr("transB", 0)))
    if weight is not None and alpha == 1.0:
        return F.linear(a, weight, None if c is None else (c * beta if beta != 1.0 else c))
    b = b.t() if ctx.attr("transB", 0) else b
    y = torch.matmul(a, b) * alpha if alpha != 1.0 else torch.matmul(a, b)
    return y if c is None else y + (c * beta if beta != 1.0 else c)


def _spatial_pads(ctx, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [begin..., end...] for the node's auto_pad, computed from static shapes."""
    dims = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", "VALID"):
        return list(ctx.attr("pads", [0] * 2 * dims)) if auto == "NOTSET" else [0] * 2 * dims
    pads_begin, pads_end = [], []
    for i in range(dims):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
        small, large = total // 2, total - total // 2
        pads_begin.append(large if auto == "SAME_LOWER" else small)
        pads_end.append(small if auto == "SAME_LOWER" else large)
    return pads_begin + pads_end


def _torch_padding(x: torch.Tensor, pads: list[int], value: float) -> tuple[torch.Tensor, list[int]]:
    """(x padded where begin != end, the symmetric padding left for the torch op)."""
    dims = len(pads) // 2
    begin, end = pads[:dims], pads[dims:]
    if begin == end:
        return x, begin
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * dims


def _conv(ctx, x, w, b=None):
    dims = x.dim() - 2
    kernel = list(ctx.attr("kernel_shape", w.shape[2:]))
    strides, dilations = list(ctx.attr("strides", [1] * dims)), list(ctx.attr("dilations", [1] * dims))
    x, padding = _torch_padding(x, _spatial_pads(ctx, x, kernel, strides, dilations), 0.0)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(x, w, b, strides, padding, dilations, ctx.attr("group", 1))


def _explicit_pad(x: torch.Tensor, pads: list[int], value: float) -> torch.Tensor:
    dims = len(pads) // 2
    flat = []
    for b, e in zip(reversed(pads[:dims]), reversed(pads[dims:])):
        flat += [b, e]
    return F.pad(x, flat, value=value) if any(flat) else x


def _pool(ctx, x):
    """Pads applied explicitly (ONNX allows pads over half the kernel); average divisors by pooling a mask."""
    dims = x.dim() - 2
    kernel = list(ctx.attr("kernel_shape"))
    strides, dilations = list(ctx.attr("strides", [1] * dims)), list(ctx.attr("dilations", [1] * dims))
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise ValueError(f"{ctx.op_type} node '{ctx.node.name}': the Indices output is not supported")
    pads = _spatial_pads(ctx, x, kernel, strides, dilations)
    ceil = bool(ctx.attr("ceil_mode", 0))
    if ctx.op_type == "MaxPool":
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
        return pool(_explicit_pad(x, pads, float("-inf")), kernel, strides, 0, dilations, ceil_mode=ceil)
    if any(d != 1 for d in dilations):
        raise ValueError(f"AveragePool node '{ctx.node.name}': dilations are not supported")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
    window = math.prod(kernel)
    total = pool(_explicit_pad(x, pads, 0.0), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    inside = torch.ones_like(x[:1, :1])
    if ctx.attr("count_include_pad", 0):
        inside = _explicit_pad(inside, pads, 1.0)
        return total * window / (pool(inside, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True) * window)
    count = pool(_explicit_pad(inside, pads, 0.0), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return total / count


def _global_pool(ctx, x):
    dims = list(range(2, x.dim()))
    return x.mean(dims, keepdim=True) if ctx.op_type == "GlobalAveragePool" else x.amax(dims, keepdim=True)


def _batch_norm(ctx, x, scale, bias, mean, var):
    if ctx.attr("training_mode", 0):
        raise ValueError(f"BatchNormalization node '{ctx.node.name}': training_mode=1 is not supported")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, ctx.attr("epsilon", 1e-5))


def _layer_norm(ctx, x, scale, bias=None):
    axis = ctx.attr("axis", -1) % x.dim()
    eps = ctx.attr("epsilon", 1e-5)
    if len([o for o in ctx.node.output if o]) == 1:
        return F.layer_norm(x, x.shape[axis:], scale.expand(x.shape[axis:]),
                            None if bias is None else bias.expand(x.shape[axis:]), eps)
    dims = list(range(axis, x.dim()))
    stash = x.float() if ctx.attr("stash_type", 1) == 1 else x
    mean = stash.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(((stash - mean) ** 2).mean(dims, keepdim=True) + eps)
    y = ((stash - mean) * inv_std).to(x.dtype) * scale
    return (y if bias is None else y + bias), mean, inv_std


def _rms_norm(ctx, x, scale):
    axis = ctx.attr("axis", -1) % x.dim()
    return F.rms_norm(x, x.shape[axis:], scale.expand(x.shape[axis:]), ctx.attr("epsilon", 1e-5))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]; 4-D input is already [B, H, S, D]."""
    if x.dim() == 4:
        return x
    batch, seq, width = x.shape
    return x.reshape(batch, seq, heads, width // heads).transpose(1, 2)


def _attention(ctx, q, k, v, mask=None, past_key=None, past_value=None, *rest):
    """ONNX Attention (opset 23): scaled dot-product attention with GQA, masks and a KV cache."""
    if rest and any(r is not None for r in rest) or ctx.attr("softcap", 0.0) or ctx.attr("qk_matmul_output_mode", 0):
        raise ValueError(f"Attention node '{ctx.node.name}': softcap, qk_matmul_output_mode and "
                         "nonpad_kv_seqlen are not supported")
    three_d = q.dim() == 3
    q = _heads(q, ctx.attr("q_num_heads", 1))
    k, v = _heads(k, ctx.attr("kv_num_heads", 1)), _heads(v, ctx.attr("kv_num_heads", 1))
    if past_key is not None:
        k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    scale = ctx.attr("scale", None) or 1.0 / math.sqrt(q.shape[-1])
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], 1) if q.shape[1] != k.shape[1] else k
    values = v.repeat_interleave(q.shape[1] // v.shape[1], 1) if q.shape[1] != v.shape[1] else v
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if mask is not None:
        mask = mask[..., : scores.shape[-1]] if mask.shape[-1] > scores.shape[-1] else mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if ctx.attr("is_causal", 0):   # upper-left aligned, as the operator doc says
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    weights = torch.softmax(scores.float(), -1)
    weights = torch.where(torch.isnan(weights), 0.0, weights)   # a fully masked row attends to nothing
    y = torch.matmul(weights.to(q.dtype), values)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    outputs = [y, k, v][: len(ctx.node.output)]
    return tuple(outputs) if len(outputs) > 1 else y


NN_OPS: dict[str, Callable] = {
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool, "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm, "RMSNormalization": _rms_norm, "Attention": _attention,
}
