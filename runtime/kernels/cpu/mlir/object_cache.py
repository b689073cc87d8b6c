"""Where a generated kernel's object comes from: a verified artifact, the disk cache, or a build now.

    key    = kernel_cache.cache_key(sha256(MLIR text), {"kind": "mlir-cpu", "entry": name},
                                    "<LLVM cpu>:<features>", toolchain())
    entry  = the shared kernel cache (runtime/kernel_cache.py: $SPARSECC_KERNEL_CACHE, else
             $SPARSECC_CACHE_DIR/kernels, else ~/.cache/sparsecc/kernels) holding kernel.o

The cache writes atomically and checks each object's SHA-256 on read: a torn or corrupt entry is
a miss, rebuilt and replaced; an unwritable cache only costs the rebuild. Objects an artifact
carries are used only after runtime/loaded.py verified the artifact's signature against trusted
keys and the host has the target's features (`use_prebuilt`); they are keyed by the MLIR text's
hash, so an object is only ever linked for the text it was built from.
"""
from __future__ import annotations

import threading
from typing import Optional

from ....kernel_cache import KernelCache, cache_key
from .objects import build_object, host_cpu, source_sha256, toolchain

_prebuilt: dict[str, bytes] = {}     # MLIR text sha256 -> object, from verified artifacts only
_lock = threading.Lock()


def use_prebuilt(objects: dict[str, bytes]) -> int:
    """Offer objects built ahead of time (sha256 of their MLIR text -> object); returns how many are new.
    The caller has verified where they come from (see the module docstring)."""
    with _lock:
        new = {sha: obj for sha, obj in objects.items() if sha not in _prebuilt}
        _prebuilt.update(new)
    return len(new)


def forget_prebuilt() -> None:
    """Drop every offered object (jit.clear_compiled)."""
    with _lock:
        _prebuilt.clear()


def object_cache_key(text: str, name: str, cpu: str, features: str) -> str:
    return cache_key(source_sha256(text), {"kind": "mlir-cpu", "entry": name}, f"{cpu}:{features}", toolchain())


def _cache() -> Optional[KernelCache]:
    try:
        return KernelCache()
    except OSError:
        return None                  # an unreadable cache root: build every kernel, as without a cache


def host_object(text: str, name: str) -> tuple[bytes, str]:
    """(object for this host, where it came from: "artifact" | "disk" | "compiled")."""
    with _lock:
        prebuilt = _prebuilt.get(source_sha256(text))
    if prebuilt is not None:
        return prebuilt, "artifact"
    cpu, features = host_cpu()
    key = object_cache_key(text, name, cpu, features)
    cache = _cache()
    entry = cache.get(key) if cache is not None else None
    if entry is not None and entry.metadata.get("entry") == name:
        return entry.binary, "disk"
    obj = build_object(text, name, cpu, features)
    if cache is not None:
        try:
            cache.put(key, obj, {"entry": name, "cpu": cpu, "toolchain": toolchain()}, "o")
        except OSError:
            pass                     # read-only or full disk: the object still runs from memory
    return obj, "compiled"
