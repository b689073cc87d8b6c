"""`sparsecc::block_layout`: the block layout a boolean attention mask implies, computed where the mask lives.

    mask [Bm, Hm, S, Skv] bool (or [S, Skv], [Bm, S, Skv])
    -> kv_num_blocks [Bm, Hm, NQ], kv_indices [Bm, Hm, NQ, NK],
       full_num_blocks [Bm, Hm, NQ], full_indices [Bm, Hm, NQ, NK]      (int32)

with NQ = ceil(S / block_q), NK = ceil(Skv / block_k); the format is defined in
`sparsecc.runtime.attention_layout`. The sparse-attention rewrite inserts it in
front of `sparsecc::block_attention` so the layout follows the model's own mask
on every call, at the cost of one pass over the mask. Same code on every device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..attention_layout import layout_from_mask
from .registry import OpDef


@torch.library.custom_op("sparsecc::block_layout", mutates_args=())
def block_layout(mask: Tensor, block_q: int, block_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(layout_from_mask(mask, block_q, block_k))


def block_layout_kernel(mask: Tensor, block_q: int, block_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(layout_from_mask(mask, block_q, block_k))


@block_layout.register_fake
def _(mask, block_q, block_k):
    leading = [1] * (4 - mask.dim()) + list(mask.shape[:-2])
    nq, nk = math.ceil(mask.shape[-2] / block_q), math.ceil(mask.shape[-1] / block_k)
    counts = mask.new_empty(*leading, nq, dtype=torch.int32)
    indices = mask.new_empty(*leading, nq, nk, dtype=torch.int32)
    return counts, indices, counts.clone(), indices.clone()


def block_size_problem(block_q: int, block_k: int) -> Optional[str]:
    """Block sizes the kernels tile by: powers of two from 16 (64 and 128 are the tuned ones)."""
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(size, int) or size < 16 or size & (size - 1):
            return f"{name}={size} must be a power of two >= 16"
    return None


def verify_block_layout(mask: Tensor, block_q: int, block_k: int) -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found."""
    if mask.dtype != torch.bool or not 2 <= mask.dim() <= 4:
        return f"mask {mask.dtype}{list(mask.shape)} must be bool [Bm, Hm, S, Skv]"
    return block_size_problem(block_q, block_k)


def _samples() -> list[tuple]:
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    padding = torch.rand(2, 1, 24, 50) > 0.3
    return [(causal[None, None], 16, 16), (padding, 16, 32), (causal[:8], 32, 16)]


BLOCK_LAYOUT = OpDef(name="block_layout", op=torch.ops.sparsecc.block_layout.default,
                     kernels={"torch": block_layout_kernel, "triton": block_layout_kernel},
                     verify=verify_block_layout, attrs=("block_q", "block_k"), samples=_samples)
