"""Runs a structurally valid Program on FakeTensors at given symbol sizes: the last load-time check.

Inputs become fake tensors of their spec shapes (a dynamic dim at the given size,
by default its hint, else its range's lower bound), constants `mode.from_tensor`. Each instruction
runs on fake values: ATen overloads under the fake mode, sparse ops first
through their registry verifier (REAL constant tensors, fake registers), then
their fake impl. A shape, dtype or argument error refuses the artifact.
Data-dependent ops make their outputs unknown; instructions reading unknown
values are skipped here and listed as `unbounded`: the call guard
(`sparsecc.runtime.call_guard`) checks them on the real values at each call. The bytes of the
storages held in registers, each storage counted once, are tracked as the
executor would hold them (a value stays until its register is overwritten),
and the peak must stay under the limit.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorMode, UnsupportedOperatorException)

from .aten_contracts import contract_problem
from .errors import ArtifactError
from .op_table import DTYPES, PY_OPS, decode_encoded, overload_of
from .ops import get_op
from .program import Instruction, Program

UNKNOWN = object()   # a data-dependent value: what reads it is not run at load
_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


class _Ledger:
    """Bytes of the distinct storages held by registers; constants' storages are not counted."""

    def __init__(self, constants: list[torch.Tensor], limit: int, at: str):
        self.limit, self.total, self.peak, self.at = limit, 0, 0, at
        self.counts: dict[int, list[int]] = {}        # storage id -> [bytes, holders]
        self.excluded = {_storage_key(t) for t in constants}

    def storages(self, value: Any) -> dict[int, int]:
        found: dict[int, int] = {}
        for tensor in _tensors(value):
            key = _storage_key(tensor)
            if key not in self.excluded:
                found[key] = tensor.untyped_storage().nbytes()
        return found

    def check(self, values: Any, where: str) -> None:
        """Refuse when holding `values` beside everything held now would pass the limit."""
        new = {k: n for k, n in self.storages(values).items() if k not in self.counts}
        needed = self.total + sum(new.values())
        if needed > self.limit:
            raise ArtifactError(f"{where}: needs {needed} bytes of live values {self.at}, over the "
                                f"limit of {self.limit} bytes (pass max_memory to load to raise it)")
        self.peak = max(self.peak, needed)

    def hold(self, value: Any) -> None:
        for key, nbytes in self.storages(value).items():
            entry = self.counts.setdefault(key, [nbytes, 0])
            self.total += nbytes if entry[1] == 0 else 0
            entry[1] += 1

    def drop(self, value: Any) -> None:
        for key, nbytes in self.storages(value).items():
            entry = self.counts[key]
            entry[1] -= 1
            if entry[1] == 0:
                self.total -= nbytes
                del self.counts[key]


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@contextlib.contextmanager
def _quiet_fake_errors() -> Iterator[None]:
    """The fake mode logs every failing meta kernel; at load the failure is reported as an ArtifactError."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    old, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = old


@dataclass(frozen=True)
class FakeRun:
    """What a fake run found: the peak bytes of live registers and the instructions it could not run."""
    peak: int
    unbounded: frozenset[int]   # instructions reading data-dependent values: the call guard checks them


# ops returning a tensor shaped like their first argument, whatever their other arguments hold
SHAPED_BY_FIRST = frozenset({"sparsecc::unroute", "aten::index_put.default", "aten::index_add.default",
                             "aten::index_copy.default", "aten::scatter.src", "aten::scatter_add.default"})


def hint_sizes(program: Program) -> dict[str, int]:
    """Each symbol at its hint, else its range's lower bound: the sizes checked at load."""
    return {s: program.symbol_hints.get(s, r[0]) for s, r in program.symbol_ranges.items()}


def propagate(program: Program, constants: dict[str, torch.Tensor], device: torch.device, limit: int,
              sizes: Optional[dict[str, int]] = None) -> FakeRun:
    """Raise ArtifactError when an instruction fails on fake values or live bytes pass `limit`
    with the symbols at `sizes` (default `hint_sizes`)."""
    sizes = hint_sizes(program) if sizes is None else sizes
    mode = FakeTensorMode(allow_fallback_kernels=False)   # never run a real kernel on faked inputs
    at = f"with dynamic dims {sizes}" if sizes else "for the input shapes"
    unbounded: set[int] = set()
    with _quiet_fake_errors(), torch.no_grad():
        fakes = {name: mode.from_tensor(t) for name, t in constants.items()}
        ledger = _Ledger(list(fakes.values()), limit, at)
        regs: list[Any] = [None] * program.num_registers
        for reg, value in zip(program.inputs, _fake_inputs(program, mode, device, sizes)):
            ledger.check(value, f"input register {reg}")
            ledger.hold(value)
            regs[reg] = value
        for index, inst in enumerate(program.instructions):
            where = f"instruction {index} ({inst.op}, node {inst.name!r})"
            result = _run(inst, regs, fakes, constants, mode, where)
            if result is UNKNOWN:
                unbounded.add(index)
            _store(inst, result, regs, ledger, where)
    return FakeRun(ledger.peak, frozenset(unbounded))


def output_bytes(op: str, args: tuple, kwargs: dict, where: str) -> Optional[int]:
    """Bytes of the tensors `op` would return on these (real) arguments, found on fake copies
    without running the op; None when the output size depends on the data (nonzero, item)."""
    mode = FakeTensorMode(allow_fallback_kernels=False)
    convert = lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v   # noqa: E731
    fake_args = [_map_tensors(a, convert) for a in args]
    fake_kwargs = {k: _map_tensors(v, convert) for k, v in kwargs.items()}
    with _quiet_fake_errors(), torch.no_grad():
        result = _call(op, fake_args, fake_kwargs, mode, where)
    if result is UNKNOWN:
        return None
    return sum(t.untyped_storage().nbytes() for t in _tensors(result))


def _map_tensors(value: Any, fn: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return fn(value)


def _fake_inputs(program: Program, mode: FakeTensorMode, device: torch.device,
                 sizes: dict[str, int]) -> list[torch.Tensor]:
    inputs = []
    for spec in program.input_specs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        try:
            with mode:
                inputs.append(torch.empty(shape, dtype=DTYPES[spec.dtype], device=device))
        except (RuntimeError, ValueError, OverflowError) as err:
            raise ArtifactError(f"input spec {spec.name!r} {shape}: {err}") from None
    return inputs


def _decode(value: Any, regs: list[Any], tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, regs, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "r":
        return regs[payload]
    if kind == "c":
        return tensors[payload]
    return decode_encoded(kind, payload)


def _has_unknown(value: Any) -> bool:
    if value is UNKNOWN:
        return True
    return isinstance(value, (list, tuple, dict)) and any(
        _has_unknown(v) for v in (value.values() if isinstance(value, dict) else value))


def _run(inst: Instruction, regs: list[Any], fakes: dict, constants: dict, mode: FakeTensorMode, where: str) -> Any:
    args, kwargs = _decode(inst.args, regs, fakes), {k: _decode(v, regs, fakes) for k, v in inst.kwargs.items()}
    if _has_unknown((args, kwargs)):
        return _like_first(inst.op, args, mode)
    if inst.op.startswith("sparsecc::"):
        _verify_sparse_op(inst, regs, constants, where)
    return _call(inst.op, args, kwargs, mode, where)


def _like_first(op: str, args: list, mode: FakeTensorMode) -> Any:
    """An op whose result has its first argument's shape whatever the data (a scatter back into the residual)
    stays known when only its other arguments are data-dependent; anything else is UNKNOWN."""
    if op not in SHAPED_BY_FIRST or not args or not isinstance(args[0], torch.Tensor):
        return UNKNOWN
    with mode:
        return torch.empty_like(args[0])


def _call(op: str, args: Any, kwargs: dict, mode: FakeTensorMode, where: str) -> Any:
    """`op` on fake values: its result, UNKNOWN when data-dependent, ArtifactError when it cannot run."""
    problem = contract_problem(op, args, kwargs)
    if problem:
        raise ArtifactError(f"{where}: {problem}")
    try:
        with mode:
            return PY_OPS[op](*args) if op in PY_OPS else overload_of(op)(*args, **kwargs)
    except _DATA_DEPENDENT:
        return UNKNOWN
    except ArtifactError:
        raise
    except Exception as err:  # any failure on the fake values means the program cannot run as written
        raise ArtifactError(f"{where}: fails on its input shapes: {type(err).__name__}: {_first_line(err)}") from None


def _verify_sparse_op(inst: Instruction, regs: list[Any], constants: dict, where: str) -> None:
    """The registry verifier, with the real constant tensors (it checks metadata such as N:M indices)."""
    args = _decode(inst.args, regs, constants)
    kwargs = {k: _decode(v, regs, constants) for k, v in inst.kwargs.items()}
    reason = get_op(inst.op).verify(*args, **kwargs)
    if reason:
        raise ArtifactError(f"{where}: {inst.op} verifier: {reason}")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def _store(inst: Instruction, result: Any, regs: list[Any], ledger: _Ledger, where: str) -> None:
    if inst.unpack and result is not UNKNOWN:
        if not isinstance(result, (tuple, list)) or len(result) != len(inst.outputs):
            raise ArtifactError(f"{where}: unpacks {len(inst.outputs)} results, the op returns "
                                f"{len(result) if isinstance(result, (tuple, list)) else 'one value'}")
    values = result if inst.unpack and result is not UNKNOWN else [result] * len(inst.outputs)
    for tensor in _tensors(values):
        if tensor.layout != torch.strided:
            raise ArtifactError(f"{where}: returns a {tensor.layout} tensor; programs hold strided tensors only")
    ledger.check([v for r, v in zip(inst.outputs, values) if r >= 0], where)
    for reg, value in zip(inst.outputs, values):
        if reg >= 0:
            ledger.hold(value)
            ledger.drop(regs[reg])
            regs[reg] = value
