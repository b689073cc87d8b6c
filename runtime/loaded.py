"""A loaded artifact: the Program, its weights on the device, and prebuilt kernels for the device's target.

On CPU the program runs with the CPU kernels. On a GPU it runs the Triton
launchers' host code with every kernel launch routed (`use_launcher`) to the
artifact's binaries for the device's target, loaded through the driver API:
Triton never compiles anything. A launch whose specialisation the artifact
does not hold is an error that names the kernel and its constexprs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .artifact import (WEIGHTS, device_target, parse_target, program_on, read_checked, read_manifest,
                       verify_files)
from .errors import ArtifactError, InputMismatchError
from .executor import Executor
from .program import Program


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
    """Call it like the original model; `manifest`, `target`, `device` say what was loaded."""

    def __init__(self, manifest: dict[str, Any], program: Program, constants: dict[str, torch.Tensor],
                 device: torch.device, target: str, kernels: PrebuiltKernels | None):
        self.manifest, self.program, self.constants = manifest, program, constants
        self.device, self.target, self.kernels = device, target, kernels
        self._executor = Executor(program, constants, "torch" if kernels is None else "triton")
        self._in_spec = pytree.treespec_loads(program.in_spec) if program.in_spec else None
        self._out_spec = pytree.treespec_loads(program.out_spec) if program.out_spec else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if self._in_spec is not None and spec != self._in_spec:
            raise InputMismatchError(f"inputs have structure {spec}, but the artifact was built for {self._in_spec}")
        tensors = tuple(leaf for leaf in flat if isinstance(leaf, torch.Tensor))
        if self.kernels is None:
            outputs = self._executor.run(tensors)
        else:
            from .kernels.triton.launch import use_launcher
            with use_launcher(self.kernels):
                outputs = self._executor.run(aligned(tensors))
        return pytree.tree_unflatten(outputs, self._out_spec) if self._out_spec is not None else outputs

    def __repr__(self) -> str:
        return f"LoadedModel(target={self.target!r}, device={str(self.device)!r}, {self.program.summary()})"


def aligned(tensors: tuple) -> tuple:
    """Inputs 16-byte aligned, as the kernels were built for (a binary that assumes aligned pointers
    must not see a view that starts mid-vector): a misaligned view is copied, once per call."""
    return tuple(t.clone() if t.data_ptr() % 16 else t for t in tensors)


def load_artifact(root: Path, device: torch.device) -> LoadedModel:
    manifest = read_manifest(root)
    verify_files(root, manifest)
    target = device_target(device, list(manifest.get("targets", [])))
    try:
        program = program_on(Program.from_dict(manifest["program"]), device)
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{root}: the manifest's program cannot be read: {err}") from None
    constants = _load_weights(root, manifest.get("weights", WEIGHTS), program, device, manifest)
    kernels = None if target == "cpu" else _load_kernels(root, manifest, target, device)
    return LoadedModel(manifest, program, constants, device, target, kernels)


def _load_weights(root: Path, name: str, program: Program, device: torch.device,
                  manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load
    path = root / name
    try:
        data = read_checked(root, name, manifest)
        constants = {name: t.to(device) for name, t in load(data).items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: cannot read the weights: {err}") from None
    missing = sorted(set(program.constant_names) - set(constants))
    if missing:
        raise ArtifactError(f"{path}: weights for {', '.join(missing[:5])} are missing")
    return constants


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
        functions[KernelSpec.from_dict(kernel).key()] = load_function(api, data, binary["entry"], binary, device)
    return PrebuiltKernels(functions, device, target)
