"""Generated CPU kernels in an artifact: built ahead of time for named CPU targets, used only when trusted.

Build (compiler/build.py): the program runs once on its example inputs inside `jit.recording()`; every
kernel it asked for (a program with dynamic dims: every decode token count 1..MAX_TOKENS of each
recorded shape) is built for each named target's baseline features (targets.py) through the disk
cache. A kernel the target cannot hold is listed with the reason instead of an object.
Each form of a decode kernel (codegen.ISAS) is its own MLIR text, so its own entry: every form the
kernel's shape has is listed (the AVX-512 form needs K a multiple of 32, the AVX2 form of 16), built for
the targets that hold it. A host generates the text of the form it runs, whose hash finds that form's object.

    manifest "cpu_kernels": [{"id", "kernel": "decode"|"decompress"|"dense", "dtype", "isa", "name",
                              "source_sha256", "binaries": {"cpu:x86-64-v4": {"file", "cpu"}},
                              "skipped": {target: why}}]

Load (runtime/loaded.py): an object is machine code its builder chose, so the objects are used only
when the manifest's signature was verified against `trusted_keys`, llvmlite is installed and the host
has every feature of the target; otherwise they are ignored and the kernels are JIT-compiled as
without an artifact (`cpu_objects_decision` says which, `sparsecc inspect` prints it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from .codegen import COMPACT_BLOCKING, ISAS, MAX_TOKENS, DecodeSpec, decode_kernel_text, unsupported
from .decompress_kernel import decompress_kernel_name, decompress_kernel_text
from .dense_codegen import dense_kernel_text
from .dense_codegen import unsupported as dense_unsupported
from ....kernel_cache import KernelCache
from .host import decode_isa
from .object_cache import object_cache_key, use_prebuilt
from .objects import available, build_object, source_sha256, toolchain
from .targets import cpu_target_problem, host_runs, missing_for, target_isa

SHARED_FORM = "avx512"     # the one form of the decompression and dense kernels


@dataclass(frozen=True)
class KernelSource:
    kind: str       # "decode" | "decompress" | "dense"
    dtype: str
    name: str
    text: str
    isa: str = SHARED_FORM


def kernel_sources(used: set, sweep_tokens: bool) -> list[KernelSource]:
    """The MLIR of every recorded kernel, a decode kernel in each of its forms; with `sweep_tokens` each
    decode shape at every token count."""
    found: dict[str, KernelSource] = {}
    for kind, key in used:
        if kind == "decompress":
            dtype, k, n, m = key
            found.setdefault(decompress_kernel_name(*key), KernelSource(kind, dtype, decompress_kernel_name(*key),
                                                                        decompress_kernel_text(dtype, k, n, m)))
            continue
        tokens = range(1, MAX_TOKENS + 1) if sweep_tokens else [key.tokens]
        if kind == "dense":
            forms = [(replace(key, tokens=t), SHARED_FORM) for t in tokens]
            problem, text = dense_unsupported, dense_kernel_text
        else:   # every form, whichever the building host ran, and each token count blocked as the runtime does
            specs = decode_variants(key, tokens) if sweep_tokens else [key]
            forms = [(replace(spec, isa=isa), isa) for spec in specs for isa in ISAS]
            problem, text = unsupported, decode_kernel_text
        for spec, form in forms:
            if problem(spec) is None:
                found.setdefault(spec.name, KernelSource(kind, spec.dtype, spec.name, text(spec), form))
    return [found[name] for name in sorted(found)]


def decode_variants(recorded: DecodeSpec, tokens: Sequence[int]) -> list[DecodeSpec]:
    """The decode specs a runtime may ask for at these token counts, given one it asked for: the recorded
    blocking at its own count, the default elsewhere, and at one token also the blocking for a weight that
    stays in cache (nm_decode.decode_spec picks it by the weight's size, which the spec does not hold)."""
    found = []
    for t in tokens:
        if t == recorded.tokens:
            found.append(recorded)
        found.append(replace(recorded, tokens=t, block_rows=0, unroll=0))
        if t == 1:
            found.append(replace(recorded, tokens=1, block_rows=COMPACT_BLOCKING[0], unroll=COMPACT_BLOCKING[1]))
    return found


def named_cpu(target: str) -> str:
    """"cpu:x86-64-v4" -> "x86-64-v4"; a name outside targets.NAMED_CPUS is a ValueError listing them."""
    name = target.partition(":")[2]
    problem = cpu_target_problem(name)
    if problem:
        raise ValueError(problem)
    return name


def _object_for(source: KernelSource, cpu: str, cache: KernelCache) -> bytes:
    """Built for the CPU's baseline features (no host features), through the kernel cache."""
    key = object_cache_key(source.text, source.name, cpu, "")
    entry = cache.get(key)
    if entry is not None:
        return entry.binary
    obj = build_object(source.text, source.name, cpu, "")
    cache.put(key, obj, {"entry": source.name, "cpu": cpu, "toolchain": toolchain()}, "o")
    return obj


def build_cpu_kernels(sources: Sequence[KernelSource], targets: Sequence[str],
                      cache_dir: Optional[os.PathLike] = None) -> list[dict[str, Any]]:
    """One entry per kernel: {"source": KernelSource, "objects": {target: bytes}, "skipped": {target: why}}.
    A target builds only the form it holds (targets.target_isa); a form no target holds is left out."""
    if targets and not available():
        raise ValueError(f"building {', '.join(targets)} needs llvmlite (pip install llvmlite)")
    forms = {target: target_isa(named_cpu(target)) for target in targets}
    cache, entries = KernelCache(cache_dir), []
    for source in sources:
        if source.isa != SHARED_FORM and source.isa not in forms.values():
            continue
        objects, skipped = {}, {}
        for target, form in forms.items():
            missing = missing_for(named_cpu(target), source.kind, source.dtype, source.isa)
            if missing:
                skipped[target] = f"needs {', '.join(missing)}, which {target} does not have"
            elif source.isa != form:
                skipped[target] = f"{target} holds the {form} form"
            else:
                objects[target] = _object_for(source, named_cpu(target), cache)
        entries.append({"source": source, "objects": objects, "skipped": skipped})
    return entries


def manifest_entry(index: int, entry: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """The manifest record of a built kernel; `files` maps target -> the object's path in the artifact."""
    source = entry["source"]
    return {"id": f"c{index}_{source.name}", "kernel": source.kind, "dtype": source.dtype, "isa": source.isa,
            "name": source.name, "source_sha256": source_sha256(source.text), "toolchain": toolchain(),
            "binaries": {t: {"file": files[t], "cpu": named_cpu(t)} for t in entry["objects"]},
            "skipped": entry["skipped"]}


def cpu_objects_decision(manifest: dict[str, Any], verified: bool) -> tuple[Optional[str], str]:
    """(named target whose objects this host uses, or None; a sentence saying why). The target holding the
    decode form this host runs comes first: an AVX-512 host also runs v3's objects but never asks for them."""
    holding = {t for kernel in manifest.get("cpu_kernels", []) for t in kernel.get("binaries", {})}
    named = [t for t in manifest.get("targets", []) if str(t).startswith("cpu:") and t in holding]
    if not named:
        return None, "cpu kernels: none prebuilt (JIT-compiled on the host, cached on disk)"
    if not verified:
        return None, (f"cpu kernels: {', '.join(named)} objects ignored: machine code is used only from an "
                      "artifact whose signature was verified against trusted_keys (JIT-compiled instead)")
    if not available():
        return None, f"cpu kernels: {', '.join(named)} objects ignored: llvmlite is not installed (JIT-compiled)"
    host_form, reasons = decode_isa("float32"), []
    for target in named:
        form, missing = target_isa(named_cpu(target)), host_runs(named_cpu(target))
        if missing:
            reasons.append(f"this host lacks {', '.join(missing)} for {target}")
        elif form != host_form:   # its kernel texts are not the ones this host generates: no object would match
            reasons.append(f"{target} holds the {form} kernel form, this host runs the {host_form or 'none'} form")
        else:
            return target, f"cpu kernels: using the {target} objects (signature verified, host has its features)"
    return None, f"cpu kernels: objects ignored ({'; '.join(reasons)}); JIT-compiled instead"


def use_cpu_objects(manifest: dict[str, Any], target: str, read: Callable[[str], bytes]) -> int:
    """Offer the artifact's `target` objects to the kernel loader (`read` does the checked file read)."""
    objects = {}
    for kernel in manifest.get("cpu_kernels", []):
        binary = kernel["binaries"].get(target)
        if binary is not None and kernel.get("toolchain") == toolchain():
            objects[kernel["source_sha256"]] = read(binary["file"])
    return use_prebuilt(objects)
