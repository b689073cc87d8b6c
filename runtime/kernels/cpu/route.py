"""CPU kernels for token routing: pick the kept tokens, gather their rows, put rows back.

Layout shared by the three ops: a tensor [B, S, *rest] is viewed as B*S rows of
D = prod(rest) values; `indices` [B, K] int64 holds, per sequence, the
positions of the kept tokens in increasing order, so row b*S + indices[b, k]
is the k-th kept token of sequence b. A tensor with B = 1 is shared by every
sequence (rotary tables): its rows are read at indices[b, k] for each b.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def kept_tokens(seq_len: int, capacity: float) -> int:
    """K = ceil(capacity * S), at least 1 and at most S; static for a given S.

    The product is rounded to 6 decimals first so 0.7 * 10 = 7.000000000000001 keeps 7, not 8."""
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be in (0, 1], got {capacity}")
    return min(seq_len, max(1, math.ceil(round(capacity * seq_len, 6))))


def route_cpu(scores: Tensor, capacity: float) -> Tensor:
    """indices [B, K] int64: per row of scores [B, S], the K largest, in increasing position order.

    NaN scores count as -inf (never preferred). Ties go to topk's choice."""
    kept = kept_tokens(scores.shape[-1], capacity)
    scores = torch.nan_to_num(scores.float(), nan=-math.inf)
    if kept == scores.shape[-1]:
        return torch.arange(kept, device=scores.device).expand(scores.shape[0], kept).contiguous()
    top = scores.topk(kept, dim=-1, sorted=False).indices
    return top.sort(dim=-1).values


def flat_rows(indices: Tensor, seq_len: int, shared: bool) -> Tensor:
    """[B*K] row numbers into a [B*S, D] (or, shared, [S, D]) view."""
    if shared:
        return indices.reshape(-1)
    offsets = torch.arange(indices.shape[0], device=indices.device)[:, None] * seq_len
    return (indices + offsets).reshape(-1)


def route_gather_cpu(x: Tensor, indices: Tensor) -> Tensor:
    """x [B or 1, S, *rest] -> [B, K, *rest]: the rows of the kept tokens."""
    batch, kept = indices.shape
    rows = x.reshape(x.shape[0] * x.shape[1], -1)
    picked = rows.index_select(0, flat_rows(indices, x.shape[1], x.shape[0] == 1 and batch != 1))
    return picked.reshape(batch, kept, *x.shape[2:])


def unroute_cpu(residual: Tensor, rows: Tensor, indices: Tensor) -> Tensor:
    """residual [B, S, *rest] with the rows [B, K, *rest] written at the kept positions (a copy)."""
    batch, seq = residual.shape[:2]
    out = residual.clone(memory_format=torch.contiguous_format)
    flat = out.view(batch * seq, -1)
    flat.index_copy_(0, flat_rows(indices, seq, False), rows.reshape(-1, flat.shape[1]).to(out.dtype))
    return out
