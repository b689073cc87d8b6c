"""`compile(backend="triton")` on a GPU: every Triton launch runs a binary from the sparsecc kernel cache.

The launchers' host code runs as usual and calls `launcher(kernel, grid)`, the
hook point the AOT build records through and a loaded artifact launches
through. Here the hook takes the launch's specialisation (`bind_launch`) and
the device's own target ('cuda:90'): the kernel cache key is (kernel source,
specialisation, target, triton version). A hit loads the stored binary through
the driver API (`runtime.cuda_launch`); a miss compiles it for that target
(`triton.compile`, in this process, as the JIT would) and stores it. So
`compile`, `sparsecc build` and every later process share one cache, and
Triton's own JIT cache is not used.

Launches on CPU tensors (TRITON_INTERPRET=1) go to Triton as before. A GPU
whose arch is not a build target (`runtime.artifact.GPU_TARGETS`) keeps
Triton's JIT, with a warning; SPARSECC_TRITON_JIT=1 keeps it everywhere. A
kernel whose cached binary fails to build, load or launch falls back to
Triton's JIT with a warning naming the kernel and the error.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from sparsecc.runtime.artifact import gpu_arch, parse_target
from sparsecc.runtime.errors import ArtifactError
from sparsecc.runtime.kernels.triton.launch import KernelSpec, launch_key, spec_of

from .kernel_build import build_kernels

TargetOf = Callable[[torch.device], Optional[str]]
JIT = "jit"      # a launch key whose cached binary failed to load or launch: Triton's JIT runs it


def cache_target(device: torch.device) -> Optional[str]:
    """The kernel-cache target of a GPU, or None when Triton's JIT must compile for it."""
    if device.type != "cuda":
        return None
    target = gpu_arch(device)
    try:
        parse_target(target)
    except ArtifactError as err:
        warnings.warn(f"sparsecc: no kernel-cache binaries for this GPU ({err}); Triton's JIT compiles the "
                      "kernels", stacklevel=3)
        return None
    return target


def jit_forced() -> bool:
    return os.environ.get("SPARSECC_TRITON_JIT") == "1"


def _driver_opens(target: str) -> bool:
    """Whether the GPU driver library loads: when it does not, every kernel would be compiled, fail to
    load and be compiled again by the JIT; one warning sends the device to the JIT instead."""
    from sparsecc.runtime.cuda_launch import driver
    try:
        driver(parse_target(target)[0])
    except Exception as err:
        warnings.warn(f"sparsecc: the GPU driver cannot be opened for the kernel cache ({err}); "
                      "Triton's JIT compiles the kernels", stacklevel=4)
        return False
    return True


def launch_device(args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[torch.device]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


class CachedKernelLauncher:
    """The launch hook: (specialisation, device) -> a loaded function, built or read through the cache.
    `target_of` and `load` are the device-facing seams (tests cross-compile for 'cuda:90' on a CPU)."""

    def __init__(self, cache_dir: Optional[os.PathLike] = None, *, target_of: TargetOf = cache_target,
                 load: Optional[Callable[..., Any]] = None, progress: bool = False):
        self.cache_dir, self.target_of, self.progress = cache_dir, target_of, progress
        self._load = load                  # None: the driver API (`runtime.cuda_launch.load_function`)
        self._functions: dict[tuple, Any] = {}                       # (launch key, device) -> function or JIT
        self._targets: dict[str, Optional[str]] = {}
        self._lock = threading.Lock()
        self.built = 0          # kernels compiled by this launcher (the rest came from the cache)

    def __call__(self, kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
        device = launch_device(args, kwargs)
        target = self.target(device) if device is not None else None
        function, key, runtime_args = (JIT, None, None) if target is None else \
            self._resolve(kernel, args, kwargs, target, device)
        if function is JIT:
            kernel[grid](*args, **kwargs)
            return
        function.launch(grid(spec_of(key).constexprs) if callable(grid) else grid, runtime_args, device)

    def _resolve(self, kernel: Any, args: tuple, kwargs: dict, target: str, device: torch.device) -> tuple:
        """(function, launch key, runtime args), the function JIT when the cache cannot serve the launch: the
        cache must never make a model fail that Triton's JIT runs. Only binding, building and loading fall
        back; an error of the launch itself (a fault, no memory) is the kernel's and propagates."""
        key = runtime_args = None
        try:
            key, runtime_args = launch_key(kernel, args, kwargs)
            function = self._functions.get((key, device))
            if function is None:
                with self._lock:
                    function = self._functions.get((key, device)) or self._built_function(key, target, device)
                    self._functions[(key, device)] = function
        except Exception as err:
            name = spec_of(key).entry if key is not None else getattr(getattr(kernel, "fn", kernel), "__name__", "?")
            warnings.warn(f"sparsecc: kernel {name} could not run from the kernel cache on {device} ({err}); "
                          "Triton's JIT runs it instead", stacklevel=3)
            function = JIT
            if key is not None:
                self._functions[(key, device)] = JIT
        return function, key, runtime_args

    def target(self, device: torch.device) -> Optional[str]:
        """The device's cache target, or None (Triton's JIT) when it has none or the driver cannot be opened."""
        key = str(device)
        if key not in self._targets:
            target = self.target_of(device)
            if target is not None and self._load is None and not _driver_opens(target):
                target = None
            self._targets[key] = target
        return self._targets[key]

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) keep the settings, not the loaded functions or the lock."""
        return {"cache_dir": self.cache_dir, "target_of": self.target_of, "progress": self.progress,
                "load": self._load}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cache_dir"], target_of=state["target_of"], load=state["load"],
                      progress=state["progress"])

    def build(self, specs: Sequence[KernelSpec], target: str) -> list:
        """Every spec for `target` from the cache; a miss compiles in this process, as Triton's JIT would
        (in a worker process under TRITON_INTERPRET=1, where this process cannot compile)."""
        workers = None if os.environ.get("TRITON_INTERPRET") == "1" else 0
        built = build_kernels(specs, [target], cache_dir=self.cache_dir, workers=workers, progress=self.progress)
        self.built += sum(not b.from_cache for b in built)
        return built

    def _built_function(self, key: tuple, target: str, device: torch.device) -> Any:
        """The launch's specialisation built into (or read from) the cache and loaded on `device`."""
        built = self.build([spec_of(key)], target)[0]
        load = self._load
        if load is None:
            from sparsecc.runtime.cuda_launch import load_function as load
        metadata = built.kernel.metadata
        return load(parse_target(target)[0], built.kernel.binary, metadata["entry"], metadata, device)
