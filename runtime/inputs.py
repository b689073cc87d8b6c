"""Checks that call-time inputs match what the program was compiled for.

Static dims must match exactly; a dynamic dim (a symbol such as "s0") takes
any value inside its range, the same value wherever the symbol appears.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

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


# Constant keyword inputs (use_cache=False, return_dict=True) are baked into the program at capture:
# plain data, stored in the artifact as JSON. A call may repeat the compiled value or leave it out.
CONSTANT_LEAVES = (type(None), bool, int, float, str)
MAX_CONSTANT_ITEMS = 256   # leaves a stored constant keyword may hold (a flag, a tuple of flags)


def plain_constant(value: Any, budget: Optional[list] = None) -> bool:
    """True when `value` is JSON-like plain data: None, bool, int, float (finite), str, or lists/tuples/str-keyed
    dicts of those, at most MAX_CONSTANT_ITEMS leaves."""
    budget = [MAX_CONSTANT_ITEMS] if budget is None else budget
    if isinstance(value, (list, tuple)):
        return all(plain_constant(v, budget) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_constant(v, budget) for k, v in value.items())
    budget[0] -= 1
    finite = not isinstance(value, float) or math.isfinite(value)
    return budget[0] >= 0 and isinstance(value, CONSTANT_LEAVES) and finite


def same_constant(got: Any, want: Any) -> bool:
    """`got` is the compiled value: same type (True == 1, but use_cache=1 is not what was compiled), a tuple
    and a list alike (the artifact stores both as a JSON list)."""
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(map(same_constant, got, want))
    if type(got) is not type(want):
        return False
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(same_constant(got[k], want[k]) for k in want)
    return got == want


def without_constants(constants: dict[str, Any], kwargs: Optional[dict]) -> dict:
    """`kwargs` without the program's constant keyword inputs, each of which must equal its compiled value."""
    kwargs = dict(kwargs or {})
    for name, value in constants.items():
        got = kwargs.pop(name, value)
        if not same_constant(got, value):
            brief = f"a tensor {list(got.shape)}" if isinstance(got, torch.Tensor) else repr(got)[:80]
            raise InputMismatchError(f"keyword input {name!r}: the model was compiled with {name}={value!r} "
                                     f"(a constant of the capture), got {brief}; compile again for another value")
    return kwargs
