"""The one table of ops a Program may run, shared by the verifier, the lowering and the executor.

A graph that verifies always lowers (`qualname_of` names every op the verifier
accepts) and a program that lowers always loads (`argument_problem` accepts
what the lowering encodes). Three kinds of op:

- `py::<name>`: the Python operators export leaves for SymInt arithmetic and
  tuple access, run on numbers only, with int results bounded to int64;
- `aten::<name>.<overload>`: an EXACT ATen overload from `ATEN_OPS`. Left out
  on purpose: ops that skip index/size checks (`_reshape_alias`, `as_strided`,
  `segment_reduce`, `_convert_indices_*`, `*unsafe*` but `_unsafe_view`),
  sparse/nested/quantized/mkldnn constructors and conversions, storage swaps
  (`set_`, `resize_`), file I/O, RNG engines and overloads taking a Generator;
- `sparsecc::<name>`: the sparse ops of the registry (`sparsecc.runtime.ops`).

Arguments are checked against the overload's own schema, in the JSON encoding
of `sparsecc.runtime.program`; dtypes, layouts and memory formats decode
through the fixed tables below, never through a lookup by a name from a file.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import torch

from .aten_allowlist import ATEN_OPS
from .ops import OPS

DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)}
LAYOUTS: dict[str, torch.layout] = {"strided": torch.strided}
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}
DEVICE_TYPES = ("cpu", "cuda")
INT64_LIMIT = 2 ** 63   # SymInt arithmetic stays in int64, as it would in torch


def _numbers(*values: Any) -> None:
    if not all(isinstance(v, (int, float)) for v in values):
        kinds = ", ".join(type(v).__name__ for v in values)
        raise TypeError(f"Python arithmetic runs on numbers only, got ({kinds})")


def _arithmetic(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` on numbers, with an int result inside int64 (a chain of squarings cannot grow without bound)."""
    def checked(*values: Any) -> Any:
        _numbers(*values)
        result = fn(*values)
        if isinstance(result, int) and not -INT64_LIMIT <= result < INT64_LIMIT:
            raise OverflowError(f"{fn.__name__} result does not fit in int64")
        return result
    checked.__name__ = fn.__name__
    return checked


def _power(base: Any, exponent: Any) -> Any:
    """`base ** exponent`, refused before computing when an int result would pass int64."""
    _numbers(base, exponent)
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0 \
            and exponent * math.log2(abs(base)) >= 63:
        raise OverflowError(f"pow({base}, {exponent}) does not fit in int64")
    return _arithmetic(operator.pow)(base, exponent)


def _item(container: Any, index: Any) -> Any:
    """`container[index]` for a tuple, list or tensor and an int index (checked by Python / torch)."""
    if not isinstance(container, (tuple, list, torch.Tensor)) or not isinstance(index, int):
        raise TypeError(f"getitem takes a tuple, list or tensor and an int, got "
                        f"({type(container).__name__}, {type(index).__name__})")
    return container[index]


# graph target -> (program name, what the executor runs)
_PY_TARGETS: dict[Any, tuple[str, Callable[..., Any]]] = {
    operator.getitem: ("getitem", _item),
    **{fn: (fn.__name__.strip("_"), _arithmetic(fn)) for fn in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
        operator.neg, operator.abs, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
        operator.and_, operator.or_, operator.not_)},
    operator.pow: ("pow", _power),
    **{fn: (fn.__name__, _arithmetic(fn)) for fn in (
        torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_ite,
        torch.sym_sqrt, math.ceil, math.floor, math.trunc)},
}
PY_OPS: dict[str, Callable[..., Any]] = {f"py::{name}": run for name, run in _PY_TARGETS.values()}
_PY_ARITY = {"getitem": 2, "neg": 1, "abs": 1, "not": 1, "sym_int": 1, "sym_float": 1, "sym_not": 1,
             "sym_sqrt": 1, "ceil": 1, "floor": 1, "trunc": 1, "sym_ite": 3}


def qualname_of(target: Any) -> Optional[str]:
    """The program name of an FX call target, or None when the runtime cannot run it."""
    if target in _PY_TARGETS:
        return f"py::{_PY_TARGETS[target][0]}"
    if not isinstance(target, torch._ops.OpOverload):
        return None
    if target.namespace == "sparsecc":
        return f"sparsecc::{target._opname}" if target._opname in OPS else None
    qualname = f"{target.namespace}::{target._opname}.{target._overloadname}"
    return qualname if qualname in ATEN_OPS else None


def overload_of(qualname: str) -> torch._ops.OpOverload:
    """The OpOverload behind a table name (`aten::mm.default`, `sparsecc::moe`); KeyError outside the table."""
    namespace, _, rest = qualname.partition("::")
    if namespace == "sparsecc" and rest in OPS:
        return getattr(torch.ops.sparsecc, rest).default
    if qualname not in ATEN_OPS:
        raise KeyError(f"op '{qualname}' is not in the sparsecc runtime's op table")
    name, _, overload = rest.partition(".")
    return getattr(getattr(torch.ops.aten, name), overload)


def argument_problem(qualname: str, args: Any, kwargs: Any) -> Optional[str]:
    """None when `qualname` is in the table and its encoded arguments fit its schema, else why not."""
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return "args must be a list and kwargs an object"
    if qualname in PY_OPS:
        return _py_problem(qualname.removeprefix("py::"), args, kwargs)
    try:
        schema = overload_of(qualname)._schema
    except KeyError as err:
        return str(err.args[0])
    return schema_problem(schema, args, kwargs)


def _py_problem(name: str, args: list, kwargs: dict) -> Optional[str]:
    if kwargs:
        return f"py::{name} takes no keyword arguments"
    if len(args) != _PY_ARITY.get(name, 2):
        return f"py::{name} takes {_PY_ARITY.get(name, 2)} arguments, got {len(args)}"
    if name == "getitem":
        return None if _is_register(args[0]) and _fits_int(args[1]) else "py::getitem takes (register, int)"
    if not all(_is_register(a) or _is_number(a) for a in args):
        return f"py::{name} takes numbers or registers"
    return None


def schema_problem(schema: torch._C.FunctionSchema, args: list, kwargs: dict) -> Optional[str]:
    """Arity, keyword names and the kind of every encoded argument, against `schema`."""
    params = schema.arguments
    positional = [p for p in params if not p.kwarg_only]
    if len(args) > len(positional):
        return f"{len(args)} positional arguments, the schema takes at most {len(positional)}"
    by_name = {p.name: p for p in params}
    given = {p.name: a for p, a in zip(positional, args)}
    for key, value in kwargs.items():
        if key not in by_name or key in given:
            return f"unexpected keyword argument {key!r}" if key not in by_name else f"argument {key!r} given twice"
        given[key] = value
    for param in params:
        if param.name not in given:
            if not param.has_default_value():
                return f"missing argument {param.name!r}"
        elif not _fits(param.real_type, given[param.name], getattr(param, "N", None)):
            return f"argument {param.name!r} expects {param.real_type}, got {_describe(given[param.name])}"
    return None


def _fits(kind: Any, value: Any, size: Optional[int] = None) -> bool:
    """Whether an encoded value can stand for an argument of JIT type `kind`."""
    name = type(kind).__name__
    if name == "OptionalType":
        return value is None or _fits(kind.getElementType(), value, size)
    if name == "ListType":
        element = kind.getElementType()
        if size and type(element).__name__ in ("IntType", "SymIntType") and _fits_int(value):
            return True  # `int[1] dim` also takes a single int
        return isinstance(value, list) and all(_fits(element, v) for v in value)
    check = _KIND_CHECKS.get(name) or _KIND_CHECKS.get(str(kind))
    return check is not None and check(value)


def _tagged(value: Any, tag: str) -> Optional[Any]:
    return value[tag] if isinstance(value, dict) and set(value) == {tag} else None


def _is_register(value: Any) -> bool:
    index = _tagged(value, "r")
    return isinstance(index, int) and not isinstance(index, bool)


def _is_tensor(value: Any) -> bool:
    """A register, a constant, or a number (torch wraps `add(x, 0)`'s 0 as a tensor, as graphs write it)."""
    return _is_register(value) or isinstance(_tagged(value, "c"), str) or _is_number(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _fits_int(value: Any) -> bool:
    return _is_register(value) or (isinstance(value, int) and not isinstance(value, bool)
                                   and -INT64_LIMIT <= value < INT64_LIMIT)


def _fits_device(value: Any) -> bool:
    text = _tagged(value, "device")
    if not isinstance(text, str):
        return False
    kind, _, index = text.partition(":")
    return kind in DEVICE_TYPES and (not index or (index.isdigit() and len(index) < 4))


_KIND_CHECKS: dict[str, Callable[[Any], bool]] = {
    "TensorType": _is_tensor,
    "IntType": _fits_int,
    "SymIntType": _fits_int,
    "FloatType": lambda v: _is_register(v) or (_is_number(v) and not isinstance(v, bool)),
    "NumberType": lambda v: _is_register(v) or _is_number(v),
    "BoolType": lambda v: _is_register(v) or isinstance(v, bool),
    "StringType": lambda v: isinstance(v, str) and len(v) <= 4096,   # gelu approximate=, assert messages
    "DeviceObjType": _fits_device,
    "ScalarType": lambda v: _tagged(v, "dtype") in DTYPES,
    "Layout": lambda v: _tagged(v, "layout") in LAYOUTS,
    "MemoryFormat": lambda v: _tagged(v, "memory_format") in MEMORY_FORMATS,
}   # Generator, Storage, Stream, Dimname, Any...: no encoding, refused


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def writes_of(qualname: str) -> list[str]:
    """Names of the arguments the op writes in place (schema alias info `a!`), e.g. `self` of `copy_`."""
    if qualname in PY_OPS:
        return []
    schema = overload_of(qualname)._schema
    return [p.name for p in schema.arguments if p.alias_info is not None and p.alias_info.is_write]


def returns_alias(qualname: str) -> bool:
    """Whether an op's result may share storage with an argument (views, in-place ops, getitem)."""
    if qualname in PY_OPS:
        return qualname == "py::getitem"
    return any(r.alias_info is not None for r in overload_of(qualname)._schema.returns)


def bind_arguments(qualname: str, args: list, kwargs: dict) -> dict[str, Any]:
    """Argument name -> encoded value, for an op whose arguments passed `argument_problem`."""
    if qualname in PY_OPS:
        return {str(i): a for i, a in enumerate(args)}
    params = [p for p in overload_of(qualname)._schema.arguments if not p.kwarg_only]
    return {**{p.name: a for p, a in zip(params, args)}, **kwargs}


def decode_encoded(kind: str, value: Any) -> Any:
    """A dtype, layout, memory format or device from its JSON encoding, through the fixed tables."""
    table = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}.get(kind)
    if table is not None:
        if not isinstance(value, str) or value not in table:
            raise ValueError(f"{kind} {_describe(value)} is not one of {', '.join(table)}")
        return table[value]
    if kind == "device" and _fits_device({"device": value}):
        return torch.device(value)
    raise ValueError(f"unknown argument encoding {{{kind!r}: {_describe(value)}}}")
