"""Checks that call-time inputs match what the program was compiled for.

Static dims must match exactly; a dynamic dim (a symbol such as "s0") takes
any value inside its range, the same value wherever the symbol appears.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import InputMismatchError
from .program import InputSpec, Program


def describe(spec: InputSpec) -> str:
    return f"{spec.dtype}[{', '.join(str(d) for d in spec.shape)}]"


def check_inputs(program: Program, flat_inputs: Sequence[Any], device: torch.device | None) -> dict[str, int]:
    """Raise InputMismatchError unless the inputs fit the program's specs; the dynamic dims' sizes."""
    specs = program.input_specs
    if len(flat_inputs) != len(specs):
        raise InputMismatchError(
            f"expected {len(specs)} tensor inputs ({', '.join(s.name for s in specs)}), got {len(flat_inputs)}")
    bound: dict[str, int] = {}
    for spec, value in zip(specs, flat_inputs):
        _check_one(spec, value, bound, program.symbol_ranges, device)
    return bound


def _check_one(spec: InputSpec, value: Any, bound: dict[str, int], ranges: dict, device) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputMismatchError(f"input '{spec.name}': expected a tensor {describe(spec)}, got {type(value).__name__}")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype != spec.dtype:
        raise InputMismatchError(f"input '{spec.name}': expected dtype {spec.dtype}, got {dtype} "
                                 f"(compiled for {describe(spec)})")
    if value.dim() != len(spec.shape):
        raise InputMismatchError(f"input '{spec.name}': expected {len(spec.shape)} dims {describe(spec)}, "
                                 f"got shape {list(value.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
        _check_dim(spec, axis, want, int(got), bound, ranges)
    if device is not None and not same_device(value.device, device):
        raise InputMismatchError(f"input '{spec.name}' is on {value.device}, the compiled program's weights are on {device}")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Same type, and the same index where both name one (`cuda` alone matches any `cuda:i`)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_dim(spec: InputSpec, axis: int, want: Any, got: int, bound: dict[str, int], ranges: dict) -> None:
    where = f"input '{spec.name}' dim {axis}"
    if isinstance(want, int):
        if want != got:
            raise InputMismatchError(
                f"{where}: expected size {want}, got {got} (compiled for {describe(spec)}; "
                "pass dynamic_shapes to compile to allow other sizes)")
        return
    low, high = ranges.get(want, [0, None])
    if got < low or (high is not None and got > high):
        raise InputMismatchError(f"{where}: size {got} outside the range [{low}, {high}] of dynamic dim {want}")
    if bound.setdefault(want, got) != got:
        raise InputMismatchError(f"{where}: size {got} but dynamic dim {want} is already {bound[want]} in another input")
