"""A loaded artifact: the Program, its weights on the device, and prebuilt kernels for the device's target.

On CPU the program runs with the CPU kernels. On a GPU it runs the Triton
launchers' host code with every kernel launch routed (`use_launcher`) to the
artifact's binaries for the device's target, loaded through the driver API:
Triton never compiles anything. A launch whose specialisation the artifact
does not hold is an error that names the kernel and its constexprs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from . import tree_schema
from .artifact import (device_target, malformed, parse_target, program_on, rank_files, read_checked, read_manifest,
                       verify_files, weights_name)
from .distributed import dist_rank, group_rank
from .errors import ArtifactError, InputMismatchError, RuntimeProgramError
from .checkpoint_weights import checkpoint_constants
from .executor import Executor
from .op_table import DTYPES
from .inputs import without_constants
from .program import Program
from .call_guard import CallGuard
from .validate import default_max_bytes, validate_program
from .signing import TrustedKey


class PrebuiltKernels:
    """The launch hook of a loaded artifact: specialisation key -> loaded GPU function."""

    def __init__(self, functions: dict[str, Any], device: torch.device, target: str):
        self.functions, self.device, self.target = functions, device, target
        self._by_launch: dict[tuple, Any] = {}      # launch key -> function: the JSON key is built once

    def __call__(self, kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
        from .kernels.triton.launch import launch_key, spec_of
        key, runtime_args = launch_key(kernel, args, kwargs)
        function = self._by_launch.get(key)
        if function is None:
            spec = spec_of(key)
            function = self.functions.get(spec.key())
            if function is None:
                raise ArtifactError(f"kernel {spec.entry} was launched with a specialisation the artifact does not "
                                    f"hold for {self.target} (constexprs {spec.constexprs}, options {spec.options}, "
                                    f"argument types {[t for t, _ in runtime_args]}); rebuild the artifact with "
                                    "example inputs of these shapes")
            self._by_launch[key] = function
        if callable(grid):
            grid = grid(spec_of(key).constexprs)
        function.launch(grid, runtime_args, self.device)


class LoadedModel:
    """Call it like the original model; `manifest`, `target`, `device`, `cpu_kernels` say what was loaded."""

    def __init__(self, manifest: dict[str, Any], program: Program, constants: dict[str, torch.Tensor],
                 device: torch.device, target: str, kernels: PrebuiltKernels | None, guard: CallGuard):
        self.manifest, self.program, self.constants = manifest, program, constants
        self.device, self.target, self.kernels = device, target, kernels
        self._guard = guard
        self.cpu_kernels = ""        # on CPU: whether the artifact's prebuilt kernel objects are used, and why
        self._executor = Executor(program, constants, "torch" if kernels is None else "triton", guard=guard)
        self._in_spec = _schema(program.in_spec, "program in_spec")
        self._out_spec = _schema(program.out_spec, "program out_spec")
        tree_schema.check_outputs(self._out_spec, len(program.outputs), "program out_spec")
        self._initial_state = self.state_dict()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = _input_tensors(self._in_spec, args, without_constants(self.program.constant_kwargs, kwargs))
        if self.kernels is None:
            outputs = self._executor.run(tensors)
        else:
            from .kernels.triton.launch import use_launcher
            with use_launcher(self.kernels):
                outputs = self._executor.run(aligned(tensors))
        return tree_schema.unflatten(self._out_spec, outputs) if self._out_spec is not None else outputs

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the program's state (the buffers its forward writes), as saved in the artifact
        and updated by each call."""
        return {name: self.constants[name].detach().clone() for name in self.program.state_names}

    def reset_state(self) -> None:
        """Put the program's state back to its value at load (e.g. an empty KV cache)."""
        with torch.no_grad():
            for name, value in self._initial_state.items():
                self.constants[name].copy_(value)

    def storages_changed(self) -> None:
        """Call after constants were made to share another program's storage (`Tensor.set_`): the
        per-call guard re-reads which storages are weights."""
        self._guard.watch_storages(self.constants)
        self._initial_state = self.state_dict()

    def __repr__(self) -> str:
        return f"LoadedModel(target={self.target!r}, device={str(self.device)!r}, {self.program.summary()})"


def _schema(data: Any, what: str) -> Optional[tree_schema.TreeNode]:
    return None if data is None else tree_schema.decode(data, what)


def _input_tensors(schema: Optional[tree_schema.TreeNode], args: tuple, kwargs: dict) -> tuple:
    """The call's tensors in program order; without a stored structure, positional tensors only."""
    if schema is not None:
        return tree_schema.flatten(schema, args, kwargs)
    if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
        raise InputMismatchError("this program stores no input structure: pass its tensor inputs positionally")
    return tuple(args)


def aligned(tensors: tuple) -> tuple:
    """Inputs and constants 16-byte aligned, as the kernels were built for (a binary that assumes aligned
    pointers must not see a view that starts mid-vector, nor a constant at an odd offset of the weights
    file's buffer): a misaligned tensor is copied."""
    return tuple(t.clone() if t.data_ptr() % 16 else t for t in tensors)


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu", *,
         trusted_keys: Optional[Iterable[TrustedKey]] = None, max_memory: Optional[int] = None,
         rank: Optional[int] = None, borrowed: Optional[dict[str, torch.Tensor]] = None,
         compressed: Union[str, Path, None] = None) -> LoadedModel:
    """Load an artifact written by `CompiledModel.save` / `sparsecc build`; returns a callable LoadedModel.
    With `trusted_keys` (Ed25519 public keys: key objects, raw 32 bytes or PEM), an artifact not signed by
    one of them is refused before its manifest is parsed. `max_memory` bounds what the program may allocate.
    An artifact saved with world_size W > 1 loads only rank `rank`'s experts (default: this process's rank in
    the torch.distributed process group), never another rank's file. `borrowed`: a sibling program's constants
    for the weights the manifest lists as borrowed (a saved generator's decode takes its prefill's).
    `compressed`: a pruned checkpoint (sparsecc.prune_checkpoint's out_dir) whose N:M tensors replace the
    artifact's for the weights they compress (runtime/checkpoint_weights.py)."""
    root, device = Path(path), torch.device(device)
    manifest = read_manifest(root, trusted_keys)
    with malformed(root):
        weights = [weights_name(manifest), *_rank_file(manifest, rank)]
        verify_files(root, manifest, skip={*weights, *rank_files(manifest)})   # weights: checked as read, once
        target = device_target(device, list(manifest.get("targets", [])))
    with malformed(root, "program in the manifest"):
        program = program_on(Program.from_dict(manifest["program"]), device)
    with malformed(root):
        constants = _load_weights(root, weights, program, device, manifest, borrowed)
        if compressed is not None:
            constants.update(checkpoint_constants(compressed, manifest, constants))
        limit = default_max_bytes({n: constants[n] for n in program.constant_names}) if max_memory is None else max_memory
        found = validate_program(program, constants, device=device, max_bytes=limit)
        kernels = None if target == "cpu" else _load_kernels(root, manifest, target, device)
        cpu_kernels = _use_cpu_objects(root, manifest, trusted_keys is not None) if target == "cpu" else ""
        guard = CallGuard(program, constants, device, limit, found)
        model = LoadedModel(manifest, program, constants, device, target, kernels, guard)
        model.cpu_kernels = cpu_kernels
        return model


def _use_cpu_objects(root: Path, manifest: dict[str, Any], verified: bool) -> str:
    """Offer the artifact's prebuilt CPU kernel objects where that is safe (kernels/cpu/mlir/aot.py: signature
    verified against trusted keys, host has the target's features); returns the sentence saying what was done."""
    from .kernels.cpu.mlir.aot import cpu_objects_decision, use_cpu_objects
    target, why = cpu_objects_decision(manifest, verified)
    if target is not None:
        use_cpu_objects(manifest, target, lambda name: read_checked(root, name, manifest))
    return why


def _rank_file(manifest: dict[str, Any], rank: Optional[int]) -> list[str]:
    """[this rank's expert file] for an expert-parallel artifact, [] for a one-process one."""
    files = rank_files(manifest)
    if not files:
        return []
    if rank is None:
        try:
            rank = group_rank(len(files))
        except RuntimeProgramError as err:
            raise ArtifactError(f"the artifact splits its experts over {len(files)} ranks: pass rank= or load it "
                                f"inside the process group ({err})") from None
    if type(rank) is not int or not 0 <= rank < len(files):
        raise ArtifactError(f"rank {rank!r} is not one of the artifact's {len(files)} ranks")
    if dist_rank() not in (None, rank):   # experts are sent to ranks by position: another slice is wrong numbers
        raise ArtifactError(f"rank={rank} but this process is rank {dist_rank()} of its process group: "
                            "load each rank's own experts")
    return [files[rank]]


def _load_weights(root: Path, names: list[str], program: Program, device: torch.device,
                  manifest: dict[str, Any], borrowed: Optional[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load
    constants: dict[str, torch.Tensor] = {}
    for name in names:
        data = read_checked(root, name, manifest)
        try:
            stored = load(data)
            constants.update(zip(stored, aligned(tuple(t.to(device) for t in stored.values()))))
        except (SafetensorError, OSError, ValueError) as err:
            raise ArtifactError(f"{root / name}: cannot read the weights: {err}") from None
    constants.update(_borrowed_weights(root, manifest, program, constants, borrowed, device))
    missing = sorted(set(program.constant_names) - set(constants))
    if missing:
        raise ArtifactError(f"{root / names[0]}: weights for {', '.join(missing[:5])} are missing")
    return constants


def _borrowed_weights(root: Path, manifest: dict[str, Any], program: Program, stored: dict[str, torch.Tensor],
                      borrowed: Optional[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """The manifest's borrowed constants, taken from `borrowed` (a sibling program's constants: a generator's
    decode takes the prefill's weights and its KV cache, the state both programs share) after checking each is a
    constant of this program not stored here, of the listed dtype and shape."""
    listed = manifest.get("borrowed_constants", {})
    if not isinstance(listed, dict):
        raise ArtifactError(f"{root}: borrowed_constants must be an object")
    if listed and borrowed is None:
        raise ArtifactError(f"{root}: {len(listed)} weights are borrowed from a sibling program (a saved generator's "
                            "decode takes its prefill's): load the generator folder")
    taken = {}
    for name, entry in listed.items():
        source = borrowed.get(name)
        if name not in program.constant_names or name in stored:
            raise ArtifactError(f"{root}: borrowed constant {name!r} is not a constant of this program")
        if not (isinstance(entry, dict) and entry.get("dtype") in DTYPES and isinstance(entry.get("shape"), list)):
            raise ArtifactError(f"{root}: borrowed constant {name!r} needs a dtype and a shape")
        if (source is None or source.dtype != DTYPES[entry["dtype"]] or list(source.shape) != entry["shape"]
                or source.device.type != device.type):
            raise ArtifactError(f"{root}: borrowed constant {name!r} ({entry['dtype']} {entry['shape']}) is not "
                                "among the sibling program's constants")
        taken[name] = source
    return taken


def _load_kernels(root: Path, manifest: dict[str, Any], target: str, device: torch.device) -> PrebuiltKernels:
    from .cuda_launch import load_function
    from .kernels.triton.launch import KernelSpec
    api, _ = parse_target(target)
    functions = {}
    for kernel in manifest.get("kernels", []):
        binary = kernel["binaries"].get(target)
        if binary is None:
            raise ArtifactError(f"{root}: kernel {kernel['id']} has no binary for {target}")
        data = read_checked(root, binary["file"], manifest)
        for flag in ("launch_cooperative_grid", "launch_pdl"):
            if binary.get(flag):
                raise ArtifactError(f"kernel {kernel['id']}: {flag} launches are not supported by this runtime")
        if binary.get("num_ctas", 1) != 1:
            raise ArtifactError(f"kernel {kernel['id']}: num_ctas={binary['num_ctas']} is not supported")
        try:
            functions[KernelSpec.from_dict(kernel).key()] = load_function(api, data, binary["entry"], binary, device)
        except RuntimeError as err:   # the driver refused the binary (corrupt, wrong arch, bad entry name)
            raise ArtifactError(f"kernel {kernel['id']}: {err}") from None
    return PrebuiltKernels(functions, device, target)
