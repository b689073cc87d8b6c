"""Load prebuilt kernel binaries and launch them through the GPU driver API (ctypes; no compiler).

CUDA: libcuda's cuModuleLoadData / cuModuleGetFunction / cuLaunchKernel on a
cubin. ROCm: libamdhip64's hipModuleLoadData / hipModuleLaunchKernel on an
hsaco. Triton's own launcher is a C extension compiled on first use (it needs
a C compiler on the serving machine); this one needs only the driver library.

A Triton kernel's parameters are its non-constexpr arguments in order, then
two hidden pointers: global scratch and profile scratch. Each is NULL when
the kernel's metadata asks for 0 bytes, else a buffer of
grid_size * num_ctas * size bytes. Block = warp_size * num_warps threads.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import ArtifactError
from .inputs import same_device

_CTYPES = {"i1": ctypes.c_int8, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32,
           "i64": ctypes.c_int64, "u8": ctypes.c_uint8, "u16": ctypes.c_uint16, "u32": ctypes.c_uint32,
           "u64": ctypes.c_uint64, "fp32": ctypes.c_float, "f32": ctypes.c_float, "fp64": ctypes.c_double}
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
HIP_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class _Driver:
    """The handful of driver entry points a launch needs, for one API ("cuda" or "hip")."""

    def __init__(self, api: str):
        self.api = api
        names = ["libcuda.so.1", "libcuda.so"] if api == "cuda" else ["libamdhip64.so", "libamdhip64.so.6"]
        self.lib = _open_first(names)
        prefix = "cu" if api == "cuda" else "hip"
        self.load = getattr(self.lib, f"{prefix}ModuleLoadData")
        self.get_function = getattr(self.lib, f"{prefix}ModuleGetFunction")
        self.set_attribute = getattr(self.lib, f"{prefix}FuncSetAttribute")
        self.launch = getattr(self.lib, f"{prefix}LaunchKernel" if api == "cuda" else "hipModuleLaunchKernel")
        u = ctypes.c_uint
        self.launch.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p,
                                ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
        self.load.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        self.get_function.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        self.set_attribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{self.api} driver: {what} failed with error {status}{self._describe(status)}")

    def _describe(self, status: int) -> str:
        text = ctypes.c_char_p()
        if self.api == "cuda":
            if self.lib.cuGetErrorString(status, ctypes.byref(text)) == 0 and text.value:
                return f" ({text.value.decode()})"
            return ""
        self.lib.hipGetErrorString.restype = ctypes.c_char_p
        return f" ({self.lib.hipGetErrorString(status).decode()})"


def _open_first(names: Sequence[str]) -> ctypes.CDLL:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ArtifactError(f"cannot load the GPU driver library (tried {', '.join(names)})")


@functools.lru_cache(maxsize=None)
def driver(api: str) -> _Driver:
    return _Driver(api)


@dataclass(frozen=True)
class GpuFunction:
    """One loaded kernel and what launching it needs from the artifact's metadata."""
    api: str
    module: int
    function: int
    entry: str
    num_warps: int
    warp_size: int
    shared: int
    global_scratch: tuple[int, int]      # (bytes per program, alignment)
    profile_scratch: tuple[int, int]
    param_bytes: tuple[int, ...]         # as the binary declares them; () when unknown

    def launch(self, grid: Sequence[int], args: Sequence[tuple[str, Any]], device: torch.device) -> None:
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        if grid[0] * grid[1] * grid[2] == 0:
            return
        keep, params = [], []
        for kind, value in args:
            if kind.startswith("*") and not same_device(value.device, device):
                raise ArtifactError(f"kernel {self.entry}: a tensor argument is on {value.device}, the kernel "
                                    f"was loaded for {device}")
            cell = _cell(kind, value)
            keep.append(cell)
            params.append(ctypes.cast(ctypes.byref(cell), ctypes.c_void_p))
        packed = [ctypes.sizeof(c) for c in keep] + [8, 8]
        if self.param_bytes and packed != list(self.param_bytes):
            raise ArtifactError(f"kernel {self.entry}: arguments packed as {packed} bytes, the binary declares "
                                f"{list(self.param_bytes)}")
        programs = grid[0] * grid[1] * grid[2]
        for size, _align in (self.global_scratch, self.profile_scratch):
            buffer = torch.empty(programs * size, dtype=torch.uint8, device=device) if size > 0 else None
            cell = ctypes.c_uint64(buffer.data_ptr() if buffer is not None else 0)
            keep += [cell, buffer]
            params.append(ctypes.cast(ctypes.byref(cell), ctypes.c_void_p))
        array = (ctypes.c_void_p * len(params))(*params)
        stream = torch.cuda.current_stream(device).cuda_stream
        d = driver(self.api)
        with torch.cuda.device(device):   # the function belongs to this device's context
            d.check(d.launch(self.function, *grid, self.warp_size * self.num_warps, 1, 1, self.shared, stream,
                             array, None), f"launching {self.entry}")


def _cell(kind: str, value: Any) -> ctypes._SimpleCData:
    if kind.startswith("*"):
        return ctypes.c_uint64(value.data_ptr())
    return _CTYPES[kind](value)


def load_function(api: str, binary: bytes, entry: str, metadata: dict[str, Any], device: torch.device) -> GpuFunction:
    """Load `binary` into the current context of `device` and look up its kernel `entry`."""
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.cuda.current_stream(device)          # makes the device's primary context current
        torch.empty(1, device=device)
        d = driver(api)
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        d.check(d.load(ctypes.byref(module), binary), f"loading the module of {entry}")
        d.check(d.get_function(ctypes.byref(function), module, entry.encode()), f"finding kernel {entry}")
        shared = int(metadata["shared"])
        if shared > 48 * 1024:
            attribute = CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES if api == "cuda" else \
                HIP_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            d.check(d.set_attribute(function, attribute, shared), f"allowing {shared} B shared memory for {entry}")
    return GpuFunction(api, module.value, function.value, entry, int(metadata["num_warps"]),
                       int(metadata["warp_size"]), shared, tuple(metadata["global_scratch"]),
                       tuple(metadata["profile_scratch"]), tuple(metadata.get("param_bytes", ())))
