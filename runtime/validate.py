"""Load-time validation of a Program: everything an artifact's data can get wrong, refused before anything runs.

`validate_program` checks, in order:
1. structure: the JSON type of every field, registers inside `num_registers`
   (which cannot exceed what the inputs and instructions write), dtypes from
   the fixed table, shapes of ints >= 0 or symbols with a range, hints inside
   their ranges, state names among the constants;
2. each instruction: its op in the op table and its arguments fitting the op's
   schema, every register it reads written earlier, every constant listed and
   loaded, no in-place write into a weight (only `state_names` may be written,
   directly or through a view);
3. fake propagation at the symbol hints (`sparsecc.runtime.fake_run`): shapes,
   dtypes and sparse-op verifiers, and the peak bytes of live registers under
   `max_bytes` (default `DEFAULT_MAX_BYTES_RULE`).
Every refusal is an ArtifactError naming the instruction index, op and node.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from .errors import ArtifactError
from .fake_run import FakeRun, propagate
from .inputs import MAX_CONSTANT_ITEMS, plain_constant
from .op_table import DTYPES, argument_problem, bind_arguments, returns_alias, writes_of
from .program import InputSpec, Instruction, Program

WEIGHTS_MULTIPLE = 8                 # a program may hold live registers up to 8x its weights...
MIN_MAX_BYTES = 1 << 30              # ...and never less than 1 GiB
DEFAULT_MAX_BYTES_RULE = "max(8 x the weights' bytes, 1 GiB)"
MAX_DIMS = 64                        # torch's own limit on tensor rank
MAX_DIM_SIZE = 1 << 62
ARGUMENT_KINDS = ("r", "c", "dtype", "device", "layout", "memory_format")   # see sparsecc.runtime.program


def default_max_bytes(constants: dict[str, torch.Tensor]) -> int:
    """The allocation limit of a program over `constants` (DEFAULT_MAX_BYTES_RULE)."""
    weights = sum(t.numel() * t.element_size() for t in constants.values())
    return max(WEIGHTS_MULTIPLE * weights, MIN_MAX_BYTES)


def validate_program(program: Program, constants: dict[str, torch.Tensor], *, device: torch.device,
                     max_bytes: Optional[int] = None) -> FakeRun:
    """Raise ArtifactError unless `program` over `constants` is safe to run on `device`; the fake
    run's findings are returned for the call guard, which checks what a load cannot."""
    try:
        check_structure(program)
        missing = sorted(set(program.constant_names) - set(constants))
        if missing:
            raise ArtifactError(f"program constants {', '.join(missing[:5])} are not among the loaded weights")
        check_dataflow(program)
        used = {name: constants[name] for name in program.constant_names}
        return propagate(program, used, torch.device(device),
                         default_max_bytes(used) if max_bytes is None else max_bytes)
    except ArtifactError:
        raise
    except (TypeError, KeyError, IndexError, AttributeError, ValueError, RecursionError) as err:
        raise ArtifactError(f"malformed program ({type(err).__name__}: {err})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise ArtifactError(f"{where}: {problem}")


def check_structure(program: Program) -> None:
    """JSON types and ranges of every Program field (no op semantics yet)."""
    _require(_is_int(program.num_registers) and program.num_registers >= 0, "program",
             f"num_registers {program.num_registers!r} is not an int >= 0")
    _check_symbols(program)
    _require(isinstance(program.inputs, list) and all(_is_int(r) for r in program.inputs), "program",
             "inputs must be a list of register numbers")
    _require(len(set(program.inputs)) == len(program.inputs), "program", "inputs use a register twice")
    for r in program.inputs:
        _require(0 <= r < program.num_registers, "program",
                 f"input register {r} outside 0..{program.num_registers - 1}")
    _require(isinstance(program.input_specs, list) and len(program.input_specs) == len(program.inputs), "program",
             "input_specs must list one spec per input")
    for spec in program.input_specs:
        _check_input_spec(spec, program.symbol_ranges)
    names = program.constant_names
    _require(isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names),
             "program", "constant_names must be distinct strings")
    _require(isinstance(program.state_names, list) and set(program.state_names) <= set(names), "program",
             "state_names must name constants")
    constants = program.constant_kwargs
    _require(isinstance(constants, dict) and len(constants) <= MAX_CONSTANT_ITEMS
             and all(isinstance(k, str) and plain_constant(v) for k, v in constants.items()), "program",
             "constant_kwargs must map keyword names to plain JSON data (null, bool, number, string, lists)")
    _require(isinstance(program.instructions, list) and isinstance(program.outputs, list), "program",
             "instructions and outputs must be lists")
    for index, inst in enumerate(program.instructions):
        _check_instruction_fields(index, inst, program.num_registers)
    writable = len(program.inputs) + sum(len(inst.outputs) for inst in program.instructions)
    _require(program.num_registers <= writable, "program",
             f"num_registers={program.num_registers} but the inputs and instructions write at most {writable}")


def _check_symbols(program: Program) -> None:
    ranges, hints = program.symbol_ranges, program.symbol_hints
    _require(isinstance(ranges, dict) and isinstance(hints, dict), "program", "symbol ranges and hints must be objects")
    for symbol, bounds in ranges.items():
        ok = isinstance(bounds, list) and len(bounds) == 2 and _is_int(bounds[0]) and 0 <= bounds[0] <= MAX_DIM_SIZE \
            and (bounds[1] is None or (_is_int(bounds[1]) and bounds[0] <= bounds[1]))
        _require(ok, "program", f"symbol {symbol!r} has range {bounds!r}, not [low >= 0, high >= low or null]")
    for symbol, hint in hints.items():
        _require(symbol in ranges, "program", f"symbol hint for {symbol!r}, which has no range")
        low, high = ranges[symbol]
        _require(_is_int(hint) and low <= hint and (high is None or hint <= high), "program",
                 f"symbol {symbol!r} hint {hint!r} outside its range [{low}, {high}]")


def _check_input_spec(spec: InputSpec, ranges: dict) -> None:
    where = f"input spec {getattr(spec, 'name', '?')!r}"
    _require(isinstance(spec, InputSpec) and isinstance(spec.name, str), where, "malformed input spec")
    _require(isinstance(spec.dtype, str) and spec.dtype in DTYPES, where,
             f"dtype {spec.dtype!r} is not one of {', '.join(DTYPES)}")
    _require(isinstance(spec.shape, list) and len(spec.shape) <= MAX_DIMS, where, "shape must be a list of dims")
    for dim in spec.shape:
        ok = (_is_int(dim) and 0 <= dim <= MAX_DIM_SIZE) or (isinstance(dim, str) and dim in ranges)
        _require(ok, where, f"dim {dim!r} is neither a size >= 0 nor a symbol with a range")


def _check_instruction_fields(index: int, inst: Instruction, num_registers: int) -> None:
    where = f"instruction {index}"
    _require(isinstance(inst, Instruction) and isinstance(inst.op, str) and isinstance(inst.name, str), where,
             "malformed instruction (op and name must be strings)")
    where = f"instruction {index} ({inst.op}, node {inst.name!r})"
    _require(isinstance(inst.args, list) and isinstance(inst.kwargs, dict)
             and all(isinstance(k, str) for k in inst.kwargs), where, "args must be a list and kwargs an object")
    _require(isinstance(inst.unpack, bool) and isinstance(inst.outputs, list)
             and all(_is_int(r) for r in inst.outputs), where, "outputs must be register numbers, unpack a bool")
    _require(inst.unpack or len(inst.outputs) == 1, where, "an instruction that does not unpack writes one register")
    for r in inst.outputs:
        _require(-1 <= r < num_registers and (r >= 0 or inst.unpack), where,
                 f"output register {r} outside 0..{num_registers - 1}")


def _encoded(value: Any, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(kind, payload) of each register / constant reference inside an encoded argument."""
    if depth > 8:
        raise ValueError("arguments nested deeper than 8 lists")
    if isinstance(value, list):
        for item in value:
            yield from _encoded(item, depth + 1)
    elif isinstance(value, dict):
        if len(value) != 1:
            raise ValueError(f"an encoded value has keys {sorted(value)[:4]}, not exactly one")
        yield next(iter(value.items()))


def check_dataflow(program: Program) -> None:
    """Ops and arguments, reads after writes, constants listed, no writes into weights."""
    written = set(program.inputs)
    aliases: dict[int, set[str]] = {}        # register -> constants it may share storage with
    for index, inst in enumerate(program.instructions):
        where = f"instruction {index} ({inst.op}, node {inst.name!r})"
        problem = argument_problem(inst.op, inst.args, inst.kwargs)
        _require(problem is None, where, problem or "")
        sources = _reads(where, [inst.args, list(inst.kwargs.values())], written, program)
        _check_writes(where, inst, aliases, set(program.state_names))
        shared = _storage_sources(sources, aliases) if returns_alias(inst.op) else set()
        for r in inst.outputs:
            aliases.pop(r, None)
            if r >= 0:
                written.add(r)
                if shared:
                    aliases[r] = shared
    _reads("program outputs", program.outputs, written, program, kinds=("r", "c"))


def _reads(where: str, value: Any, written: set[int], program: Program, kinds: tuple = ARGUMENT_KINDS) -> list:
    """Registers (ints) and constants (names) read by `value`, each checked; other encodings must be in `kinds`."""
    try:
        refs = list(_encoded(value))
    except ValueError as err:
        raise ArtifactError(f"{where}: {err}") from None
    sources = []
    for kind, payload in refs:
        if kind not in kinds:
            raise ArtifactError(f"{where}: {kind!r} is not an encoding allowed here ({', '.join(kinds)})")
        if kind == "r":
            _require(_is_int(payload) and 0 <= payload < program.num_registers, where,
                     f"register {payload!r} outside 0..{program.num_registers - 1}")
            _require(payload in written, where, f"reads register {payload} before anything writes it")
        elif kind == "c":
            _require(isinstance(payload, str) and payload in program.constant_names, where,
                     f"constant {payload!r} is not among the program's constants")
        if kind in ("r", "c"):
            sources.append(payload)
    return sources


def _check_writes(where: str, inst: Instruction, aliases: dict[int, set[str]], state: set[str]) -> None:
    """An in-place or out= argument may be a register or program state, never a weight (or a view of one)."""
    bound = bind_arguments(inst.op, inst.args, inst.kwargs)
    for name in writes_of(inst.op):
        for kind, payload in _encoded(bound.get(name)):
            targets = {payload} if kind == "c" else aliases.get(payload, set()) if kind == "r" else set()
            weights = sorted(targets - state)
            if weights:
                raise ArtifactError(f"{where}: writes into weight {weights[0]!r} (argument {name!r}); "
                                    "only program state may be written")


def _storage_sources(sources: list, aliases: dict[int, set[str]]) -> set[str]:
    """Constants a view of `sources` (registers and constant names) may share storage with."""
    shared: set[str] = set()
    for source in sources:
        shared |= {source} if isinstance(source, str) else aliases.get(source, set())
    return shared
