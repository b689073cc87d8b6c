"""`sparsecc::block_layout`: the block layout a boolean attention mask implies, computed where the mask lives.

    mask [Bm, Hm, S, Skv] bool (or [S, Skv], [Bm, S, Skv])
    -> kv_num_blocks [L, NQ], kv_indices [L, NQ, NK], full_num_blocks [L, NQ], full_indices [L, NQ, NK]

(int32) with NQ = ceil(S / block_q), NK = ceil(Skv / block_k), L = (Bm, Hm), or
(B, Hq) of q for policy topk; the format is defined in
`sparsecc.runtime.attention_layout`. The sparse-attention rewrite inserts it in
front of `sparsecc::block_attention` so the layout follows the model's own mask
on every call. Same code on every device. The policy narrows the mask's layout,
never widens it (`sparsecc.runtime.attention_policies`):

    mask    the mask's layout, one pass over the mask
    window  blocks within `window` keys of the query's position plus the first `sinks`
            keys' blocks; reads the mask only there (O(S * window))
    topk    per query block the `topk` (fraction in (0, 1), or count >= 1) visible key blocks
            of highest pooled q . k score, from q [B, Hq, S, D] and k [B, Hkv, Skv, D];
            the diagonal and sink blocks always stay
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..attention_layout import layout_from_mask
from ..attention_policies import topk_layout_from_mask, window_layout_from_mask
from ..kernels.attention_contract import block_size_problem
from ..kernels.checks import refuse
from .registry import OpDef

POLICIES = ("mask", "window", "topk")


def block_layout_kernel(mask: Tensor, block_q: int, block_k: int, policy: str = "mask", window: int = 0,
                        sinks: int = 0, topk: float = 0.0, q: Optional[Tensor] = None,
                        k: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    refuse("block_layout", verify_block_layout(mask, block_q, block_k, policy, window, sinks, topk, q, k))
    if policy == "window":
        return tuple(window_layout_from_mask(mask, window, sinks, block_q, block_k))
    if policy == "topk":
        return tuple(topk_layout_from_mask(mask, q, k, topk, sinks, block_q, block_k))
    return tuple(layout_from_mask(mask, block_q, block_k))


@torch.library.custom_op("sparsecc::block_layout", mutates_args=())
def block_layout(mask: Tensor, block_q: int, block_k: int, policy: str = "mask", window: int = 0, sinks: int = 0,
                 topk: float = 0.0, q: Optional[Tensor] = None,
                 k: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return block_layout_kernel(mask, block_q, block_k, policy, window, sinks, topk, q, k)


@block_layout.register_fake
def _(mask, block_q, block_k, policy="mask", window=0, sinks=0, topk=0.0, q=None, k=None):
    leading = [1] * (4 - mask.dim()) + list(mask.shape[:-2])
    if policy == "topk" and q is not None:
        leading = list(q.shape[:2])
    nq, nk = math.ceil(mask.shape[-2] / block_q), math.ceil(mask.shape[-1] / block_k)
    counts = mask.new_empty(*leading, nq, dtype=torch.int32)
    indices = mask.new_empty(*leading, nq, nk, dtype=torch.int32)
    return counts, indices, counts.clone(), indices.clone()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def policy_problem(policy: str, window: int, sinks: int, topk: float) -> Optional[str]:
    """None when the policy and its parameters make sense, else why not."""
    if policy not in POLICIES:
        return f"policy {policy!r} is not one of {', '.join(POLICIES)}"
    if not _is_int(sinks) or sinks < 0:
        return f"sinks={sinks!r} must be an integer >= 0"
    if policy == "window" and (not _is_int(window) or window < 1):
        return f"window={window!r} must be an integer >= 1 (keys each query sees)"
    if not isinstance(topk, (int, float)) or isinstance(topk, bool) or not math.isfinite(topk):
        return f"topk={topk!r} must be a finite number"
    if policy == "topk" and not (0 < topk < 1 or (topk >= 1 and float(topk).is_integer())):
        return f"topk={topk!r} must be a fraction in (0, 1) or a whole number of blocks >= 1"
    return None


def _topk_operands_problem(mask: Tensor, q: Optional[Tensor], k: Optional[Tensor]) -> Optional[str]:
    if q is None or k is None:
        return "policy topk needs q and k"
    if q.dim() != 4 or k.dim() != 4 or k.shape[1] == 0 or q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3]:
        return f"q {list(q.shape)} and k {list(k.shape)} must be [B, Hq, S, D] and [B, Hkv, Skv, D], Hkv | Hq"
    lead = [1] * (4 - mask.dim()) + list(mask.shape[:-2])
    if list(mask.shape[-2:]) != [q.shape[2], k.shape[2]] or lead[0] not in (1, q.shape[0]) \
            or lead[1] not in (1, q.shape[1]):
        return f"mask {list(mask.shape)} does not match q {list(q.shape)} and k {list(k.shape)} ([1|B, 1|Hq, S, Skv])"
    return None


def verify_block_layout(mask: Tensor, block_q: int, block_k: int, policy: str = "mask", window: int = 0,
                        sinks: int = 0, topk: float = 0.0, q: Optional[Tensor] = None,
                        k: Optional[Tensor] = None) -> Optional[str]:
    """None when the call is well formed, else the first inconsistency found."""
    if mask.dtype != torch.bool or not 2 <= mask.dim() <= 4:
        return f"mask {mask.dtype}{list(mask.shape)} must be bool [Bm, Hm, S, Skv]"
    problem = block_size_problem(block_q, block_k) or policy_problem(policy, window, sinks, topk)
    if problem is None and policy == "topk":
        problem = _topk_operands_problem(mask, q, k)
    return problem


def _samples() -> list[tuple]:
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    padding = torch.rand(2, 1, 24, 50) > 0.3
    q, k = torch.randn(2, 4, 24, 8), torch.randn(2, 2, 50, 8)
    return [(causal[None, None], 16, 16), (padding, 16, 32), (causal[:8], 32, 16),
            (causal[None, None], 16, 16, "window", 20, 4), (padding, 16, 16, "topk", 0, 1, 0.5, q, k),
            (padding, 16, 16, "topk", 0, 0, 2.0, q, k)]


BLOCK_LAYOUT = OpDef(name="block_layout", op=torch.ops.sparsecc.block_layout.default,
                     kernels={"torch": block_layout_kernel, "triton": block_layout_kernel},
                     verify=verify_block_layout, attrs=("block_q", "block_k", "policy", "window", "sinks", "topk"),
                     samples=_samples)
