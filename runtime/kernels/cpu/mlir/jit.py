"""Compile decode kernels with torch-mlir's LLVM ExecutionEngine and hand back plain C callables.

The ExecutionEngine JITs for the host CPU (AVX-512 code where the host has it). A kernel is
called through its packed entry point `_mlir_<name>(void **args)`: one pointer per scalar of
the lowered signature (a 1-D memref is 5 scalars: allocated, aligned, offset, size, stride).
Compiled kernels are cached in-process by spec and host target. Nothing is cached on disk:
reloading a dumped object needs a system linker, and the MLIR text is regenerated in
microseconds, so only the JIT (tens of ms per kernel) would be saved, and only by a linker.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from typing import Sequence

from .codegen import PASS_PIPELINE, DecodeSpec, decode_kernel_text
from .decompress_kernel import decompress_kernel_name, decompress_kernel_text
from .host import host_target

MEMREF_SCALARS = 5
_compile_lock = threading.Lock()      # MLIR contexts are not shared across threads while compiling


class CompiledKernel:
    """A JIT-compiled kernel; `call(memrefs, scalars)` runs it with the GIL released (ctypes)."""

    def __init__(self, engine, name: str):
        self._engine = engine            # owns the code: kept alive as long as the callable
        self._entry = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(engine.raw_lookup(name))
        if not engine.raw_lookup(name):
            raise RuntimeError(f"sparsecc.runtime mlir jit: kernel {name} not found after compiling")
        self._local = threading.local()

    def _slots(self, count: int):
        """Per-thread argument storage and its pointer array, reused across calls."""
        slots = getattr(self._local, "slots", None)
        if slots is None or len(slots[0]) != count:
            values = (ctypes.c_int64 * count)()
            base = ctypes.addressof(values)
            pointers = (ctypes.c_void_p * count)(*(base + 8 * i for i in range(count)))
            slots = self._local.slots = (values, pointers)
        return slots

    def call(self, memrefs: Sequence[tuple[int, int]], scalars: Sequence[int]) -> None:
        """memrefs: (data pointer, element count) of each 1-D contiguous buffer, in signature order."""
        values, pointers = self._slots(MEMREF_SCALARS * len(memrefs) + len(scalars))
        i = 0
        for pointer, size in memrefs:
            values[i:i + MEMREF_SCALARS] = (pointer, pointer, 0, size, 1)
            i += MEMREF_SCALARS
        for scalar in scalars:
            values[i] = scalar
            i += 1
        self._entry(pointers)


class KernelCompileError(NotImplementedError):
    """The JIT could not build a generated kernel: a path not taken (the caller falls back), never a failed call."""


def compile_text(text: str, name: str) -> CompiledKernel:
    """Parse, lower to the LLVM dialect, JIT at -O3 for the host."""
    from torch_mlir import ir, passmanager
    from torch_mlir.execution_engine import ExecutionEngine
    with _compile_lock, ir.Context():
        try:
            module = ir.Module.parse(text)
            passmanager.PassManager.parse(PASS_PIPELINE).run(module.operation)
        except ir.MLIRError as err:
            raise KernelCompileError(f"the generated kernel {name} did not compile: "
                                     f"{str(err).splitlines()[0]}") from err
        engine = ExecutionEngine(module, opt_level=3, shared_libs=[])
    return CompiledKernel(engine, name)


@functools.lru_cache(maxsize=None)
def _decode_kernel(spec: DecodeSpec, target: str) -> CompiledKernel:
    return compile_text(decode_kernel_text(spec), spec.name)


def decode_kernel(spec: DecodeSpec) -> CompiledKernel:
    """The compiled decode kernel for `spec` on this host (compiled on first use)."""
    return _decode_kernel(spec, host_target())


@functools.lru_cache(maxsize=None)
def _decompress_kernel(dtype: str, k: int, n: int, m: int, target: str) -> CompiledKernel:
    return compile_text(decompress_kernel_text(dtype, k, n, m), decompress_kernel_name(dtype, k, n, m))


def decompress_kernel(dtype: str, k: int, n: int, m: int) -> CompiledKernel:
    """The compiled decompression kernel for (dtype, K, N:M) on this host."""
    return _decompress_kernel(dtype, k, n, m, host_target())


def object_code(text: str, path: str) -> None:
    """Write the JIT's object file for `text` (to inspect the generated assembly)."""
    from torch_mlir import ir, passmanager
    from torch_mlir.execution_engine import ExecutionEngine
    with _compile_lock, ir.Context():
        module = ir.Module.parse(text)
        passmanager.PassManager.parse(PASS_PIPELINE).run(module.operation)
        ExecutionEngine(module, opt_level=3, shared_libs=[]).dump_to_object_file(path)
