"""Calibration batches for the data-driven pruning methods (Wanda, SparseGPT).

`compile(..., calibration=batches)` takes an iterable of example inputs, each
with the structure of `example_inputs` (a tuple of positional arguments, or a
lone tensor). Each batch is flattened like the example inputs into the
captured graph's placeholders, so the passes run the captured graph on it
(ONNX-imported graphs included) and never hook the user's model. Each tensor
must match its placeholder's dtype, rank and static sizes (the placeholder's
FakeTensor holds a symbol where `dynamic_shapes` made a dim dynamic), so a
wrong batch is named here rather than failing deep inside a pass. The batch
dim (dim 0 of an input of rank >= 2) may differ: calibration sets often use
bigger batches than the example, and a graph that bakes the batch size in
fails naming the batch and the node (passes/nm/layerwise.py).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.utils import _pytree as pytree

from .capture import normalize_inputs
from .errors import ConfigError


def calibration_inputs(calibration: Optional[Iterable], in_spec: pytree.TreeSpec,
                       example_kwargs: Optional[dict] = None,
                       gm: Optional[torch.fx.GraphModule] = None) -> Optional[list[tuple]]:
    """The batches as flat tensor tuples in placeholder order; None when no calibration was given.
    With the captured `gm`, each tensor is checked against its placeholder's dtype and static shape."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, dict, str)) or not hasattr(calibration, "__iter__"):
        raise ConfigError(f"calibration: expected an iterable of batches shaped like example_inputs "
                          f"(e.g. a list of tuples), got {type(calibration).__name__}")
    batches = [_flat_batch(index, batch, in_spec, example_kwargs or {}) for index, batch in enumerate(calibration)]
    if not batches:
        raise ConfigError("calibration: the iterable gave no batches")
    expected = placeholder_values(gm) if gm is not None else []
    for index, batch in enumerate(batches):
        _check_batch(index, batch, expected)
    return batches


def placeholder_values(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The FakeTensor of each tensor placeholder, in order; empty when the graph recorded none."""
    values = [node.meta.get("val") for node in gm.graph.nodes if node.op == "placeholder"]
    if any(v is None for v in values):   # without every value the batch's tensors cannot be paired up
        return []
    return [v for v in values if isinstance(v, torch.Tensor)]


def _check_batch(index: int, batch: tuple, expected: list[torch.Tensor]) -> None:
    for position, (tensor, want) in enumerate(zip(batch, expected)):
        shape, want_shape = list(tensor.shape), [_dim(d) for d in want.shape]
        free = 1 if len(want_shape) >= 2 else 0   # the batch dim is not compared
        static_equal = all(not isinstance(w, int) or s == w for s, w in zip(shape[free:], want_shape[free:]))
        if len(shape) != len(want_shape) or not static_equal:
            raise ConfigError(f"calibration batch {index}: input {position} has shape {shape}, expected "
                              f"[{', '.join(map(str, want_shape))}] ({_dtype(want.dtype)})")
        if tensor.dtype != want.dtype:
            raise ConfigError(f"calibration batch {index}: input {position} has dtype {_dtype(tensor.dtype)}, "
                              f"expected {_dtype(want.dtype)} (shape [{', '.join(map(str, want_shape))}])")


def _dim(size: Any) -> Any:
    """A static size as an int; a dynamic one as its symbol's name (any size within its range is accepted)."""
    return size if isinstance(size, int) else str(size)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
