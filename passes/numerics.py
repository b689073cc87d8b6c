"""The one relative error every confirmation and report uses."""
from __future__ import annotations

import torch


def relative_error(got: torch.Tensor, want: torch.Tensor, same_nans: bool = False) -> float:
    """||got - want|| / ||want|| in float64 (the plain difference when want is all zeros).

    NaN anywhere makes the error NaN, unless `same_nans`: then NaNs must sit in the same
    places in both (else the error is inf) and are left out (attention rows that see no key).
    """
    got, want = got.detach().double(), want.detach().double()
    if same_nans:
        nan = torch.isnan(want)
        if not torch.equal(nan, torch.isnan(got)):
            return float("inf")
        got, want = got.masked_fill(nan, 0), want.masked_fill(nan, 0)
    scale = want.norm().item()
    diff = (got - want).norm().item()
    return diff / scale if scale > 0 else diff
