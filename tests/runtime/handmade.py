"""Programs written by hand, as an attacker who edits an artifact's JSON would write them."""
from __future__ import annotations

from typing import Any

import torch

from sparsecc.runtime.program import InputSpec, Instruction, Program


def inst(op: str, args: list, outputs: list[int], kwargs: dict | None = None, unpack: bool = False,
         name: str = "") -> Instruction:
    return Instruction(op, args, kwargs or {}, outputs, unpack, name or op.split("::")[-1].split(".")[0])


def program(instructions: list[Instruction], outputs: list[Any], *, num_registers: int,
            shape: list[Any] = (4, 8), dtype: str = "float32", constants: dict[str, torch.Tensor] | None = None,
            state: list[str] = (), **fields: Any) -> Program:
    """One input `x` in register 0 with `shape`; constants named as given."""
    return Program(inputs=[0], input_specs=[InputSpec("x", dtype, list(shape))], instructions=list(instructions),
                   outputs=outputs, num_registers=num_registers, constant_names=sorted(constants or {}),
                   state_names=list(state), **fields)


def weights() -> dict[str, torch.Tensor]:
    """A weight [8, 8], a one-element weight and an int64 counter."""
    return {"w": torch.randn(8, 8), "tiny": torch.ones(1), "calls": torch.zeros((), dtype=torch.int64)}
