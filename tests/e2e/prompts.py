"""Prompts for the generation tests: random ids in [3, 128), left-padded to the longest."""
from __future__ import annotations

import torch


def left_padded(lengths: tuple[int, ...] = (5, 9), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [len(lengths), max(lengths)]: row r holds lengths[r] tokens at the right, zeros before."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, 128, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask
