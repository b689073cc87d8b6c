"""Compressed storage for N:M sparse weights.

A weight ``W [..., K]`` (linear layout: rows are output features, K is the
reduction dim) is N:M sparse when every group of M consecutive elements along
K, ``W[..., g*M : (g+1)*M]``, holds at most N nonzeros (N < M, M in {4, 8, 16},
K % M == 0). It is stored as two tensors with the same leading dims:

``values  [..., K*N/M]``  same dtype as W. Group g owns ``values[..., g*N:(g+1)*N]``:
    its kept elements in ascending position order. A group with fewer than N
    nonzeros still stores N entries: zeros at unused, distinct positions, so
    the layout stays regular.
``indices [..., ceil(K*N/M * BITS / 8)]``  uint8. ``BITS = ceil(log2 M)`` (2 for
    M=4, 3 for M=8, 4 for M=16). The in-group position (0..M-1) of the j-th
    stored value of a row occupies bits ``[j*BITS, (j+1)*BITS)`` of that row's
    little-endian bit stream: bit b of the stream is bit ``b % 8`` (bit 0 = LSB)
    of byte ``b // 8``. Tail bits of the last byte are zero.

Example, 2:4, one row ``[0, a, 0, b]``: values ``[a, b]``, positions 1 and 3,
indices byte ``0b1101``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

NM_GROUP_SIZES = (4, 8, 16)


def check_nm(n: int, m: int) -> None:
    """Raise ValueError unless n:m is a supported pattern (1 <= n < m, m in {4, 8, 16})."""
    if m not in NM_GROUP_SIZES:
        raise ValueError(f"N:M pattern {n}:{m}: M must be one of {NM_GROUP_SIZES}")
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern {n}:{m}: N must satisfy 1 <= N < M")


def index_bits(m: int) -> int:
    """Bits per stored in-group position: ceil(log2 m)."""
    return math.ceil(math.log2(m))


def nm_index_bytes(k: int, n: int, m: int) -> int:
    """Bytes of packed positions per row of a K-wide weight."""
    return -(-(k * n // m) * index_bits(m) // 8)


def nm_compressed_bytes(rows: int, k: int, n: int, m: int, dtype: torch.dtype) -> int:
    """Total bytes of values + packed indices for a [rows, k] weight."""
    value_bytes = k * n // m * dtype.itemsize
    return rows * (value_bytes + nm_index_bytes(k, n, m))


def _check_k(k: int, m: int) -> None:
    if k % m != 0:
        raise ValueError(f"N:M sparsity needs K divisible by M: K={k}, M={m}")


def _groups(t: Tensor, m: int) -> Tensor:
    """View [..., K] as [..., K/M, M]."""
    _check_k(t.shape[-1], m)
    return t.reshape(*t.shape[:-1], t.shape[-1] // m, m)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Bool mask keeping the top-n scores of every group of m along the last dim.

    Ties go to the lower position (a stable descending sort), so the mask is
    deterministic for constant or repeated scores.
    """
    check_nm(n, m)
    groups = _groups(scores, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(scores.shape)


def _stored_positions(kept: Tensor, n: int, m: int) -> Tensor:
    """[..., G, M] kept flags -> [..., G, N] ascending positions: kept ones, padded by unkept ones."""
    position = torch.arange(m, device=kept.device)
    rank = torch.where(kept, position, position + m)  # kept positions sort first
    chosen = torch.sort(rank, dim=-1).values[..., :n] % m
    return torch.sort(chosen, dim=-1).values


def _chunk(bits: int) -> tuple[int, int]:
    """(positions, bytes) in the smallest whole-byte chunk of the bit stream."""
    chunk_bits = math.lcm(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def pack_positions(positions: Tensor, m: int) -> Tensor:
    """[..., J] positions in [0, m) -> [..., ceil(J*BITS/8)] uint8 bit stream."""
    bits = index_bits(m)
    per_chunk, chunk_bytes = _chunk(bits)
    j = positions.shape[-1]
    padded = torch.nn.functional.pad(positions.to(torch.int32), (0, -j % per_chunk))
    chunks = padded.reshape(*padded.shape[:-1], -1, per_chunk)
    shifts = torch.arange(per_chunk, device=positions.device, dtype=torch.int32) * bits
    words = (chunks << shifts).sum(-1, dtype=torch.int32, keepdim=True)
    byte_shifts = torch.arange(chunk_bytes, device=positions.device, dtype=torch.int32) * 8
    stream = ((words >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)
    return stream[..., : -(-j * bits // 8)]


@functools.lru_cache(maxsize=None)
def _byte_positions(bits: int, device: torch.device) -> Tensor:
    """[256, 8/bits] int64: the positions packed in each possible byte (bits dividing 8)."""
    byte = torch.arange(256, device=device)
    shifts = torch.arange(0, 8, bits, device=device)
    return (byte[:, None] >> shifts) & (2**bits - 1)


def _unpack_words(indices: Tensor, bits: int) -> Tensor:
    """Positions that straddle bytes (3 bits): rebuild whole-byte chunks as int32 words."""
    per_chunk, chunk_bytes = _chunk(bits)
    padded = torch.nn.functional.pad(indices.to(torch.int32), (0, -indices.shape[-1] % chunk_bytes))
    chunks = padded.reshape(*padded.shape[:-1], -1, chunk_bytes)
    byte_shifts = torch.arange(chunk_bytes, device=indices.device, dtype=torch.int32) * 8
    words = (chunks << byte_shifts).sum(-1, dtype=torch.int32, keepdim=True)
    shifts = torch.arange(per_chunk, device=indices.device, dtype=torch.int32) * bits
    return ((words >> shifts) & (2**bits - 1)).flatten(-2).long()


def unpack_positions(indices: Tensor, count: int, m: int) -> Tensor:
    """Inverse of pack_positions: [..., bytes] uint8 -> [..., count] int64 positions."""
    bits = index_bits(m)
    if 8 % bits:
        return _unpack_words(indices, bits)[..., :count]
    table = _byte_positions(bits, indices.device)  # one lookup per byte beats shift/mask passes
    positions = table.index_select(0, indices.reshape(-1).to(torch.int32))
    return positions.reshape(*indices.shape[:-1], -1)[..., :count]


def compress_nm(weight: Tensor, n: int, m: int, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """[..., K] N:M sparse weight (or any weight plus a `mask` of kept elements) -> (values, indices)."""
    check_nm(n, m)
    if weight.is_meta:   # a weight without values (a model planned on the meta device): the shapes alone
        _check_k(weight.shape[-1], m)
        rows, k = weight.shape[:-1], weight.shape[-1]
        return (weight.new_empty(*rows, k * n // m),
                torch.empty(*rows, nm_index_bytes(k, n, m), dtype=torch.uint8, device="meta"))
    kept = weight != 0 if mask is None else mask.to(torch.bool)
    if kept.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(kept.shape)} != weight shape {tuple(weight.shape)}")
    kept = _groups(kept, m)
    if bool((kept.sum(-1) > n).any()):
        what = "mask keeps" if mask is not None else "weight has"
        raise ValueError(f"not {n}:{m} sparse: {what} more than {n} elements in some group of {m}; "
                         f"prune it first (nm_mask) or pass mask=")
    positions = _stored_positions(kept, n, m)
    kept_weight = _groups(weight, m).masked_fill(~kept, 0)
    values = kept_weight.gather(-1, positions).flatten(-2)
    return values, pack_positions(positions.flatten(-2), m)


def decompress_nm(values: Tensor, indices: Tensor, n: int, m: int, k: int,
                  out: Optional[Tensor] = None) -> Tensor:
    """(values [..., K*N/M], indices) -> dense [..., K] weight, zero outside the kept elements.

    `out`, when given, is a [..., K] buffer (any contents) written in place and returned.
    """
    check_nm(n, m)
    _check_k(k, m)
    if values.shape[-1] != k * n // m:
        raise ValueError(f"values have {values.shape[-1]} columns, expected K*N/M = {k * n // m}")
    positions = unpack_positions(indices, values.shape[-1], m)
    dense = values.new_zeros(*values.shape[:-1], k) if out is None else out.zero_()
    groups = dense.view(*values.shape[:-1], k // m, m)
    groups.scatter_(-1, _groups(positions, n), _groups(values, n).to(dense.dtype))
    return dense


CHECK_POSITIONS_PER_STEP = 1 << 22  # positions decoded at once when checking: bounds the int64 temporary at 32 MiB


def nm_index_problem(indices: Tensor, n: int, m: int, in_features: int) -> Optional[str]:
    """None when `indices [..., nm_index_bytes]` is a valid packed index tensor of n:m over in_features
    (uint8, exact width, every position < M, the N positions of each group distinct, tail bits zero),
    else the first problem found. Reads the data: vectorised, a bounded number of rows at a time."""
    width = nm_index_bytes(in_features, n, m)
    if indices.dtype != torch.uint8:
        return f"indices dtype {indices.dtype} must be torch.uint8"
    if indices.dim() < 1 or indices.shape[-1] != width:
        return f"indices {list(indices.shape)} must be {width} bytes wide ({n}:{m} over in_features={in_features})"
    rows = indices.reshape(-1, width)
    step = max(1, CHECK_POSITIONS_PER_STEP // max(1, in_features * n // m))
    for start in range(0, rows.shape[0], step):
        problem = _index_rows_problem(rows[start:start + step], start, n, m, in_features)
        if problem:
            return problem
    return None


def _index_rows_problem(rows: Tensor, first_row: int, n: int, m: int, in_features: int) -> Optional[str]:
    """nm_index_problem's data checks over rows [R, width] that start at row `first_row`."""
    count = in_features * n // m
    positions = unpack_positions(rows, count, m)
    if positions.numel() and int(positions.max()) >= m:  # unreachable while BITS = log2(M); kept for safety
        row = int((positions >= m).any(-1).nonzero()[0])
        return f"indices row {first_row + row} holds a position >= M={m}"
    groups = positions.reshape(rows.shape[0], in_features // m, n)
    ascending = bool((groups[..., 1:] > groups[..., :-1]).all())  # as compress_nm stores them: distinct, no sort
    ordered = groups if ascending else groups.sort(-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
    if bool(repeated.any()):
        row, group = (int(i) for i in repeated.nonzero()[0])
        return f"indices row {first_row + row} stores a position twice in group {group} (N positions must differ)"
    used_bits = count * index_bits(m) % 8
    if used_bits and bool((rows[:, -1] >> used_bits).any()):
        row = int((rows[:, -1] >> used_bits).nonzero()[0])
        return f"indices row {first_row + row} has nonzero tail bits after its last position"
    return None


def nm_index_problem_once(indices: Tensor, n: int, m: int, in_features: int) -> Optional[str]:
    """nm_index_problem, remembered on the tensor when it passes (keyed by pattern, storage, shape and
    version counter): a kernel decodes a constant weight's positions on its first call only. An
    inference tensor has no version counter, so nothing proves it unchanged: it is checked every call."""
    version = tensor_version(indices)
    key = (n, m, in_features, indices.data_ptr(), tuple(indices.shape), version)
    if version is not None and getattr(indices, "_sparsecc_nm_checked", None) == key:
        return None
    problem = nm_index_problem(indices, n, m, in_features)
    if problem is None:
        indices._sparsecc_nm_checked = key
    return problem


def tensor_version(t: Tensor) -> Optional[int]:
    """The in-place version counter; None for inference tensors, which have none (and which nothing outside
    inference mode can change in place)."""
    try:
        return t._version
    except RuntimeError:
        return None


def nm_weight_problem(values: Tensor, indices: Tensor, n: int, m: int, in_features: int,
                      check_data: bool) -> Optional[str]:
    """None when (values, indices) hold an n:m weight [..., in_features] in the layout above, else why not.
    Shapes, dtypes and the pattern always; the packed positions too when `check_data` (once per tensor)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m, in_features)):
        return f"n={n!r}, m={m!r}, in_features={in_features!r} must be integers"
    try:
        check_nm(n, m)
    except ValueError as err:
        return str(err)
    if in_features <= 0 or in_features % m:
        return f"in_features={in_features} must be a positive multiple of M={m}"
    if values.dim() < 1 or values.shape[-1] != in_features * n // m or not values.dtype.is_floating_point:
        return f"values {values.dtype}{list(values.shape)} must be floating [..., in_features*N/M = {in_features * n // m}]"
    if indices.dtype != torch.uint8:
        return f"indices dtype {indices.dtype} must be torch.uint8"
    width = nm_index_bytes(in_features, n, m)
    if list(indices.shape) != [*values.shape[:-1], width]:
        return f"indices {list(indices.shape)} must be {[*values.shape[:-1], width]}"
    return nm_index_problem_once(indices, n, m, in_features) if check_data else None
