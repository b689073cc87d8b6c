"""Per-call checks of a loaded program: what the load-time fake run could not bound.

The load checks a program at its symbol hints. A call may use other sizes, and an
instruction that reads a data-dependent value (`item`, `nonzero`) could not run at
load at all. So for each call of a loaded artifact the guard
- checks the peak bytes of live values at the call's own dynamic sizes (one fake run
  per new set of sizes, remembered for the last `REMEMBERED_SIZES`);
- before an instruction the load could not run, finds its output bytes on fake
  copies of its arguments and refuses it when the call would pass the limit;
- before every in-place instruction, refuses a write into a weight's or an input's
  storage (checked on the real tensors, so no view or alias escapes it).
Refusals are RuntimeProgramError naming the instruction; nothing has run for it yet.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

from .errors import ArtifactError, RuntimeProgramError
from .fake_run import FakeRun, hint_sizes, output_bytes, propagate
from .op_table import bind_arguments, writes_of
from .program import Instruction, Program

REMEMBERED_SIZES = 64   # sets of dynamic sizes whose peak is kept (a decode loop uses one or a few)


class CallGuard:
    def __init__(self, program: Program, constants: dict[str, torch.Tensor], device: torch.device, limit: int,
                 found: FakeRun):
        self.program, self.device, self.limit = program, device, limit
        self.unbounded = found.unbounded
        self.peaks: OrderedDict[tuple, int] = OrderedDict({_key(hint_sizes(program)): found.peak})
        self.watch_storages(constants)
        self.call = threading.local()   # the running call's base peak, extra bytes and input storages

    def watch_storages(self, constants: dict[str, torch.Tensor]) -> None:
        """(Re)read which storages hold weights: again after constants were made to share storage."""
        self.constants = {name: constants[name] for name in self.program.constant_names}
        state = set(self.program.state_names)
        self.weights = {_storage(t) for name, t in self.constants.items() if name not in state} - {0}

    def watches(self, index: int, inst: Instruction) -> bool:
        return index in self.unbounded or bool(writes_of(inst.op))

    def begin(self, inputs: Sequence[Any], sizes: dict[str, int]) -> None:
        """Start a call: its peak at these sizes must fit, and its inputs become unwritable."""
        self.call.base = self._peak(sizes)
        self.call.extra = 0
        self.call.inputs = {_storage(t) for t in inputs if isinstance(t, torch.Tensor)} - {0}

    def wrap(self, index: int, inst: Instruction, fn: Callable[..., Any]) -> Callable[..., Any]:
        where = f"instruction {index} ({inst.op}, node '{inst.name}')"
        written, unbounded = writes_of(inst.op), index in self.unbounded

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if written:
                self._check_writes(where, inst.op, written, args, kwargs)
            if unbounded:
                self._check_bytes(where, inst.op, args, kwargs)
            return fn(*args, **kwargs)
        return guarded

    def _peak(self, sizes: dict[str, int]) -> int:
        key = _key(sizes)
        if key in self.peaks:
            self.peaks.move_to_end(key)
            return self.peaks[key]
        try:
            peak = propagate(self.program, self.constants, self.device, self.limit, sizes).peak
        except ArtifactError as err:
            raise RuntimeProgramError(f"refused before running: {err}") from None
        self.peaks[key] = peak
        if len(self.peaks) > REMEMBERED_SIZES:
            self.peaks.popitem(last=False)
        return peak

    def _check_writes(self, where: str, op: str, written: list[str], args: tuple, kwargs: dict) -> None:
        bound = bind_arguments(op, list(args), kwargs)
        for name in written:
            value = bound.get(name)
            tensors = value if isinstance(value, (list, tuple)) else [value]
            for tensor in tensors:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = _storage(tensor)
                if storage in self.weights:
                    raise RuntimeProgramError(f"{where}: writes into a weight's storage (argument {name!r}); "
                                              "only program state may be written")
                if storage in self.call.inputs:
                    raise RuntimeProgramError(f"{where}: writes into the caller's input (argument {name!r})")

    def _check_bytes(self, where: str, op: str, args: tuple, kwargs: dict) -> None:
        try:
            nbytes = output_bytes(op, args, kwargs, where)
        except ArtifactError as err:
            raise RuntimeProgramError(str(err)) from None
        if nbytes is None:   # data-dependent size: bounded by its inputs (nonzero, unique, item)
            return
        self.call.extra += nbytes
        if self.call.base + self.call.extra > self.limit:
            raise RuntimeProgramError(f"{where}: would hold {self.call.base + self.call.extra} bytes of live values, "
                                      f"over the limit of {self.limit} bytes (pass max_memory to load to raise it)")


def _key(sizes: dict[str, int]) -> tuple:
    return tuple(sorted(sizes.items()))


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


__all__ = ["CallGuard", "REMEMBERED_SIZES"]
