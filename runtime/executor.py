"""Runs a Program: resolves every op once, then executes instructions over registers.

Ops are resolved by qualified name from an allowlist of namespaces, never by
importing or evaluating anything named in the program, so a loaded artifact
cannot make the runtime run arbitrary code.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Any, Callable, Sequence

import torch

from .errors import RuntimeProgramError
from .inputs import check_inputs
from .ops import get_op
from .program import Program

ALLOWED_NAMESPACES = ("aten", "sparsecc")
# ATen ops a program may never run, even a loaded one: ops that reach outside tensors (files,
# stdout), and ops that skip the index/size checks an artifact's data could then defeat
# (`*_unsafe*` constructors and indexing, raw sparse/nested constructors, storage swaps).
DENIED_ATEN_OPS = ("from_file", "_print", "save", "load", "set_", "set", "_set_", "resize_", "_resize_output_")
DENIED_ATEN_PREFIXES = ("_sparse_", "sparse_", "_nested_", "_make_", "_debug", "_cufft", "_cudnn_rnn_flatten")
SAFE_UNSAFE_OPS = ("_unsafe_view",)   # a view whose sizes torch still checks against the storage


def denied_aten_op(name: str) -> Optional[str]:
    """Why the ATen op `name` may not run from a program, or None."""
    if name in DENIED_ATEN_OPS:
        return "it reaches outside tensors or swaps storage"
    if "unsafe" in name and name not in SAFE_UNSAFE_OPS:
        return "it skips torch's index or size checks"
    if name.startswith(DENIED_ATEN_PREFIXES):
        return "it builds tensors from raw indices without checks"
    return None
PY_OPS: dict[str, Callable[..., Any]] = {
    "py::getitem": operator.getitem,
    "py::add": operator.add,
    "py::sub": operator.sub,
    "py::mul": operator.mul,
    "py::floordiv": operator.floordiv,
    "py::truediv": operator.truediv,
    "py::mod": operator.mod,
    "py::neg": operator.neg,
    "py::eq": operator.eq,
    "py::ne": operator.ne,
    "py::lt": operator.lt,
    "py::le": operator.le,
    "py::gt": operator.gt,
    "py::ge": operator.ge,
}
BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Reg:
    index: int


def resolve_op(qualname: str, backend: str) -> Callable[..., Any]:
    """The callable behind `aten::name.overload`, `sparsecc::name` or `py::name`."""
    if qualname in PY_OPS:
        return PY_OPS[qualname]
    namespace, _, rest = qualname.partition("::")
    if namespace not in ALLOWED_NAMESPACES or not rest:
        raise RuntimeProgramError(f"op '{qualname}' is outside the allowed namespaces {ALLOWED_NAMESPACES}")
    if namespace == "sparsecc":
        try:
            return get_op(rest).kernel(backend)
        except KeyError as err:
            raise RuntimeProgramError(str(err.args[0])) from None
    name, _, overload = rest.partition(".")
    why = denied_aten_op(name)
    if why:
        raise RuntimeProgramError(f"ATen op '{qualname}' is outside the runtime's allowlist ({why})")
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    op = getattr(packet, overload or "default", None) if packet is not None else None
    if not isinstance(op, torch._ops.OpOverload):
        raise RuntimeProgramError(f"unknown ATen op '{qualname}'")
    return op


def decode_arg(arg: Any, constants: dict[str, torch.Tensor]) -> Any:
    """Turn the JSON encoding of an argument into a template with `Reg` placeholders."""
    if isinstance(arg, list):
        return [decode_arg(a, constants) for a in arg]
    if not isinstance(arg, dict):
        return arg
    (kind, value), = arg.items()
    if kind == "r":
        return Reg(value)
    if kind == "c":
        if value not in constants:
            raise RuntimeProgramError(f"program refers to missing constant '{value}'")
        return constants[value]
    if kind == "dtype":
        return _torch_attr(value, torch.dtype)
    if kind == "device":
        return torch.device(value)
    if kind in ("layout", "memory_format"):
        return _torch_attr(value, torch.layout if kind == "layout" else torch.memory_format)
    raise RuntimeProgramError(f"unknown argument encoding {arg!r}")


def _torch_attr(name: str, kind: type) -> Any:
    value = getattr(torch, name, None)
    if not isinstance(value, kind):
        raise RuntimeProgramError(f"'{name}' is not a torch {kind.__name__}")
    return value


def _has_reg(template: Any) -> bool:
    if isinstance(template, Reg):
        return True
    return isinstance(template, list) and any(_has_reg(t) for t in template)


def _fill(template: Any, regs: list[Any]) -> Any:
    if isinstance(template, Reg):
        return regs[template.index]
    if isinstance(template, list):
        return [_fill(t, regs) for t in template]
    return template


class Executor:
    """Executes `program` with `constants` on one backend."""

    def __init__(self, program: Program, constants: dict[str, torch.Tensor], backend: str = "torch",
                 kernels: dict[str, Callable[..., Any]] | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}' (expected one of {', '.join(BACKENDS)})")
        self.program, self.backend = program, backend
        self.kernels = kernels or {}   # qualname -> callable that replaces the registry's kernel
        self.steps = [self._prepare(inst, constants) for inst in program.instructions]
        self.outputs = [decode_arg(o, constants) for o in program.outputs]
        self.device = next((c.device for c in constants.values()), None)

    def _prepare(self, inst, constants):
        fn = resolve_op(inst.op, self.backend)
        fn = self.kernels.get(inst.op, fn)
        args = [decode_arg(a, constants) for a in inst.args]
        kwargs = {k: decode_arg(v, constants) for k, v in inst.kwargs.items()}
        dynamic_args = [i for i, a in enumerate(args) if _has_reg(a)]
        dynamic_kwargs = [k for k, v in kwargs.items() if _has_reg(v)]
        return fn, args, kwargs, dynamic_args, dynamic_kwargs, inst

    def run(self, flat_inputs: Sequence[Any]) -> list[Any]:
        check_inputs(self.program, flat_inputs, self.device)
        regs: list[Any] = [None] * self.program.num_registers
        for reg, value in zip(self.program.inputs, flat_inputs):
            regs[reg] = value
        with torch.no_grad():
            for step in self.steps:
                self._execute(step, regs)
        return [_fill(o, regs) for o in self.outputs]

    @staticmethod
    def _execute(step, regs: list[Any]) -> None:
        fn, args, kwargs, dynamic_args, dynamic_kwargs, inst = step
        if dynamic_args:
            args = list(args)
            for i in dynamic_args:
                args[i] = _fill(args[i], regs)
        if dynamic_kwargs:
            kwargs = dict(kwargs)
            for k in dynamic_kwargs:
                kwargs[k] = _fill(kwargs[k], regs)
        result = fn(*args, **kwargs)
        if not inst.unpack:
            regs[inst.outputs[0]] = result
            return
        for reg, value in zip(inst.outputs, result):
            if reg >= 0:
                regs[reg] = value
