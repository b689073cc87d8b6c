"""Calibration batches for the data-driven pruning methods (Wanda, SparseGPT).

`compile(..., calibration=batches)` takes an iterable of example inputs, each
with the structure of `example_inputs` (a tuple of positional arguments, or a
lone tensor). Each batch is flattened like the example inputs into the
captured graph's placeholders, so the passes run the captured graph on it
(ONNX-imported graphs included) and never hook the user's model.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.utils import _pytree as pytree

from .capture import normalize_inputs
from .errors import ConfigError


def calibration_inputs(calibration: Optional[Iterable], in_spec: pytree.TreeSpec,
                       example_kwargs: Optional[dict] = None) -> Optional[list[tuple]]:
    """The batches as flat tensor tuples in placeholder order; None when no calibration was given."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, dict, str)) or not hasattr(calibration, "__iter__"):
        raise ConfigError(f"calibration: expected an iterable of batches shaped like example_inputs "
                          f"(e.g. a list of tuples), got {type(calibration).__name__}")
    batches = [_flat_batch(index, batch, in_spec, example_kwargs or {}) for index, batch in enumerate(calibration)]
    if not batches:
        raise ConfigError("calibration: the iterable gave no batches")
    return batches


def _flat_batch(index: int, batch: Any, in_spec: pytree.TreeSpec, kwargs: dict) -> tuple:
    try:
        args = normalize_inputs(batch)
    except ConfigError as err:
        raise ConfigError(f"calibration batch {index}: {err}") from None
    leaves, spec = pytree.tree_flatten((args, kwargs))
    if spec != in_spec:
        raise ConfigError(f"calibration batch {index} has structure {spec}, but the example inputs have "
                          f"{in_spec}; every batch must be shaped like example_inputs")
    return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
