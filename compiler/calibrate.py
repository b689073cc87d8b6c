"""Calibration batches for the data-driven rewrites (Wanda, SparseGPT, calibrated token routers).

`compile(..., calibration=batches)` takes an iterable of example inputs, each
with the structure of `example_inputs` (a tuple of positional arguments, or a
lone tensor); keyword tensors come from `example_kwargs`. Each batch is
flattened like the example inputs into the captured graph's placeholders, so
the passes run the captured graph on it (ONNX-imported graphs included) and
never hook the user's model.

A batch may differ from the example in any dim (a bigger batch, shorter
sequences). A graph captured with static sizes may bake them into its
constants (expanded masks, `arange`, view shapes), so when some batch
differs, `capture_calibrated` captures the model again with the dims that
differ dynamic (`torch.export.Dim.AUTO`) and checks each batch against that
graph's placeholders (rank, dtype, static sizes, one size per symbol, the
symbol's range): an unusable batch is named with its input and dim here
rather than failing deep inside a pass. If both graphs have the same code, no
size was baked in and the static graph is kept (passes such as token-routing
need static sizes); otherwise the passes run the dynamic graph, which
computes every batch exactly as the model would, and the compiled program
accepts those sizes too. When every batch has the example's sizes, or the
user gave `dynamic_shapes`, there is one plain capture.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

import sympy
import torch
from torch.utils import _pytree as pytree

from .capture import Captured, capture, normalize_inputs
from .errors import CaptureError, ConfigError
from .model_call import split_constants

# input position -> the dims where some batch's size differs from the example's
FreeDims = dict[int, set[int]]


def capture_calibrated(model: torch.nn.Module, args: tuple, example_kwargs: Optional[dict], dynamic_shapes: Any,
                       calibration: Optional[Iterable]) -> tuple[Captured, Optional[list[tuple]]]:
    """Capture `model` so that every calibration batch runs through its graph; returns the capture and the
    batches as flat tensor tuples in placeholder order (None when no calibration was given)."""
    tensor_kwargs, _ = split_constants(example_kwargs)
    leaves, in_spec = pytree.tree_flatten((args, tensor_kwargs))
    example = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    batches = calibration_inputs(calibration, in_spec, tensor_kwargs, example)
    captured = capture(model, args, example_kwargs, dynamic_shapes)
    free = differing_dims(example, batches or []) if dynamic_shapes is None else {}   # the user's dims rule
    shaped = _capture_dynamic(model, args, example_kwargs, tensor_kwargs, free) if free else captured
    placeholders = tensor_placeholders(shaped.gm)
    for index, batch in enumerate(batches or []):
        check_batch(index, batch, placeholders, shaped.symbol_ranges, free)
    # the same code in both graphs: no size is baked in, so the static graph runs every batch exactly
    return (captured if shaped.gm.code == captured.gm.code else shaped), batches


def _capture_dynamic(model: torch.nn.Module, args: tuple, example_kwargs: Optional[dict], tensor_kwargs: dict,
                     free: FreeDims) -> Captured:
    try:
        return capture(model, args, example_kwargs, auto_dynamic_shapes(model, args, tensor_kwargs, free))
    except CaptureError as err:
        dims = "; ".join(f"input {position} dim(s) {sorted(dims)}" for position, dims in sorted(free.items()))
        raise ConfigError(f"calibration: the batches differ from the example inputs at {dims}, and the model "
                          f"cannot be captured with those dims dynamic; give batches of the example's sizes "
                          f"(the static capture works).\n{err}") from err


def calibration_inputs(calibration: Optional[Iterable], in_spec: pytree.TreeSpec, example_kwargs: dict,
                       example: list[torch.Tensor]) -> Optional[list[tuple]]:
    """The batches as flat tensor tuples in placeholder order, each of the example's ranks and dtypes."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, dict, str)) or not hasattr(calibration, "__iter__"):
        raise ConfigError(f"calibration: expected an iterable of batches shaped like example_inputs "
                          f"(e.g. a list of tuples), got {type(calibration).__name__}")
    batches = [_flat_batch(index, batch, in_spec, example_kwargs) for index, batch in enumerate(calibration)]
    if not batches:
        raise ConfigError("calibration: the iterable gave no batches")
    for index, batch in enumerate(batches):
        for position, (tensor, want) in enumerate(zip(batch, example)):
            if tensor.dim() != want.dim():
                raise ConfigError(f"{_shape_problem(index, position, tensor, want.shape, want.dtype)}; "
                                  f"it has rank {tensor.dim()}, the example input has rank {want.dim()}")
            if tensor.dtype != want.dtype:
                raise ConfigError(f"calibration batch {index}: input {position} has dtype {_dtype(tensor.dtype)}, "
                                  f"expected {_dtype(want.dtype)} (shape {_sizes(want.shape)})")
    return batches


def differing_dims(example: list[torch.Tensor], batches: list[tuple]) -> FreeDims:
    """input position -> the dims where some batch's size differs from the example's."""
    free: FreeDims = {}
    for batch in batches:
        for position, (tensor, want) in enumerate(zip(batch, example)):
            dims = {d for d, (got, size) in enumerate(zip(tensor.shape, want.shape)) if got != size}
            if dims:
                free.setdefault(position, set()).update(dims)
    return free


def auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, free: FreeDims) -> dict[str, Any]:
    """torch.export's `dynamic_shapes` by argument name: Dim.AUTO at each dim in `free`, the rest static.
    AUTO lets export relate dims (ids and mask share the batch) and keep static those the model fixes."""
    positions = iter(range(sum(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves((args, kwargs)))))

    def spec(leaf: Any) -> Optional[dict[int, Any]]:
        if not isinstance(leaf, torch.Tensor):
            return None
        return {dim: torch.export.Dim.AUTO for dim in sorted(free.get(next(positions), ()))} or None

    arg_specs, kwarg_specs = pytree.tree_map(spec, (args, kwargs))
    return dict(inspect.signature(model.forward).bind(*arg_specs, **kwarg_specs).arguments)


def tensor_placeholders(gm: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """(name, FakeTensor) of each tensor placeholder, in order; empty when the graph recorded no values."""
    nodes = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if any(node.meta.get("val") is None for node in nodes):   # without every value the batch cannot be paired up
        return []
    return [(node.name, node.meta["val"]) for node in nodes if isinstance(node.meta["val"], torch.Tensor)]


def check_batch(index: int, batch: tuple, placeholders: list[tuple[str, torch.Tensor]],
                ranges: dict[str, list[Optional[int]]], free: FreeDims) -> None:
    """Refuse a batch the graph cannot run as the model would, naming the input, the dim and why.
    `free` holds the dims captured with Dim.AUTO (empty when the user gave dynamic_shapes)."""
    sizes: dict[sympy.Symbol, tuple[int, str]] = {}   # symbol -> (its size in this batch, where it was read)
    for position, (tensor, (name, want)) in enumerate(zip(batch, placeholders)):
        for dim, (got, size) in enumerate(zip(tensor.shape, want.shape)):
            reason = _dim_problem(got, size, sizes, ranges, f"{name} dim {dim}", dim in free.get(position, ()))
            if reason:
                raise ConfigError(f"{_shape_problem(index, position, tensor, want.shape, want.dtype)}; "
                                  f"{name} dim {dim} is {got}, but {reason}")


def _dim_problem(got: int, size: Any, sizes: dict, ranges: dict, where: str, made_dynamic: bool) -> str:
    """Why size `got` cannot stand for the placeholder's `size` ("" when it can); binds the symbols it reads."""
    expr = sympy.sympify(size.node.expr) if isinstance(size, torch.SymInt) else sympy.Integer(size)
    if expr.is_Integer:   # static, or specialised by a guard
        return "" if got == int(expr) else _static_problem(int(expr), made_dynamic)
    if not isinstance(expr, sympy.Symbol):   # a dim derived from others (2*s0): checked once they are known
        value = expr.subs({symbol: known for symbol, (known, _) in sizes.items()})
        return f"the captured graph needs {expr} = {value} there" if value.is_Integer and int(value) != got else ""
    if expr in sizes and sizes[expr][0] != got:
        return f"the model ties it to {sizes[expr][1]}, which is {sizes[expr][0]} in this batch ({expr})"
    low, high = ranges.get(str(expr), [0, None])
    if got < low or (high is not None and got > high):
        return f"it must lie in [{low}, {'inf' if high is None else high}] ({expr}, as torch.export captured it)"
    sizes.setdefault(expr, (got, where))
    return ""


def _static_problem(size: int, made_dynamic: bool) -> str:
    if not made_dynamic:
        return f"dynamic_shapes leaves it static at {size}"
    if size <= 1:
        return f"torch.export keeps sizes 0 and 1 static: it must be {size}"
    return f"the model fixes it to {size} (torch.export could not keep it dynamic)"


def _shape_problem(index: int, position: int, tensor: torch.Tensor, want: Any, dtype: torch.dtype) -> str:
    return (f"calibration batch {index}: input {position} has shape {list(tensor.shape)}, "
            f"expected {_sizes(want)} ({_dtype(dtype)})")


def _sizes(shape: Any) -> str:
    """Static sizes as ints, dynamic ones as their symbol's expression."""
    return f"[{', '.join(str(size) for size in shape)}]"


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
