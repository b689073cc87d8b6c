"""Benchmark the generated N:M decode kernel (MLIR -> LLVM JIT) against dense F.linear on the CPU.

    python bench/nm_mlir_kernel.py [--quick] [--tokens 1,8,16] [--pattern 2:4] [--reps 21]

Per shape (out x in), dtype and token count: median ms of dense `F.linear` on the pruned
weight and of `nm_linear_mlir` on its compressed form, and dense / kernel (> 1: the kernel
wins); then the same from the fastest rep of each, which other processes on a shared
machine disturb least. Each is timed in blocks of back-to-back calls, the blocks alternating.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsecc.runtime.kernels.cpu.mlir.nm_decode import nm_linear_mlir
from sparsecc.runtime.nm_format import compress_nm, nm_mask

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(1024, 1024), (2752, 1024)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def blocked_ms(first, second, reps: int, rounds: int = 3) -> tuple[list[float], list[float]]:
    """Times (ms) of two callables, each timed in blocks of back-to-back calls after an untimed warm-up
    call, the blocks alternating `rounds` times. Back to back as bench/nm_linear.py times them: right
    after a torch op, torch's OpenMP workers spin-wait on the second core (libgomp's default), which
    slows a kernel that runs its own threads until they give the core up."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((first, times[0]), (second, times[1])):
            fn()
            for _ in range(max(1, reps // rounds)):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) * 1e3)
    return times


def measure(shape: tuple[int, int], dtype: torch.dtype, tokens: int, n: int, m: int, reps: int) -> str:
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features)
    pruned = (weight * nm_mask(weight.abs(), n, m)).to(dtype)
    values, indices = compress_nm(pruned, n, m)
    x = torch.randn(tokens, in_features, dtype=dtype)
    if nm_linear_mlir(x, values, indices, None, n, m, in_features) is None:
        return "unsupported here"
    dense, kernel = blocked_ms(lambda: F.linear(x, pruned),
                                 lambda: nm_linear_mlir(x, values, indices, None, n, m, in_features), reps)
    dense_ms, kernel_ms = statistics.median(dense), statistics.median(kernel)
    return (f"dense {dense_ms:8.3f}  n:m {kernel_ms:8.3f}  speed-up {dense_ms / kernel_ms:5.2f}x"
            f"  (min: {min(dense):8.3f} {min(kernel):8.3f} {min(dense) / min(kernel):5.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few reps (smoke run)")
    parser.add_argument("--tokens", default="1,8,16", help="token counts, comma separated")
    parser.add_argument("--pattern", default="2:4", help="N:M pattern")
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    n, m = (int(v) for v in args.pattern.split(":"))
    reps = 3 if args.quick else args.reps
    print(f"threads={torch.get_num_threads()} pattern={n}:{m} reps={reps} (median ms, then min)")
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        for tag, dtype in DTYPES.items():
            for tokens in map(int, args.tokens.split(",")):
                row = measure(shape, dtype, tokens, n, m, reps)
                print(f"{shape[0]:>6}x{shape[1]:<6} {tag} tok={tokens:<3} {row}", flush=True)


if __name__ == "__main__":
    main()
