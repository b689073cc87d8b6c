"""How prune-nm chooses the kept N of every M: magnitude, Wanda or SparseGPT.

    magnitude   top-N |W| per group; needs no data
    wanda       top-N |W_ij| * ||X_j||_2 per group (nm/wanda.py)
    sparsegpt   OBS mask + update of the kept weights from H = X^T X (nm/sparsegpt.py)

The data-driven methods run the captured graph over the calibration batches
(`ctx.calibration`, flat tensors in placeholder order, like
`ctx.example_inputs`), layer by layer (nm/layerwise.py); without
calibration they use the example inputs, and say so. A matrix that saw no
calibration row (an expert no token was routed to) has no statistics: it is
pruned by magnitude, and the rows each matrix saw are kept for the report.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from sparsecc.runtime.nm_format import nm_mask

from ..calibration import calibration_batches
from ..manager import PassContext
from .layerwise import LayerTarget, prune_layerwise
from .sparsegpt import HessianStats, sparsegpt_prune
from .wanda import WandaStats

METHODS = ("magnitude", "wanda", "sparsegpt")


def magnitude_prune(weight: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """(pruned weight, kept mask): the N largest |w| of every M along the last dim."""
    mask = nm_mask(weight.abs(), n, m)
    return weight.masked_fill(~mask, 0), mask


def prune_calibrated(options, gm: torch.fx.GraphModule, ctx: PassContext, targets: list[LayerTarget],
                     tokens: dict[str, list[int]]) -> tuple[dict[str, tuple[Tensor, Tensor]], str]:
    """weight attribute -> (pruned weight, kept mask) for `options.method`, and the calibration source.
    `tokens` receives, per weight attribute, the calibration rows each of its matrices saw."""
    batches, source = calibration_batches(ctx, "prune-nm")
    n, m = options.n, options.m

    def prune(target: LayerTarget, weight: Tensor, inputs: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
        stats_cls = WandaStats if options.method == "wanda" else HessianStats
        stats = stats_cls(weight.shape[1], weight.device)
        for columns in inputs:
            stats.observe(columns)
        tokens.setdefault(target.weight.target, []).append(stats.tokens)
        if stats.tokens == 0:
            return magnitude_prune(weight, n, m)
        if options.method == "wanda":
            return stats.prune(weight, n, m)
        return sparsegpt_prune(weight, stats.hessian(), n, m, options.percdamp, options.blocksize, target.layer)

    return prune_layerwise(gm, batches, targets, prune, _progress(ctx, options.method)), source


def _progress(ctx: PassContext, method: str):
    if not ctx.progress:
        return None
    return partial(tqdm, desc=f"prune-nm {method}", unit="layer", leave=False, mininterval=0)   # a layer is slow: show each
