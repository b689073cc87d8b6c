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
