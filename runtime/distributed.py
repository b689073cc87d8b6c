"""Expert parallelism over torch.distributed: which experts a rank holds, and the row exchange.

With W ranks and E experts (E % W == 0), rank r holds the contiguous experts
[r*E/W, (r+1)*E/W). Each rank routes its own tokens; the (token, expert)
pairs, sorted by expert, are therefore grouped by owning rank, so one
`all_to_all_single` sends each rank the rows of the pairs it owns (the row
counts are exchanged first, per expert, so the receiver knows each segment's
expert), and a second one returns the expert outputs in the order they left.

The process group is torch.distributed's default group (gloo on CPU, NCCL on
GPU), initialised by the caller (`torchrun` sets the environment;
`torch.distributed.init_process_group` reads it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import RuntimeProgramError


def expert_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the experts rank `rank` holds; uneven splits are refused."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise RuntimeProgramError(f"expert parallelism: rank {rank} is not in a world of {world_size}")
    if num_experts % world_size:
        raise RuntimeProgramError(f"expert parallelism: {num_experts} experts do not split evenly over "
                                  f"{world_size} ranks (E % world_size must be 0)")
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def dist_rank() -> Optional[int]:
    """This process's rank in the default process group, or None without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def group_rank(world_size: int) -> int:
    """This process's rank in the default process group, which must have `world_size` ranks."""
    rank = dist_rank()
    if rank is None:
        raise RuntimeProgramError(f"expert parallelism over {world_size} ranks needs an initialised "
                                  "torch.distributed process group (launch with torchrun and call "
                                  "torch.distributed.init_process_group)")
    if dist.get_world_size() != world_size:
        raise RuntimeProgramError(f"expert parallelism: the program was built for {world_size} ranks, the process "
                                  f"group has {dist.get_world_size()}")
    return rank


def exchange_counts(tokens_per_expert: Tensor, world_size: int) -> Tensor:
    """[W, E/W] counts of the pairs each rank sends to this rank's experts, from this rank's
    `tokens_per_expert` [E] (what it sends to every expert)."""
    received = torch.empty_like(tokens_per_expert)
    dist.all_to_all_single(received, tokens_per_expert.contiguous())
    return received.view(world_size, -1)


def exchange_rows(rows: Tensor, send_counts: list[int], receive_counts: list[int]) -> Tensor:
    """`rows` split by `send_counts` (one segment per rank, in rank order) sent out; the segments this
    rank receives, `receive_counts` rows from each rank, concatenated in rank order."""
    received = rows.new_empty((sum(receive_counts), *rows.shape[1:]))
    dist.all_to_all_single(received, rows.contiguous(), output_split_sizes=receive_counts,
                           input_split_sizes=send_counts)
    return received


__all__ = ["exchange_counts", "exchange_rows", "expert_range", "group_rank"]
