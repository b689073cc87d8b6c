"""Compile generated kernels for the host and hand back plain C callables.

Torch-mlir's ExecutionEngine JITs for the host CPU (AVX-512 code where the host has it). A kernel is
called through its packed entry point `_mlir_<name>(void **args)`: one pointer per scalar of
the lowered signature (a 1-D memref is 5 scalars: allocated, aligned, offset, size, stride).
Compiled kernels are cached in-process by spec and host target. Where llvmlite is installed a
kernel is an object file instead (objects.py): built for the host once, kept in the shared disk
cache, or taken from a verified artifact (object_cache.py), and linked in memory by llvmlite's
MCJIT, so a second process skips the build (35-170 ms per kernel). Without llvmlite, or where
its LLVM cannot read torch-mlir's IR, torch-mlir's ExecutionEngine JITs per process as before.
`CompiledKernel.origin` says which: "jit", "compiled", "disk" or "artifact".
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from typing import Iterator, Optional, Sequence

from ..layer_calls import forget_bound_calls
from . import team
from .codegen import PASS_PIPELINE, DecodeSpec, decode_kernel_text, unsupported
from .decompress_kernel import decompress_kernel_name, decompress_kernel_text
from .dense_codegen import DenseSpec, dense_kernel_text
from .host import host_target
from .object_cache import forget_prebuilt, host_object
from .objects import ObjectBuildError, ObjectEngine, available as objects_available
from .threads import run_chunks

MEMREF_SCALARS = 5
_compile_lock = threading.Lock()      # MLIR contexts are not shared across threads while compiling


class CompiledKernel:
    """A JIT-compiled kernel; `call(memrefs, scalars)` runs it with the GIL released (ctypes)."""

    def __init__(self, engine, name: str, origin: str = "jit"):
        self._engine = engine            # owns the code: kept alive as long as the callable
        self.origin = origin             # "jit" | "compiled" | "disk" | "artifact": where the code came from
        self._address = engine.raw_lookup(name)
        if not self._address:
            raise RuntimeError(f"sparsecc.runtime mlir jit: kernel {name} not found after compiling")
        self._entry = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(self._address)
        self._local = threading.local()
        self.record = None               # ("decode" | "decompress" | "dense", key): what `recording()` notes

    def recorded_as(self, kind: str, key) -> "CompiledKernel":
        self.record = (kind, key)
        return self

    def _slots(self, count: int):
        """Per-thread argument storage and its pointer array, reused across calls."""
        slots = getattr(self._local, "slots", None)
        if slots is None or len(slots[0]) != count:
            slots = self._local.slots = packed_arguments(count)
        return slots

    def call(self, memrefs: Sequence[tuple[int, int]], scalars: Sequence[int]) -> None:
        """memrefs: (data pointer, element count) of each 1-D contiguous buffer, in signature order."""
        values, pointers = self._slots(MEMREF_SCALARS * len(memrefs) + len(scalars))
        values[:] = packed_scalars(memrefs, scalars)
        self._entry(pointers)

    def bind(self, memrefs: Sequence[tuple[Optional[int], int]], rows: int, scalars: Sequence[int],
             threads: int, chunk: int, native: bool) -> "BoundCall":
        """A call over rows [0, rows) (the kernel's row_begin/row_end follow its memrefs) with its packed
        arguments built once; memrefs whose pointer is None are filled on each `BoundCall.run`."""
        return BoundCall(self, memrefs, rows, scalars, threads, chunk, native)


def packed_scalars(memrefs: Sequence[tuple[Optional[int], int]], scalars: Sequence[int]) -> list[int]:
    """The lowered signature's scalars: per 1-D contiguous memref (allocated, aligned, offset 0, size,
    stride 1), a None pointer as 0 (filled later), then the scalars."""
    return [v for pointer, size in memrefs for v in (pointer or 0, pointer or 0, 0, size, 1)] + list(scalars)


def packed_arguments(count: int):
    """`count` int64 slots and the array of their addresses: the packed ABI's `void **args`."""
    values = (ctypes.c_int64 * count)()
    base = ctypes.addressof(values)
    return values, (ctypes.c_void_p * count)(*(base + 8 * i for i in range(count)))


class BoundCall:
    """One layer's kernel call prepared once (its weight pointers, sizes, row split): `run(*pointers)` sets
    the per-call buffers' pointers and runs, ~1-2 us of Python where packing every argument cost ~7 us.
    Rows go to `threads` OpenMP threads in `chunk`-row pieces: in native code (team.py) when `native`,
    else through threads.py's callbacks. Arguments live per calling thread."""

    def __init__(self, kernel: CompiledKernel, memrefs: Sequence[tuple[Optional[int], int]], rows: int,
                 scalars: Sequence[int], threads: int, chunk: int, native: bool):
        if chunk < 1 or threads < 1:
            raise ValueError(f"BoundCall: chunk={chunk} and threads={threads} must be positive")
        self.kernel, self.rows, self.scalars = kernel, rows, tuple(scalars)
        self.memrefs = list(memrefs)
        self.open_slots = [MEMREF_SCALARS * i for i, (pointer, _) in enumerate(self.memrefs) if pointer is None]
        self.threads = min(threads, -(-rows // chunk)) or 1     # no more threads than chunks
        self.chunk = chunk
        self.native = self.threads > 1 and native      # the caller checked team.available()
        self._entry = kernel._entry
        self._local = threading.local()

    def _arguments(self):
        """This thread's (values, pointers, job): the fixed arguments written once."""
        arguments = getattr(self._local, "arguments", None)
        if arguments is None:
            count = MEMREF_SCALARS * len(self.memrefs) + 2 + len(self.scalars)
            values, pointers = packed_arguments(count)
            values[:] = packed_scalars(self.memrefs, (0, self.rows, *self.scalars))
            job = (ctypes.c_int64 * team.JOB_SLOTS)()
            if self.native:
                team.fill_job(job, self.kernel._address, values, count, MEMREF_SCALARS * len(self.memrefs),
                              self.rows, self.chunk)
            arguments = self._local.arguments = (values, pointers, job)
        return arguments

    def run(self, *pointers: int) -> None:
        if _recorders and self.kernel.record:   # an artifact build notes the kernels a run uses, bound or not
            _record(*self.kernel.record)
        if len(pointers) != len(self.open_slots):
            raise ValueError(f"BoundCall.run: {len(pointers)} pointers for {len(self.open_slots)} open buffers")
        try:
            values, packed, job = self._local.arguments
        except AttributeError:     # this thread's first call
            values, packed, job = self._arguments()
        for slot, pointer in zip(self.open_slots, pointers):
            values[slot] = values[slot + 1] = pointer
        if self.threads == 1:
            self._entry(packed)
        elif self.native:
            team.run_job(job, self.threads)
        else:
            memrefs = [(values[MEMREF_SCALARS * i], size) for i, (_, size) in enumerate(self.memrefs)]
            chunks = [(lo, min(lo + self.chunk, self.rows)) for lo in range(0, self.rows, self.chunk)]
            run_chunks(lambda span: self.kernel.call(memrefs, span + self.scalars), chunks, self.threads)


class KernelCompileError(NotImplementedError):
    """The JIT could not build a generated kernel: a path not taken (the caller falls back), never a failed call."""


def compile_text(text: str, name: str) -> CompiledKernel:
    """The kernel of MLIR `text` for the host: an object (artifact, disk cache or built now) where
    llvmlite is installed, else torch-mlir's JIT."""
    if objects_available():
        try:
            obj, origin = host_object(text, name)
        except ObjectBuildError as err:   # MLIR or llvmlite's LLVM rejected it: the JIT tries (and says why)
            object_failures.append(f"{name}: {err}")
        else:
            return CompiledKernel(ObjectEngine(obj), name, origin)
    return jit_text(text, name)


object_failures: list[str] = []   # kernels the object path could not build (JITted instead), for diagnostics


def jit_text(text: str, name: str) -> CompiledKernel:
    """Parse, lower to the LLVM dialect, JIT at -O3 for the host with torch-mlir's ExecutionEngine."""
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
    return compile_text(decode_kernel_text(spec), spec.name).recorded_as("decode", spec)


_recorders: list[set] = []     # open `recording()` blocks: each collects the kernels asked for inside it


@contextlib.contextmanager
def recording() -> Iterator[set]:
    """Collect ("decode", spec) / ("decompress", (dtype, k, n, m)) / ("dense", spec) of every kernel asked
    for or run (a bound call) inside the block: an artifact build records what its program uses, as it
    records Triton launches."""
    used: set = set()
    _recorders.append(used)
    try:
        yield used
    finally:
        _recorders.remove(used)


def _record(kind: str, key) -> None:
    for used in _recorders:
        used.add((kind, key))


def decode_kernel(spec: DecodeSpec) -> CompiledKernel:
    """The compiled decode kernel for `spec` on this host (compiled on first use); a spec it cannot run
    safely (codegen.unsupported: e.g. an unroll that would step past a row) is refused."""
    why = unsupported(spec)
    if why is not None:
        raise ValueError(f"no N:M decode kernel for {spec}: {why}")
    if _recorders:
        _record("decode", spec)
    return _decode_kernel(spec, host_target())


@functools.lru_cache(maxsize=None)
def _decompress_kernel(dtype: str, k: int, n: int, m: int, target: str) -> CompiledKernel:
    return compile_text(decompress_kernel_text(dtype, k, n, m),
                        decompress_kernel_name(dtype, k, n, m)).recorded_as("decompress", (dtype, k, n, m))


def decompress_kernel(dtype: str, k: int, n: int, m: int) -> CompiledKernel:
    """The compiled decompression kernel for (dtype, K, N:M) on this host."""
    if _recorders:
        _record("decompress", (dtype, k, n, m))
    return _decompress_kernel(dtype, k, n, m, host_target())


@functools.lru_cache(maxsize=None)
def _dense_kernel(spec: DenseSpec, target: str) -> CompiledKernel:
    return compile_text(dense_kernel_text(spec), spec.name).recorded_as("dense", spec)


def dense_kernel(spec: DenseSpec) -> CompiledKernel:
    """The compiled dense decode kernel (dense_codegen.py) for `spec` on this host."""
    if _recorders:
        _record("dense", spec)
    return _dense_kernel(spec, host_target())


def object_code(text: str, path: str) -> None:
    """Write the JIT's object file for `text` (to inspect the generated assembly)."""
    from torch_mlir import ir, passmanager
    from torch_mlir.execution_engine import ExecutionEngine
    with _compile_lock, ir.Context():
        module = ir.Module.parse(text)
        passmanager.PassManager.parse(PASS_PIPELINE).run(module.operation)
        ExecutionEngine(module, opt_level=3, shared_libs=[]).dump_to_object_file(path)


def clear_compiled() -> None:
    """Drop this process's compiled kernels and the objects artifacts offered: kernels start afresh, as in a
    new process (the disk cache stays)."""
    forget_prebuilt()
    forget_bound_calls()      # layers' calls bound to the kernels dropped here
    _decode_kernel.cache_clear()
    _decompress_kernel.cache_clear()
    _dense_kernel.cache_clear()
