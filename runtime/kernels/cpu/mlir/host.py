"""What the host CPU can run: the x86 features the generated kernels need, read once at run time.

The JIT compiles for the host CPU, so a kernel is only generated where the host has
every feature it uses; the CI machine may be a Sapphire Rapids or a Zen 4, never assumed.
The N:M decode kernel has two forms (codegen.ISAS): a host runs the widest whose features it
has, AVX-512 (with VBMI) else AVX2 + FMA (fp32 only: Zen 2/3, Haswell to Alder Lake).
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Optional

from .codegen import ISAS

CPUINFO = Path("/proc/cpuinfo")
DECODE_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi")   # vpermi2w and the byte shuffle
# decode kernel form (codegen.ISAS) -> what the host needs to run it, widest first; decompress and dense: AVX-512
FORM_FEATURES = {"avx512": DECODE_FEATURES, "avx2": ("avx2", "fma")}   # avx2: vpermps, vfmadd
KERNEL_FEATURES = {("decode", "bfloat16"): ("avx512_bf16",),         # vdpbf16ps
                   ("decompress", "bfloat16"): ("avx512_vbmi2",)}    # vpexpandw


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """The host's CPU flags (Linux /proc/cpuinfo names); empty where they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def missing_features(dtype: str, kernel: str = "decode", isa: str = "avx512") -> tuple[str, ...]:
    """The features a `kernel` ("decode" | "decompress") of `dtype` in form `isa` needs that the host lacks
    (empty: it can run)."""
    wanted = FORM_FEATURES[isa] + KERNEL_FEATURES.get((kernel, dtype), ())
    have = host_features()
    return tuple(f for f in wanted if f not in have)


def decode_isa(dtype: str) -> Optional[str]:
    """The form of the decode kernel this host runs for `dtype` (the widest it has the features of), or None."""
    return next((isa for isa in FORM_FEATURES
                 if dtype in ISAS[isa].permutes and not missing_features(dtype, isa=isa)), None)


@functools.lru_cache(maxsize=1)
def host_target() -> str:
    """A key naming what the JIT specialises for: the machine and the features the kernels use (so an
    AVX2 host and an AVX-512 one never share a key)."""
    used = sorted(set().union(*FORM_FEATURES.values(), *KERNEL_FEATURES.values()) & host_features())
    return f"{platform.machine()}:{'+'.join(used)}"


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it ("AMD EPYC", ...), else what platform knows."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
