"""A compact picture of a block layout for the report: one string per query block row.

Each character is a key block of batch 0, head 0: "0" absent (never visited),
"1" partial (visited under the per-element mask), "2" full (visited unmasked).
Layouts wider or taller than `limit` blocks are pooled to at most limit x limit
cells: a cell is "2" when every block in it is full, "0" when none is visited,
else "1".
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.runtime.attention_layout import Layout, block_states

PICTURE_LIMIT = 64   # cells per side: the report draws it, a JSON reader reads it


def block_picture(layout: Sequence[Tensor], limit: int = PICTURE_LIMIT) -> list[str]:
    """The picture of the first four outputs of a layout op (kv/full num_blocks and indices)."""
    full, partial = block_states(Layout(*layout[:4]))
    states = (full.long() * 2 + partial.long())[0, 0].float()   # [NQ, NK]
    nq, nk = states.shape
    pool = (-(-nq // limit), -(-nk // limit))
    if pool != (1, 1):
        cells = states[None, None]
        high = F.max_pool2d(cells, pool, ceil_mode=True)[0, 0]
        low = -F.max_pool2d(-cells, pool, ceil_mode=True)[0, 0]
        states = torch.where(low == 2, 2.0, torch.where(high == 0, 0.0, 1.0))
    return ["".join(str(int(v)) for v in row) for row in states.tolist()]


__all__ = ["PICTURE_LIMIT", "block_picture"]
