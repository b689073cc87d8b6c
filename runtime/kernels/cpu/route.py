"""CPU kernels for token routing: pick the kept tokens, gather their rows, put rows back.

Layout shared by the three ops: a tensor [B, S, *rest] is viewed as B*S rows of
D = prod(rest) values; `indices` [B, K] int64 holds, per sequence, the
positions of the kept tokens in increasing order, so row b*S + indices[b, k]
is the k-th kept token of sequence b. A tensor with B = 1 is shared by every
sequence (rotary tables): its rows are read at indices[b, k] for each b.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...token_routing import kept_tokens
from ..checks import refuse


def route_cpu(scores: Tensor, capacity: float) -> Tensor:
    """indices [B, K] int64: per row of scores [B, S], the K largest, in increasing position order.

    NaN scores count as -inf (never preferred). Ties go to topk's choice."""
    refuse("route", route_problem(scores, capacity))
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
    refuse("route_gather", route_gather_problem(x, indices, check_data=True))
    batch, kept = indices.shape
    rows = x.reshape(x.shape[0] * x.shape[1], -1)
    picked = rows.index_select(0, flat_rows(indices, x.shape[1], x.shape[0] == 1 and batch != 1))
    return picked.reshape(batch, kept, *x.shape[2:])


def unroute_cpu(residual: Tensor, rows: Tensor, indices: Tensor) -> Tensor:
    """residual [B, S, *rest] with the rows [B, K, *rest] written at the kept positions (a copy)."""
    refuse("unroute", unroute_problem(residual, rows, indices, check_data=True))
    batch, seq = residual.shape[:2]
    out = residual.clone(memory_format=torch.contiguous_format)
    flat = out.view(batch * seq, -1)
    flat.index_copy_(0, flat_rows(indices, seq, False), rows.reshape(-1, flat.shape[1]).to(out.dtype))
    return out


def route_problem(scores: Tensor, capacity: float) -> Optional[str]:
    """scores floating [B, S], capacity a number in (0, 1]."""
    if scores.dim() != 2 or not scores.is_floating_point():
        return f"scores {scores.dtype}{list(scores.shape)} must be floating point [B, S]"
    if not isinstance(capacity, (int, float)) or isinstance(capacity, bool) or not 0.0 < capacity <= 1.0:
        return f"capacity={capacity!r} must be in (0, 1]"
    return None


def indices_problem(indices: Tensor, batch: int, seq: int, check_data: bool) -> Optional[str]:
    """indices int64 [B, K], K <= S, a batch of 1 or B on the other side; with `check_data`, every index
    inside its own sequence, 0 <= index < S (one min/max reduction): no row of another sequence is reached."""
    if indices.dtype != torch.int64 or indices.dim() != 2:
        return f"indices {indices.dtype}{list(indices.shape)} must be int64 [B, K]"
    if indices.shape[1] > seq:
        return f"indices keep {indices.shape[1]} tokens of a sequence of {seq}"
    if batch not in (1, indices.shape[0]):
        return f"batch {batch} is neither 1 nor the indices' batch {indices.shape[0]}"
    if check_data and indices.numel():
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= seq:
            return f"indices span [{low}, {high}], outside their sequence's positions [0, {seq})"
    return None


def route_gather_problem(x: Tensor, indices: Tensor, check_data: bool) -> Optional[str]:
    if x.dim() < 2:
        return f"x {list(x.shape)} must be [B, S, ...]"
    return indices_problem(indices, x.shape[0], x.shape[1], check_data)


def unroute_problem(residual: Tensor, rows: Tensor, indices: Tensor, check_data: bool) -> Optional[str]:
    if residual.dim() < 2:
        return f"residual {list(residual.shape)} must be [B, S, ...]"
    problem = indices_problem(indices, residual.shape[0], residual.shape[1], check_data)
    if problem is None and residual.shape[0] != indices.shape[0]:
        problem = f"residual batch {residual.shape[0]} != indices batch {indices.shape[0]}"
    want = [indices.shape[0], indices.shape[1], *residual.shape[2:]]
    if problem is None and list(rows.shape) != want:
        problem = f"rows {list(rows.shape)} must be {want}"
    return problem
