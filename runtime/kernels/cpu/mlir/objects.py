"""Generated kernels as object files: built with llvmlite's LLVM for a CPU, loaded in-process without a linker.

torch-mlir lowers a kernel's MLIR to LLVM IR (`translate_module_to_llvmir`); llvmlite (its own LLVM, no
system compiler) optimises it at -O3 and emits a relocatable object for a CPU: the host's own model and
features, or a named target (targets.py). An object is loaded by an MCJIT engine (`add_object_file`), which
links it in memory. The packed entry `_mlir_<name>(void **args)` that torch-mlir's ExecutionEngine would
add is written here in LLVM IR, so a loaded object is called exactly like a JIT-compiled kernel.
Without llvmlite `available()` is False and jit.py keeps torch-mlir's ExecutionEngine.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import re
import threading

from .codegen import PASS_PIPELINE

OBJECT_FORMAT = 1       # bump when what an object holds or how it is called changes: older objects become misses
_llvm_lock = threading.Lock()     # llvmlite's LLVM context and MCJIT are not used from two threads at once
SIGNATURE = re.compile(r"^define void @(?P<name>[\w.$]+)\((?P<params>[^)]*)\)", re.M)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """llvmlite and torch-mlir's bindings are both importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("llvmlite", "torch_mlir"))


@functools.lru_cache(maxsize=1)
def _llvm():
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm


@functools.lru_cache(maxsize=1)
def toolchain() -> str:
    """What builds an object (part of every cache key): a new torch-mlir or LLVM gives new objects."""
    versions = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch-mlir", "llvmlite")]
    return " ".join(versions + ["llvm==" + ".".join(map(str, _llvm().llvm_version_info)), f"format={OBJECT_FORMAT}"])


@functools.lru_cache(maxsize=1)
def host_cpu() -> tuple[str, str]:
    """(LLVM CPU name, feature string) of this machine: what a kernel built for the host is specialised on."""
    llvm = _llvm()
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


def source_sha256(text: str) -> str:
    """The hash an artifact records for a kernel's MLIR text (the object is used only for the same text)."""
    return hashlib.sha256(text.encode()).hexdigest()


class ObjectBuildError(ValueError):
    """No object for this kernel (MLIR or LLVM rejected it): the caller JITs it instead."""


@functools.lru_cache(maxsize=1)
def _translate_to_llvm_ir():
    """torch-mlir's MLIR -> LLVM IR translation, taken from its native module where it can be: the public
    `torch_mlir.dialects.llvm` also builds ~900 generated op classes (290 ms on first import)."""
    try:
        from torch_mlir._mlir_libs._mlirDialectsLLVM import translate_module_to_llvmir
    except ImportError:
        from torch_mlir.dialects.llvm import translate_module_to_llvmir
    return translate_module_to_llvmir


def llvm_ir(text: str, name: str) -> str:
    """The kernel's LLVM IR after PASS_PIPELINE, plus the packed entry `_mlir_<name>(ptr args)`."""
    from torch_mlir import ir, passmanager
    translate = _translate_to_llvm_ir()
    with ir.Context():
        try:
            module = ir.Module.parse(text)
            passmanager.PassManager.parse(PASS_PIPELINE).run(module.operation)
        except ir.MLIRError as err:
            raise ObjectBuildError(f"the generated kernel {name} did not lower: {str(err).splitlines()[0]}") from err
        lowered = str(translate(module.operation))
    return lowered + "\n" + packed_entry(lowered, name)


def packed_entry(lowered: str, name: str) -> str:
    """`_mlir_<name>(ptr args)`: args[i] points at the i-th scalar of the lowered signature (ExecutionEngine's ABI)."""
    found = next((s for s in SIGNATURE.finditer(lowered) if s.group("name") == name), None)
    if found is None:
        raise ObjectBuildError(f"sparsecc.runtime mlir objects: no function @{name} in the lowered kernel")
    types = [p.split()[0] for p in found.group("params").split(",") if p.strip()]
    lines = [f"define void @_mlir_{name}(ptr %args) {{"]
    for i, kind in enumerate(types):
        lines += [f"  %slot{i} = getelementptr ptr, ptr %args, i64 {i}",
                  f"  %at{i} = load ptr, ptr %slot{i}",
                  f"  %arg{i} = load {kind}, ptr %at{i}"]
    call_args = ", ".join(f"{kind} %arg{i}" for i, kind in enumerate(types))
    return "\n".join(lines + [f"  call void @{name}({call_args})", "  ret void", "}", ""])


def _target_machine(cpu: str, features: str):
    llvm = _llvm()
    target = llvm.Target.from_default_triple()
    return target.create_target_machine(cpu=cpu, features=features, opt=3, reloc="pic", codemodel="default")


def build_object(text: str, name: str, cpu: str, features: str) -> bytes:
    """The relocatable object of MLIR `text` optimised at -O3 for (cpu, features)."""
    llvm = _llvm()
    with _llvm_lock:
        ir_text = llvm_ir(text, name)
        try:
            module = llvm.parse_assembly(ir_text)      # torch-mlir's LLVM may be newer than llvmlite's
            module.verify()
        except RuntimeError as err:
            raise ObjectBuildError(f"llvmlite's LLVM rejected the IR of {name}: {str(err).splitlines()[0]}") from err
        machine = _target_machine(cpu, features)
        builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(3))
        builder.getModulePassManager().run(module, builder)
        return machine.emit_object(module)


def host_engine(ir_text: str):
    """An MCJIT engine holding LLVM IR `ir_text` compiled for this host (team.py's hand-written helper);
    RuntimeError where llvmlite's LLVM refuses it."""
    llvm = _llvm()
    with _llvm_lock:
        module = llvm.parse_assembly(ir_text)
        module.verify()
        engine = llvm.create_mcjit_compiler(module, _target_machine(*host_cpu()))
        engine.finalize_object()
    return engine


class ObjectEngine:
    """An MCJIT engine holding one linked object; `raw_lookup` as torch-mlir's ExecutionEngine names it."""

    def __init__(self, obj: bytes):
        llvm = _llvm()
        cpu, features = host_cpu()
        with _llvm_lock:
            self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _target_machine(cpu, features))
            self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
            self._engine.finalize_object()

    def raw_lookup(self, name: str) -> int:
        with _llvm_lock:
            return self._engine.get_function_address(f"_mlir_{name}")
