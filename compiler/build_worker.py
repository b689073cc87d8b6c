"""Worker process of `sparsecc.kernel_build`: cross-compiles kernel specialisations into the kernel cache.

Reads {"cache_dir", "jobs": [{"key", "target", "spec"}]} as JSON on stdin and
prints one JSON line per job: {"key", "entry", "target", "seconds"} or with
"error". Must run without TRITON_INTERPRET (the parent starts it that way).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sparsecc.build_worker must run without TRITON_INTERPRET=1")


def launch_metadata(compiled: Any, target: str) -> dict[str, Any]:
    """What the runtime needs to launch the binary (see sparsecc.runtime.cuda_launch)."""
    md = compiled.metadata
    return {"entry": md.name, "shared": int(md.shared), "num_warps": int(md.num_warps),
            "warp_size": int(md.warp_size), "num_ctas": int(getattr(md, "num_ctas", 1)),
            "num_stages": int(md.num_stages),
            "global_scratch": [int(md.global_scratch_size), int(md.global_scratch_align)],
            "profile_scratch": [int(md.profile_scratch_size), int(md.profile_scratch_align)],
            "launch_cooperative_grid": bool(md.launch_cooperative_grid),
            "launch_pdl": bool(getattr(md, "launch_pdl", False)), "target": target,
            "triton_version": md.triton_version, "triton_hash": md.hash}


_PTX_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8}


def param_bytes(compiled: Any, api: str) -> list[int]:
    """Byte size of each kernel parameter as the binary declares it (hidden scratch pointers included),
    read from the PTX entry or the AMDGPU kernel metadata: what the runtime checks its packing against."""
    if api == "cuda":
        ptx = compiled.asm["ptx"]
        start = ptx.index(f".entry {compiled.metadata.name}(")
        params = ptx[start:ptx.index(")", start)]
        return [_PTX_BYTES[bits] for bits in re.findall(r"\.param\s+\.[a-z]+?(\d+)\b", params)]
    sizes = []
    for size, kind in re.findall(r"\.size:\s+(\d+)\s+\.value_kind:\s+(\w+)", compiled.asm["amdgcn"]):
        if kind.startswith("hidden_"):    # implicit arguments the HIP runtime appends itself
            break
        sizes.append(int(size))
    return sizes


def fp_fusion() -> bool:
    """Triton's default FP fusion (TRITON_DEFAULT_FP_FUSION, on unless "0"), passed explicitly: it is
    part of the cache key, so binaries built under either setting never mix."""
    return os.environ.get("TRITON_DEFAULT_FP_FUSION", "1") != "0"


def divisibility_attrs(spec: dict[str, Any], target: Any) -> dict:
    """Triton's "D" attribute (tt.divisibility=16) on the parameters the launch found divisible,
    as the JIT sets it: 16-byte-aligned pointers and ints divisible by 16 (vector loads, cp.async)."""
    from triton.compiler.compiler import make_backend
    divisible = set(spec.get("divisible", ()))
    if not divisible:
        return {}
    attr = make_backend(target).parse_attr("D")
    return {(index,): attr for index, name in enumerate(spec["signature"]) if name in divisible}


def compile_one(job: dict[str, Any], cache: Any) -> float:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsecc.runtime.artifact import BINARY_SUFFIX, parse_target
    from sparsecc.runtime.kernels.triton.launch import KERNEL_MODULE_PREFIX

    spec = job["spec"]
    module_name, _, name = spec["kernel"].partition(":")
    if not module_name.startswith(KERNEL_MODULE_PREFIX):
        raise ValueError(f"{spec['kernel']} is not a sparsecc Triton kernel")
    fn = getattr(importlib.import_module(module_name), name)
    api, arch = parse_target(job["target"])
    target = GPUTarget(api, int(arch) if api == "cuda" else arch, 32 if api == "cuda" else 64)
    start = time.perf_counter()
    source = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                       attrs=divisibility_attrs(spec, target))
    options = {**spec["options"], "enable_fp_fusion": fp_fusion()}
    compiled = triton.compile(source, target=target, options=options)
    seconds = time.perf_counter() - start
    metadata = {**launch_metadata(compiled, job["target"]), "build_seconds": seconds,
                "param_bytes": param_bytes(compiled, api)}
    cache.put(job["key"], compiled.asm[BINARY_SUFFIX[api]], metadata, BINARY_SUFFIX[api])
    return seconds


def main() -> int:
    from sparsecc.runtime.kernel_cache import KernelCache

    request = json.loads(sys.stdin.read())
    cache = KernelCache(request["cache_dir"])
    with tempfile.TemporaryDirectory(prefix="sparsecc-triton-") as triton_cache:
        os.environ["TRITON_CACHE_DIR"] = triton_cache      # our cache is the one that persists
        for job in request["jobs"]:
            report = {"key": job["key"], "entry": job["spec"]["kernel"].rpartition(":")[2], "target": job["target"]}
            try:
                report["seconds"] = compile_one(job, cache)
            except Exception as err:  # reported per kernel; the parent fails the build with all of them
                report["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
