"""An artifact for W ranks of expert parallelism: one program, the experts split into per-rank files.

`shard_program` turns every `sparsecc::moe` instruction into `sparsecc::moe_ep`
(world_size=W). The program still names each per-expert constant once (say
`moe_w_gate_up`); what differs per rank is its value, rank r's contiguous E/W
experts. So the artifact holds

    weights.safetensors               every constant no expert argument reads
    experts-rank<r>.safetensors       for r in 0..W-1: the per-expert constants, rank r's slice

and the manifest says so under "expert_parallel": {"world_size": W, "files": [...]}. A rank loads
weights.safetensors and its own experts file, never another rank's (`sparsecc.runtime.load(dir, rank=r)`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .errors import ArtifactError
from .kernels.moe_contract import MOE_ARGUMENTS
from .ops.moe_ep import EXPERT_ARGUMENTS, local_experts
from .program import Instruction, Program

EXPERT_FILE = "experts-rank{rank}.safetensors"


def expert_file(rank: int) -> str:
    return EXPERT_FILE.format(rank=rank)


def _expert_constants(inst: Instruction) -> list[str]:
    """Names of the constants `inst` (a moe call) passes as per-expert arguments."""
    found = []
    for name in EXPERT_ARGUMENTS:
        index = MOE_ARGUMENTS.index(name)
        arg = inst.args[index] if index < len(inst.args) else inst.kwargs.get(name)
        if isinstance(arg, dict) and set(arg) == {"c"}:
            found.append(arg["c"])
        elif arg is not None:
            raise ArtifactError(f"expert parallelism: {inst.name} computes its {name} (not a constant); "
                                "only constant expert weights can be split over ranks")
    return found


def _constants_in(arg: Any) -> list[str]:
    if isinstance(arg, list):
        return [name for a in arg for name in _constants_in(a)]
    return [arg["c"]] if isinstance(arg, dict) and set(arg) == {"c"} else []


def _read_otherwise(program: Program) -> set[str]:
    """Constants read anywhere but as a moe call's per-expert argument (outputs included)."""
    used = set(_constants_in(program.outputs))
    for inst in program.instructions:
        moe = inst.op == "sparsecc::moe"
        named = list(zip(MOE_ARGUMENTS, inst.args)) if moe else [(None, a) for a in inst.args]
        for name, arg in [*named, *inst.kwargs.items()]:
            if not (moe and name in EXPERT_ARGUMENTS):
                used.update(_constants_in(arg))
    return used


def shard_program(program: Program, constants: dict[str, torch.Tensor],
                  world_size: int) -> tuple[Program, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(the program with moe_ep instructions, the constants every rank loads, each rank's expert constants)."""
    instructions, sharded = [], set()
    for inst in program.instructions:
        if inst.op == "sparsecc::moe":
            sharded.update(_expert_constants(inst))
            inst = replace(inst, op="sparsecc::moe_ep", kwargs={**inst.kwargs, "world_size": world_size})
        instructions.append(inst)
    if not sharded:
        raise ArtifactError("expert parallelism: the program has no sparsecc::moe to split over ranks")
    shared_use = _read_otherwise(program) & sharded
    if shared_use:
        raise ArtifactError(f"expert parallelism: {', '.join(sorted(shared_use))} is read as an expert weight "
                            "and by another instruction; it cannot be split")
    shared = {name: constants[name] for name in program.constant_names if name not in sharded}
    per_rank = [{name: local_experts(constants[name], world_size, rank) for name in sorted(sharded)}
                for rank in range(world_size)]
    return replace(program, instructions=instructions), shared, per_rank


__all__ = ["EXPERT_FILE", "expert_file", "shard_program"]
