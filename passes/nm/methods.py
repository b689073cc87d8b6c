"""How prune-nm chooses the kept N of every M: magnitude, Wanda or SparseGPT.

    magnitude   top-N |W| per group; needs no data
    wanda       top-N |W_ij| * ||X_j||_2 per group (passes/wanda.py)
    sparsegpt   OBS mask + update of the kept weights from H = X^T X (passes/sparsegpt.py)

The data-driven methods run the captured graph over the calibration batches
(`ctx.calibration`, flat tensors in placeholder order, like
`ctx.example_inputs`), layer by layer (passes/layerwise.py); without
calibration they use the example inputs, and say so.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from sparsecc.runtime.nm_format import nm_mask

from .layerwise import LayerTarget, prune_layerwise
from .manager import PassContext
from .sparsegpt import HessianStats, sparsegpt_prune
from .wanda import WandaStats

METHODS = ("magnitude", "wanda", "sparsegpt")
NO_CALIBRATION = "example inputs (no calibration given)"


def magnitude_prune(weight: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """(pruned weight, kept mask): the N largest |w| of every M along the last dim."""
    mask = nm_mask(weight.abs(), n, m)
    return weight.masked_fill(~mask, 0), mask


def calibration_batches(ctx: PassContext) -> tuple[list[tuple], str]:
    """The batches the data-driven methods observe, and a line saying where they came from."""
    if ctx.calibration is None:
        return [tuple(ctx.example_inputs)], NO_CALIBRATION
    batches = [tuple(batch) for batch in ctx.calibration]
    if not batches:
        raise ValueError("prune-nm: calibration is empty; pass at least one batch or None")
    tokens = "" if not batches[0] else f" of {list(batches[0][0].shape)}"
    return batches, f"calibration: {len(batches)} batch(es){tokens}"


def prune_calibrated(options, gm: torch.fx.GraphModule, ctx: PassContext,
                     targets: list[LayerTarget]) -> tuple[dict[str, tuple[Tensor, Tensor]], str]:
    """weight attribute -> (pruned [out, K] weight, kept mask) for `options.method`, and the calibration source."""
    batches, source = calibration_batches(ctx)
    n, m = options.n, options.m

    def prune(target: LayerTarget, weight: Tensor, inputs: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
        stats_cls = WandaStats if options.method == "wanda" else HessianStats
        stats = stats_cls(weight.shape[1], weight.device)
        for columns in inputs:
            stats.observe(columns)
        if options.method == "wanda":
            return stats.prune(weight, n, m)
        return sparsegpt_prune(weight, stats.hessian(), n, m, options.percdamp, options.blocksize, target.layer)

    return prune_layerwise(gm, batches, targets, prune, _progress(ctx, options.method)), source


def _progress(ctx: PassContext, method: str):
    if not ctx.progress:
        return None
    from functools import partial
    from tqdm import tqdm
    return partial(tqdm, desc=f"prune-nm {method}", unit="layer", leave=False)
