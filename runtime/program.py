"""The lowered program: what the runtime executes and what an artifact stores.

A Program is an ordered list of instructions over numbered registers. Each
instruction names an op by qualified name (`aten::linear.default`,
`sparsecc::nm_linear`, `py::getitem`), encoded arguments, and the registers
its results go to. Registers are reused once a value is dead (the memory plan
from liveness, see `sparsecc.lower`), so `num_registers` is usually far below
the number of values. Constants (weights) are held by name outside the
instructions.

Argument encoding (JSON-safe, used verbatim in artifacts):
  {"r": i}               register i
  {"c": "name"}          constant `name`
  {"dtype": "float32"}   a torch.dtype          {"device": "cpu"}   a torch.device
  {"layout": "strided"}  {"memory_format": "contiguous_format"}
  [..]                   list (tuples are stored as lists)
  int / float / bool / str / None as themselves
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 2   # 2: structure in sparsecc's own tree schema, program state, symbol hints


@dataclass(frozen=True)
class Instruction:
    op: str
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: list[int]         # registers written; -1 for a tuple element nobody reads
    unpack: bool = False       # the op returns a tuple whose elements go to `outputs`
    name: str = ""             # the FX node this came from (for errors and printing)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: list[Any]           # ints, or symbol names like "s0" for dynamic dims


@dataclass
class Program:
    inputs: list[int]                      # registers holding the flat inputs, in order
    input_specs: list[InputSpec]
    instructions: list[Instruction]
    outputs: list[Any]                     # encoded values (usually {"r": i})
    num_registers: int
    constant_names: list[str]
    symbol_ranges: dict[str, list[Any]] = field(default_factory=dict)  # "s0" -> [min, max|None]
    symbol_hints: dict[str, int] = field(default_factory=dict)        # "s0" -> its size in the example inputs
    in_spec: Any = None                    # structure of (args, kwargs), sparsecc.runtime.tree_schema JSON
    out_spec: Any = None                   # structure of the outputs, same schema
    state_names: list[str] = field(default_factory=list)  # constants the program mutates (its own state)
    constant_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword inputs baked in at capture (plain data)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Program":
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"program format version {version!r} is not supported (expected {FORMAT_VERSION})")
        data["instructions"] = [Instruction(**i) for i in data["instructions"]]
        data["input_specs"] = [InputSpec(**s) for s in data["input_specs"]]
        return cls(**data)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for inst in self.instructions:
            counts[inst.op] = counts.get(inst.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in list(self.op_counts().items())[:8])
        return (f"{len(self.instructions)} instructions, {self.num_registers} registers, "
                f"{len(self.constant_names)} constants; {ops}")
