"""Where the CPU attention kernel reads the elements of partial blocks from: one interface, three sources.

    causal  j <= i + Skv - S                                     (no mask, no rule: the op's default)
    mask    a bool [Bm, Hm, S, Skv] tensor
    rule    AND_a rows[a, b, i] op_a cols[a, b, j]  (`sparsecc.runtime.attention_rule`; heads share it)

A source answers two questions, never by building an S x Skv tensor itself:

    values(flat_heads [O, I], rows [E, R], cols [E, C])  ->  bool [E, O|1, I|1, R, C]
        the elements at those query rows and key columns for the flat query heads (b * Hq + h)
    diagonals(block, shift, count)  ->  bool [Bm, Hm, count]
        is the aligned diagonal block (qb, qb + shift) exactly the causal triangle, qb < count?
        (where it is, ATen's flash kernel serves the block on its own causal path)
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ...attention_layout import as_4d
from ...attention_rule import rule_elements


class CausalSource(NamedTuple):
    seq: int
    keys: int

    def values(self, flat_heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        return (cols[:, None, :] <= rows[:, :, None] + (self.keys - self.seq))[:, None, None]

    def diagonals(self, block: int, shift: int, count: int) -> Tensor:
        return torch.ones(1, 1, count, dtype=torch.bool)


class MaskSource(NamedTuple):
    mask: Tensor  # bool [Bm, Hm, S, Skv]
    heads: int    # query heads per batch row of q

    def values(self, flat_heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        zero = torch.zeros(1, 1, dtype=torch.long, device=rows.device)
        mask_b = flat_heads // self.heads if self.mask.shape[0] > 1 else zero  # the mask's own broadcasting
        mask_h = flat_heads % self.heads if self.mask.shape[1] > 1 else zero
        return self.mask[mask_b[None, :, :, None, None], mask_h[None, :, :, None, None],
                         rows[:, None, None, :, None], cols[:, None, None, None, :]]

    def diagonals(self, block: int, shift: int, count: int) -> Tensor:
        """One strided view of the mask's diagonal blocks compared with the triangle, no gather."""
        mask = self.mask
        s0, s1, s2, s3 = mask.stride()
        diagonal = mask.as_strided((*mask.shape[:2], count, block, block), (s0, s1, block * (s2 + s3), s2, s3),
                                   mask.storage_offset() + shift * block * s3)
        return (diagonal == _triangle(block, mask.device)).flatten(-2).all(-1)


class RuleSource(NamedTuple):
    rows: Tensor  # int64 [A, Bm, S]
    cols: Tensor  # int64 [A, Bm, Skv]
    ops: str
    heads: int

    def values(self, flat_heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        # a rule shared by the batch (Bm = 1) is evaluated once for every head, not per head
        batches = flat_heads // self.heads if self.rows.shape[1] > 1 else flat_heads.new_zeros(1, 1)
        return rule_elements(self.rows, self.cols, self.ops, batches[None, :, :, None, None],
                             rows[:, None, None, :, None], cols[:, None, None, None, :])

    def diagonals(self, block: int, shift: int, count: int) -> Tensor:
        """The rule over the count diagonal blocks only: O(Bm * count * block^2) = O(Bm * S * block)."""
        device = self.rows.device
        within = torch.arange(block, device=device)
        starts = torch.arange(count, device=device)[:, None] * block
        q_pos, k_pos = (starts + within)[:, :, None], (starts + shift * block + within)[:, None, :]
        batches = torch.arange(self.rows.shape[1], device=device)[:, None, None, None]
        visible = rule_elements(self.rows, self.cols, self.ops, batches, q_pos[None], k_pos[None])
        return (visible == _triangle(block, device)).flatten(-2).all(-1)[:, None]   # [Bm, 1, count]


MaskSourceT = Union[CausalSource, MaskSource, RuleSource]


def _triangle(block: int, device) -> Tensor:
    return torch.ones(block, block, dtype=torch.bool, device=device).tril()


def mask_source(mask: Optional[Tensor], rule: Optional[tuple[Tensor, Tensor, str]], seq: int, keys: int,
                heads: int) -> MaskSourceT:
    """The source a call names: its mask, else its rule (rows, cols, ops), else the causal rule."""
    if mask is not None:
        return MaskSource(as_4d(mask), heads)
    if rule is not None:
        return RuleSource(*rule, heads)
    return CausalSource(seq, keys)
