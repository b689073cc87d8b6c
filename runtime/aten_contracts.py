"""Size checks for allowlisted ATen ops whose kernels trust their arguments' sizes.

Most ops on the allowlist check their own indices and sizes; these do not (a
1-element `running_var` beside 20M channels is read past its end), so the load-time
fake run and the call guard check them on the argument shapes before the op runs.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def _per_channel(input_: Any, *per_channel: Any) -> Optional[str]:
    """Each per-channel tensor (weight, bias, running stats) has exactly C = input.shape[1] elements."""
    if not isinstance(input_, torch.Tensor) or input_.dim() < 2:
        return "the input needs at least 2 dims (N, C, ...)"
    channels = input_.shape[1]
    for position, tensor in enumerate(per_channel):
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.numel() != channels):
            size = tensor.numel() if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            return f"per-channel argument {position + 1} has {size} elements, the input has {channels} channels"
    return None


def _batch_norm_no_training(input_, weight, bias, running_mean, running_var, *_rest, **_kw) -> Optional[str]:
    return _per_channel(input_, weight, bias, running_mean, running_var)


CONTRACTS: dict[str, Callable[..., Optional[str]]] = {
    "aten::_native_batch_norm_legit_no_training.default": _batch_norm_no_training,
}


def contract_problem(qualname: str, args: tuple, kwargs: dict) -> Optional[str]:
    """Why `qualname` must not run on these arguments (shapes only), or None."""
    check = CONTRACTS.get(qualname)
    return None if check is None else check(*args, **kwargs)


__all__ = ["CONTRACTS", "contract_problem"]
