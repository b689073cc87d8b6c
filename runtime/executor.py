"""Runs a Program: resolves every op once, then executes instructions over registers.

Ops resolve only through the op table (`sparsecc.runtime.op_table`): exact ATen
overloads from its allowlist, the sparse ops of the registry and the table's
Python operators; dtypes, layouts and memory formats decode through its fixed
tables. Nothing named in a program is imported or looked up by name, so a
loaded artifact cannot make the runtime run arbitrary code. Any failure while
an instruction runs is a RuntimeProgramError naming the instruction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

from .errors import ArtifactError, InputMismatchError, RuntimeProgramError
from .expert_fusion import fused_expert_calls
from .inputs import check_inputs
from .kernels.cpu import dense_paths
from .op_table import PY_OPS, decode_encoded, overload_of
from .ops import get_op
from .program import Program

BACKENDS = ("torch", "triton")
# ATen overloads a program runs through sparsecc's own kernel where it measured faster (same contract; the
# kernel falls back to the overload itself off the CPU, past its token count or where no kernel applies)
MEASURED_ATEN = {"aten::linear.default": dense_paths.linear}


@dataclass(frozen=True)
class Reg:
    index: int


def resolve_op(qualname: str, backend: str) -> Callable[..., Any]:
    """The callable behind `aten::name.overload`, `sparsecc::name` or `py::name`, from the op table only."""
    if qualname in PY_OPS:
        return PY_OPS[qualname]
    try:
        if qualname.startswith("sparsecc::"):
            return get_op(qualname).kernel(backend)
        overload = overload_of(qualname)   # checks the allowlist first
        # the overload's own C++ callable: OpOverload.__call__ is a Python frame around it (~0.35 us an op)
        return MEASURED_ATEN.get(qualname) or getattr(overload, "_op", overload)
    except KeyError as err:
        raise RuntimeProgramError(str(err.args[0])) from None


def instruction_kernel(qualname: str, backend: str, args: list, kwargs: dict) -> Optional[Callable[..., Any]]:
    """A sparse op's kernel made for one instruction (OpDef.instruction_kernels), or None."""
    if not qualname.startswith("sparsecc::"):
        return None
    factory = get_op(qualname).instruction_kernels.get(backend)
    return factory(args, kwargs) if factory is not None else None


def decode_arg(arg: Any, constants: dict[str, torch.Tensor]) -> Any:
    """Turn the JSON encoding of an argument into a template with `Reg` placeholders."""
    if isinstance(arg, list):
        return [decode_arg(a, constants) for a in arg]
    if not isinstance(arg, dict):
        return arg
    if len(arg) != 1:
        raise RuntimeProgramError(f"unknown argument encoding {arg!r}")
    (kind, value), = arg.items()
    if kind == "r":
        return Reg(value)
    if kind == "c":
        if value not in constants:
            raise RuntimeProgramError(f"program refers to missing constant '{value}'")
        return constants[value]
    try:
        return decode_encoded(kind, value)
    except ValueError as err:
        raise RuntimeProgramError(str(err)) from None


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
                 kernels: dict[str, Callable[..., Any]] | None = None, guard: Any = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}' (expected one of {', '.join(BACKENDS)})")
        self.program, self.backend = program, backend
        self.kernels = kernels or {}   # qualname -> callable that replaces the registry's kernel
        self.guard = guard             # a CallGuard for programs from untrusted folders (runtime/call_guard.py)
        # moe calls fed by nm_decompress of constants run on the compressed experts (runtime/expert_fusion.py)
        self.fused = fused_expert_calls(program, constants) if backend == "torch" and not self.kernels else {}
        self.steps = [self._prepare(index, inst, constants) for index, inst in enumerate(program.instructions)]
        self.outputs = [decode_arg(o, constants) for o in program.outputs]
        self.device = next((c.device for c in constants.values()), None)

    def _prepare(self, index, inst, constants) -> "Step":
        fn = resolve_op(inst.op, self.backend)
        args = [decode_arg(a, constants) for a in inst.args]
        kwargs = {k: decode_arg(v, constants) for k, v in inst.kwargs.items()}
        replaced = self.fused.get(index) or self.kernels.get(inst.op)
        fn = replaced or instruction_kernel(inst.op, self.backend, args, kwargs) or fn
        if self.guard is not None and self.guard.watches(index, inst):
            fn = self.guard.wrap(index, inst, fn)
        registers = tuple((i, a.index) for i, a in enumerate(args) if isinstance(a, Reg))
        nested = tuple(i for i, a in enumerate(args) if isinstance(a, list) and _has_reg(a))
        dynamic_kwargs = tuple(k for k, v in kwargs.items() if _has_reg(v))
        return Step(fn, args, kwargs, registers, nested, dynamic_kwargs, inst.outputs[0] if not inst.unpack else None,
                    inst.outputs)

    def run(self, flat_inputs: Sequence[Any]) -> list[Any]:
        sizes = check_inputs(self.program, flat_inputs, self.device)
        if self.guard is not None:
            self.guard.begin(flat_inputs, sizes)
        regs: list[Any] = [None] * self.program.num_registers
        for reg, value in zip(self.program.inputs, flat_inputs):
            regs[reg] = value
        index = 0
        try:
            with torch.no_grad():
                execute = self._execute
                for index, step in enumerate(self.steps):
                    execute(step, regs)
        except RuntimeProgramError as err:   # a kernel's refusal: name the instruction (once)
            inst = self.program.instructions[index]
            where = f"instruction {index} ({inst.op}, node '{inst.name}')"
            if str(err).startswith("instruction "):
                raise
            raise RuntimeProgramError(f"{where}: {err}") from err
        except (ArtifactError, InputMismatchError):
            raise   # already say what is wrong (a launch the artifact holds no kernel for)
        except Exception as err:  # one try around the loop keeps the hot path cheap
            inst = self.program.instructions[index]
            raise RuntimeProgramError(f"instruction {index} ({inst.op}, node '{inst.name}'): "
                                      f"{type(err).__name__}: {err}") from err
        return [_fill(o, regs) for o in self.outputs]

    @staticmethod
    def _execute(step: "Step", regs: list[Any]) -> None:
        fn, args, kwargs, registers, nested, dynamic_kwargs, output, outputs = step   # unpacking: no attribute lookups
        if registers or nested:
            args = list(args)
            for i, reg in registers:
                args[i] = regs[reg]
            for i in nested:
                args[i] = _fill(args[i], regs)
        if dynamic_kwargs:
            kwargs = dict(kwargs)
            for k in dynamic_kwargs:
                kwargs[k] = _fill(kwargs[k], regs)
        result = fn(*args, **kwargs) if kwargs else fn(*args)
        if output is not None:
            regs[output] = result
            return
        for reg, value in zip(outputs, result):
            if reg >= 0:
                regs[reg] = value


class Step(NamedTuple):
    """One instruction made ready to run: its callable, its argument templates with the constants in place,
    and where registers go (decided once: filling them is the whole per-call cost of a small op)."""
    fn: Callable[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]
    registers: tuple[tuple[int, int], ...]     # (argument position, register) of the bare register arguments
    nested: tuple[int, ...]                    # positions of lists holding registers
    dynamic_kwargs: tuple[str, ...]
    output: Optional[int]                      # the one output register, None where the result unpacks
    outputs: list[int]
