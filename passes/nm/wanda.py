"""Wanda (Sun et al. 2023): score each weight by |W_ij| * ||X_j||_2 and keep the top N of every M.

X_j is input column j over every calibration token, so a small weight on a
column with large activations can outrank a larger weight on a quiet one.
The comparison stays inside each N:M group of a row, as for magnitude.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsecc.runtime.nm_format import nm_mask


class WandaStats:
    """Running sum of squares of each input column: ||X_j||_2^2 over the calibration tokens."""

    def __init__(self, columns: int, device: torch.device):
        self.sum_squares = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def observe(self, x: Tensor) -> None:
        """x [tokens, columns], one batch of the layer's (im2col'd) input."""
        self.sum_squares += x.double().square().sum(0)
        self.tokens += x.shape[0]

    def prune(self, weight: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
        """(pruned weight, kept mask) for weight [out, columns]; kept values are unchanged."""
        scores = weight.abs().double() * self.sum_squares.sqrt()[None, :]
        mask = nm_mask(scores, n, m)
        return weight.masked_fill(~mask, 0), mask
