"""Error of a compiled model's outputs against a reference."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def relative_error(outputs: Any, reference: Any) -> float:
    """Largest relative L2 error ||y - y_ref|| / ||y_ref|| over the floating-point output tensors."""
    worst = 0.0
    for got, want in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(reference)):
        if not (isinstance(want, torch.Tensor) and want.is_floating_point()):
            continue
        want64, got64 = want.detach().double(), got.detach().double()
        scale = want64.norm().item()
        diff = (got64 - want64).norm().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
