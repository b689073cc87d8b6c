"""Run `sparsecc::moe` on its N:M-compressed expert weights where the program decompresses them for it.

prune-nm keeps stacked expert weights compressed at rest and emits, per weight,

    w = sparsecc::nm_decompress(values, indices, n, m, K)      values, indices: constants [E, rows, ...]
    y = sparsecc::moe(hidden, router_logits, w_gate_up, w_down, ...)

which expands every expert on every call: in decode, where one token reaches top_k of E experts, that
is E / top_k times the weight bytes a dense model reads, written and read again. On CPU the executor
runs such a pair as one call of `moe_cpu_nm` (kernels/cpu/moe_decode.py): each used expert's two
projections on its own slice of the compressed tensors, through nm_linear's measured paths, and never
a dense expert weight. The pair is fused only where nothing else can see the difference: both expert
weights come from nm_decompress of CPU constants with one N:M pattern, and no instruction other than
that moe reads the decompressed register before it is written again (nor is it a program output).
The decompress instructions then run nothing. Same numbers as the pair (tests/runtime/test_expert_fusion.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .kernels.cpu.moe_decode import NMExperts, moe_cpu_nm
from .program import Instruction, Program

DECOMPRESS, MOE = "sparsecc::nm_decompress", "sparsecc::moe"
WEIGHT_ARGS = (2, 3)   # w_gate_up, w_down in sparsecc::moe's schema


def fused_expert_calls(program: Program, constants: dict[str, torch.Tensor]) -> dict[int, Callable[..., Any]]:
    """{instruction index: what runs there instead}: every fusable (decompress, decompress, moe) triple."""
    fused: dict[int, Callable[..., Any]] = {}
    for index, inst in enumerate(program.instructions):
        if inst.op != MOE or len(inst.args) <= max(WEIGHT_ARGS):
            continue
        sources = [_register(inst.args[a]) for a in WEIGHT_ARGS]
        found = [_decompressed_by(program, r, index) for r in sources]
        if None in found or not all(_only_reader(program, r, p[0], index) for r, p in zip(sources, found)):
            continue
        experts = _experts([p[1] for p in found], constants)
        if experts is None:
            continue
        fused[index] = _compressed_moe(experts)
        for producer, _ in found:
            fused[producer] = _skipped
    return fused


def _decompressed_by(program: Program, register: Optional[int], reader: int) -> Optional[tuple[int, Instruction]]:
    """(index, instruction) of the last write of `register` before `reader` when it is an nm_decompress
    (registers are reused: an earlier layer's decompression may have written the same one)."""
    for index in range(reader - 1, -1, -1):
        inst = program.instructions[index]
        if register in inst.outputs:
            return (index, inst) if inst.op == DECOMPRESS else None
    return None


def _experts(decompressions: list[Instruction], constants: dict[str, torch.Tensor]) -> Optional[NMExperts]:
    """The compressed (gate_up, down) of the two nm_decompress calls, when both are CPU constants of one N:M."""
    parts = []
    for inst in decompressions:
        values, indices = (_constant(a, constants) for a in inst.args[:2])
        n, m = inst.args[2:4] if len(inst.args) >= 4 else (None, None)
        if values is None or indices is None or values.device.type != "cpu" or values.dim() != 3:
            return None
        parts.append((values, indices, n, m))
    (gv, gi, n, m), (dv, di, n2, m2) = parts
    if (n, m) != (n2, m2) or not all(isinstance(v, int) for v in (n, m)):
        return None
    return NMExperts(gv, gi, dv, di, n, m)


def _compressed_moe(experts: NMExperts) -> Callable[..., Any]:
    def moe(hidden, router_logits, w_gate_up, w_down, *args, **kwargs):
        return moe_cpu_nm(experts, hidden, router_logits, None, None, *args, **kwargs)
    return moe


def _skipped(*args: Any, **kwargs: Any) -> None:
    """A decompression the fused moe call does without."""
    return None


def _constant(arg: Any, constants: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    return constants.get(arg["c"]) if isinstance(arg, dict) and set(arg) == {"c"} else None


def _register(arg: Any) -> Optional[int]:
    return arg["r"] if isinstance(arg, dict) and set(arg) == {"r"} else None


def _reads(value: Any, register: int) -> bool:
    if isinstance(value, list):
        return any(_reads(v, register) for v in value)
    if isinstance(value, dict):
        return value == {"r": register}
    return False


def _only_reader(program: Program, register: Optional[int], producer: int, reader: int) -> bool:
    """Whether the moe at `reader` is the only instruction reading `register` between its write at `producer`
    and the next write of it (or the program's end, where it must not be an output)."""
    if register is None or producer >= reader:
        return False
    for index in range(producer + 1, len(program.instructions)):
        inst = program.instructions[index]
        args = [*inst.args, *inst.kwargs.values()]
        if index == reader:
            if sum(_reads(a, register) for a in args) != 1:
                return False
        elif _reads(args, register):
            return False
        if register in inst.outputs and index != producer:
            return True
    return not _reads(list(program.outputs), register)
