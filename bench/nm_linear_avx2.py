"""Benchmark the AVX2 form of the generated fp32 N:M decode kernel against F.linear with MKL limited to AVX2.

    python bench/nm_linear_avx2.py [--quick] [--reps 15]

Emulates an AVX2 host on an AVX-512 one: the kernel is the avx2 form built for x86-64-v3 (what a
cpu:x86-64-v3 artifact holds), offered as a prebuilt object so the layer's bound call links it, and the
script re-executes itself with MKL_ENABLE_INSTRUCTIONS=AVX2 (and oneDNN and ATen held to AVX2) set before
torch is imported. Per shape (out x in), pattern, token count and thread count (one, then torch's
default): median ms of dense F.linear on the pruned weight and of one call of the kernel, and dense /
kernel (> 1: the kernel wins). The two alternate call by call, each timed call after an untimed one of
its own kind (right after a torch op torch's OpenMP workers spin on the other core and slow the next).
"""
from __future__ import annotations

import os
import sys

# before torch is imported: MKL, oneDNN and ATen read these once, when they load
AVX2_ONLY = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
if __name__ == "__main__" and any(os.environ.get(name) != value for name, value in AVX2_ONLY.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})

import argparse    # noqa: E402
import statistics  # noqa: E402
import time        # noqa: E402

import torch                        # noqa: E402
import torch.nn.functional as F     # noqa: E402

from sparsecc.runtime.kernels.cpu.mlir import jit, objects                    # noqa: E402
from sparsecc.runtime.kernels.cpu.mlir.codegen import COMPACT_BLOCKING, DecodeSpec, decode_kernel_text  # noqa: E402
from sparsecc.runtime.kernels.cpu.mlir.nm_decode import DecodeCall, compact  # noqa: E402
from sparsecc.runtime.kernels.cpu.mlir.object_cache import use_prebuilt       # noqa: E402
from sparsecc.runtime.nm_format import compress_nm, nm_mask                   # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(1024, 1024)]
PATTERNS = [(2, 4), (4, 8)]
TOKENS = [1, 8]


def v3_kernel(k: int, n: int, m: int, tokens: int, values: torch.Tensor) -> DecodeSpec:
    """The avx2 form's spec, blocked as the runtime blocks it for this weight (nm_decode.decode_spec), its
    x86-64-v3 object offered to the loader (as a verified artifact's would be)."""
    spec = DecodeSpec("float32", k, n, m, tokens, *(COMPACT_BLOCKING if compact(values, tokens) else (0, 0)),
                      isa="avx2")
    text = decode_kernel_text(spec)
    use_prebuilt({objects.source_sha256(text): objects.build_object(text, spec.name, "x86-64-v3", "")})
    if jit.decode_kernel(spec).origin != "artifact":
        raise RuntimeError(f"{spec.name}: the x86-64-v3 object was not linked")
    return spec


def interleaved_ms(first, second, reps: int) -> tuple[float, float]:
    """Median ms of each callable, the two alternating, each timed call after an untimed one of its kind."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((first, times[0]), (second, times[1])):
            fn()
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(pruned: torch.Tensor, values, indices, spec: DecodeSpec, reps: int) -> str:
    x = torch.randn(spec.tokens, spec.k)
    call = DecodeCall(spec, values, indices, None)     # binds its row split to the current thread count
    error = (call(x) - F.linear(x, pruned)).abs().max().item()
    dense_ms, kernel_ms = interleaved_ms(lambda: F.linear(x, pruned), lambda: call(x), reps)
    return f"dense {dense_ms:8.3f}  avx2 n:m {kernel_ms:8.3f}  dense/n:m {dense_ms / kernel_ms:5.2f}x  (max err {error:.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, few reps (smoke run)")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    reps = 3 if args.quick else args.reps
    default_threads = torch.get_num_threads()
    print(f"{' '.join(f'{k}={v}' for k, v in AVX2_ONLY.items())}; fp32, median ms of {reps} interleaved calls")
    for out_features, in_features in QUICK_SHAPES if args.quick else SHAPES:
        weight = torch.randn(out_features, in_features)
        for n, m in PATTERNS:
            pruned = weight * nm_mask(weight.abs(), n, m)
            values, indices = compress_nm(pruned, n, m)
            for tokens in TOKENS:
                spec = v3_kernel(in_features, n, m, tokens, values)
                for threads in dict.fromkeys([1, default_threads]):
                    torch.set_num_threads(threads)
                    row = measure(pruned, values, indices, spec, reps)
                    print(f"{out_features:>6}x{in_features:<6} {n}:{m} tok={tokens} threads={threads}  {row}", flush=True)
                torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
