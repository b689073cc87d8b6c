"""Error of a compiled model's outputs against a reference."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from sparsecc.passes.numerics import relative_error as tensor_relative_error


def relative_error(outputs: Any, reference: Any) -> float:
    """Largest relative L2 error ||y - y_ref|| / ||y_ref|| over the floating-point output tensors."""
    worst = 0.0
    for got, want in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(reference)):
        if isinstance(want, torch.Tensor) and want.is_floating_point():
            worst = max(worst, tensor_relative_error(got, want))
    return worst
