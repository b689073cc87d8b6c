"""`CompiledModel.save` / `sparsecc build`: record the program's kernel launches, cross-compile, write the artifact.

1. Record: run the Program once on the example inputs with each sparse op's
   Triton launcher under a recording hook (nothing launches; the op's CPU
   kernel supplies the values later ops see). Every launch gives a
   `KernelSpec` (kernel, argument types, constexprs, options): exactly the
   specialisations the program uses at those shapes. A program with dynamic
   dims also records the tile configurations other token counts pick (VARIANTS).
2. Build each spec for each GPU target in parallel worker processes, through
   the kernel cache (`sparsecc.kernel_build`). Named CPU targets (`cpu:x86-64-v4`):
   the generated CPU kernels a CPU run asks for, built as objects for that CPU.
3. Write manifest + weights + binaries (`sparsecc.artifact_writer`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from sparsecc.runtime.artifact import parse_target, program_on
from sparsecc.runtime.executor import Executor
from sparsecc.runtime.expert_shards import shard_program
from sparsecc.runtime.kernels.cpu.mlir.aot import build_cpu_kernels, kernel_sources
from sparsecc.runtime.kernels.cpu.mlir.jit import recording
from sparsecc.runtime.kernels.triton.launch import KERNEL_MODULE_PREFIX, KernelSpec, bind_launch, use_launcher
from sparsecc.runtime.ops import get_op
from sparsecc.runtime.program import Program
from sparsecc.runtime.signing import SigningKey, signing_key

from .artifact_writer import write_artifact
from .errors import SparseccError
from .kernel_build import build_kernels


class BuildError(SparseccError):
    """An artifact that cannot be built: bad target, a kernel that fails to compile, ..."""


# Token counts a program with dynamic dims is recorded at, beside its example: the launchers pick tiles
# by token count in buckets a factor of 2 or more wide, so powers of two reach every bucket.
SWEEP_TOKENS = tuple(2 ** i for i in range(13))


def _nm_linear_variants(args: tuple) -> list[tuple]:
    x, *rest = args
    return [(torch.zeros(t, x.shape[-1], dtype=x.dtype, device=x.device), *rest) for t in SWEEP_TOKENS]


def _moe_variants(args: tuple) -> list[tuple]:
    hidden, logits, *rest = args
    return [(torch.zeros(t, hidden.shape[1], dtype=hidden.dtype, device=hidden.device),
             torch.randn(t, logits.shape[1], dtype=logits.dtype, device=logits.device), *rest)
            for t in SWEEP_TOKENS]


# op -> other calls whose launches a program with dynamic dims may also make
VARIANTS: dict[str, Callable[[tuple], list[tuple]]] = {
    "sparsecc::nm_linear": _nm_linear_variants,
    "sparsecc::moe": _moe_variants,
}


class LaunchRecorder:
    """Collects the KernelSpec of every launch, and which ops made it."""

    def __init__(self):
        self.specs: dict[str, tuple[KernelSpec, set[str]]] = {}

    def hook(self, op: str) -> Callable[..., None]:
        def record(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
            spec, _ = bind_launch(kernel, args, kwargs)
            if not spec.kernel.startswith(KERNEL_MODULE_PREFIX):
                raise BuildError(f"{op} launches {spec.kernel}, which is not a sparsecc Triton kernel")
            self.specs.setdefault(spec.key(), (spec, set()))[1].add(op)
        return record

    def wrap(self, op: str, variants: bool) -> Callable[..., Any]:
        definition = get_op(op)
        try:
            triton_kernel = definition.kernel("triton")
        except KeyError as err:
            raise BuildError(f"{op} has no Triton kernel, so the program cannot run on a GPU target: {err}") from None
        torch_kernel = definition.kernel("torch")

        def recorded(*args: Any, **kwargs: Any) -> Any:
            calls = [args] + (VARIANTS[op](args) if variants and op in VARIANTS else [])
            with use_launcher(self.hook(op)):
                for call in calls:
                    try:
                        triton_kernel(*call, **kwargs)
                    except BuildError:
                        raise
                    except Exception as err:
                        raise BuildError(f"recording the kernel launches of {op} failed: {err}") from err
            return torch_kernel(*args, **kwargs)
        return recorded


def record_kernels(program: Program, constants: dict[str, torch.Tensor], example_inputs: Sequence[torch.Tensor],
                   variants: Optional[bool] = None) -> list[tuple[KernelSpec, list[str]]]:
    """The kernel specialisations `program` launches on `example_inputs` (plus variants when dynamic).
    Recorded on CPU copies: the launchers pick the same specialisations on any device, and on CUDA
    tensors nm_linear would reach its autotuner, which must not time launches that never run."""
    variants = bool(program.symbol_ranges) if variants is None else variants
    recorder = LaunchRecorder()
    ops = sorted({inst.op for inst in program.instructions if inst.op.startswith("sparsecc::")})
    overrides = {op: recorder.wrap(op, variants) for op in ops}
    cpu = torch.device("cpu")
    if any(t.device != cpu for t in (*example_inputs, *constants.values())):
        program = program_on(program, cpu)
        constants = {name: t.to(cpu) for name, t in constants.items()}
        example_inputs = [t.to(cpu) for t in example_inputs]
    state = {name: constants[name].clone() for name in program.state_names}   # the artifact saves the state as it was
    Executor(program, {**constants, **state}, "torch", kernels=overrides).run(list(example_inputs))
    return [(spec, sorted(users)) for spec, users in recorder.specs.values()]


def save_artifact(program: Program, constants: dict[str, torch.Tensor], example_inputs: Sequence[torch.Tensor],
                  path: os.PathLike, targets: Sequence[str] = ("cpu",), *, cache_dir: Optional[os.PathLike] = None,
                  workers: Optional[int] = None, progress: bool = True,
                  sign_with: Optional[SigningKey] = None, world_size: int = 1,
                  described: Optional[dict[str, Any]] = None, borrowed: Iterable[str] = ()) -> dict[str, Any]:
    """Build `program` for `targets` into the folder `path`; returns the manifest written. With
    `sign_with` (an Ed25519 private key, PEM bytes or a PEM file) the manifest is signed. With
    `world_size` W > 1 the experts of every sparsecc::moe are split over W ranks, each rank's in its own
    file (`sparsecc.runtime.expert_shards`)."""
    if any(inst.op == "sparsecc::moe_ep" for inst in program.instructions):
        raise BuildError("save: this program holds one rank's experts (compiled with distributed experts); compile "
                         "without `distributed` and save with world_size=W to write every rank's experts")
    targets = list(dict.fromkeys(targets))
    try:
        sign_with = signing_key(sign_with) if sign_with is not None else None   # a bad key fails before the build
    except (ValueError, OSError) as err:
        raise BuildError(f"save: {err}") from None
    if not targets:
        raise BuildError("no targets given (e.g. targets=['cpu', 'cuda:90'])")
    try:
        gpu_targets = [t for t in targets if parse_target(t)[0] != "cpu"]
    except ValueError as err:
        raise BuildError(str(err)) from None
    specs = record_kernels(program, constants, example_inputs) if gpu_targets else []
    built = build_kernels([s for s, _ in specs], gpu_targets, cache_dir=cache_dir, workers=workers, progress=progress)
    cpu_targets = [t for t in targets if parse_target(t)[0] == "cpu" and parse_target(t)[1]]
    cpu_built = build_cpu_objects(program, constants, example_inputs, cpu_targets, cache_dir) if cpu_targets else []
    rank_constants: list = []
    if world_size > 1:
        program, constants, rank_constants = shard_program(program, constants, world_size)
    return write_artifact(Path(path), program, constants, targets, specs, built, sign_with=sign_with,
                          rank_constants=rank_constants, described=described, cpu_built=cpu_built,
                          borrowed=borrowed)


def build_cpu_objects(program: Program, constants: dict[str, torch.Tensor], example_inputs: Sequence[torch.Tensor],
                      cpu_targets: Sequence[str], cache_dir: Optional[os.PathLike] = None) -> list[dict[str, Any]]:
    """Run the program once on CPU recording the generated kernels it asks for, then build each for every
    named CPU target (`sparsecc.runtime.kernels.cpu.mlir.aot`); with dynamic dims every decode token count."""
    cpu = torch.device("cpu")
    program = program_on(program, cpu)
    constants = {name: t.to(cpu) for name, t in constants.items()}
    state = {name: constants[name].clone() for name in program.state_names}   # the artifact saves the state as it was
    with recording() as used:
        Executor(program, {**constants, **state}, "torch").run([t.to(cpu) for t in example_inputs])
    try:
        return build_cpu_kernels(kernel_sources(used, bool(program.symbol_ranges)), cpu_targets, cache_dir)
    except ValueError as err:
        raise BuildError(f"save: {err}") from None
