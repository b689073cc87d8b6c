"""Named CPU targets an artifact can carry generated kernels for, and which kernels each can hold.

A named target is an x86-64 micro-architecture level: objects are built for its baseline features
only (LLVM `-mcpu=x86-64-v4`), so they run on every CPU of that level. Each level holds the widest
form of the decode kernel (codegen.ISAS) its instructions allow, the form a host of that level runs:

    x86-64-v4   the AVX-512 form: fp32 decode, fp32 and bf16 decompression (LLVM emulates vpexpandw
                and vpermb without VBMI/VBMI2); bf16 decode needs AVX512_BF16 (vdpbf16ps), which v4
                lacks, so it is not built and the manifest says why
    x86-64-v3   the AVX2 form (AVX2/FMA): fp32 decode only; bf16 decode, decompression and the dense
                kernel are AVX-512 code, listed as not built, and such a host runs torch's paths for them

A name outside NAMED_CPUS is refused with the list of names.
"""
from __future__ import annotations

from typing import Optional

from .codegen import ISAS
from .host import host_features

# /proc/cpuinfo flag names a CPU of the level has (what the host must show before its objects run)
# (every feature of the level and the levels below: LLVM may use any of them in a -mcpu=x86-64-vN object)
_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
_V3 = _V2 + ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
NAMED_CPUS = {
    "x86-64-v4": _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "x86-64-v3": _V3,
}
# what a kernel's instructions need before LLVM can emit it (the intrinsics it calls), by (kernel, dtype, form)
KERNEL_NEEDS = {("decode", "float32", "avx512"): ("avx512f", "avx512bw", "avx512vl"),
                ("decode", "float32", "avx2"): ("avx2", "fma"),
                ("decode", "bfloat16", "avx512"): ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
                ("decompress", "float32", "avx512"): ("avx512f", "avx512bw", "avx512vl"),
                ("decompress", "bfloat16", "avx512"): ("avx512f", "avx512bw", "avx512vl"),
                ("dense", "float32", "avx512"): ("avx512f",),
                ("dense", "bfloat16", "avx512"): ("avx512f", "avx512_bf16")}


def cpu_target_problem(name: str) -> Optional[str]:
    """Why `name` is not a CPU target ("x86-64-v4" from "cpu:x86-64-v4"), or None."""
    if name not in NAMED_CPUS:
        return f"unknown CPU target {name!r}: the named CPU targets are {', '.join(sorted(NAMED_CPUS))}"
    return None


def missing_for(name: str, kernel: str, dtype: str, isa: str = "avx512") -> tuple[str, ...]:
    """The features kernel (kernel, dtype) in form `isa` needs that named target `name` lacks (empty: it can
    be built)."""
    needs = KERNEL_NEEDS.get((kernel, dtype, isa))
    if needs is None:
        return (f"no {isa} {kernel} kernel for {dtype}",)
    return tuple(f for f in needs if f not in NAMED_CPUS[name])


def target_isa(name: str) -> Optional[str]:
    """The decode kernel form named target `name` holds: the widest its features build (v4 avx512, v3 avx2),
    None for a level too old for any."""
    return next((isa for isa in ISAS if not missing_for(name, "decode", "float32", isa)), None)


def host_runs(name: str) -> tuple[str, ...]:
    """The features of named target `name` this host lacks (empty: its objects can run here)."""
    have = host_features()
    return tuple(f for f in NAMED_CPUS[name] if f not in have)
