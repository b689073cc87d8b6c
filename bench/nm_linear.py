"""Benchmark N:M linear layers compiled by sparsecc against dense linear layers of the same (pruned) weight.

    python bench/nm_linear.py [--quick] [--json PATH] [--no-cpu] [--sweep] [--tokens 1,8,512]

CPU: per shape (out x in), token count and dtype (fp32, bf16), side by side in
one run: dense `F.linear` (MKL / oneDNN: what a user runs without sparsecc; no
CPU library ships a 2:4 kernel, so dense is the peer too), the layer compiled
by `sparsecc.compile(..., sparsity="2:4")` and "4:8", each called as the user
calls it (the path it took, measured per token bucket by the runtime's
autotune, is printed beside it). The three are timed one call each in turn,
round after round (medians after a warm-up), so a drifting machine slows all
alike; ratios are dense time / sparsecc time (> 1: sparsecc is faster).
With CUDA also fp16 cuBLAS, the Triton kernel, torch's semi-structured 2:4
(`to_sparse_semi_structured`) and the runtime's direct cuSPARSELt path
(`kernels/cusparselt.py`: `_cslt_sparse_mm` on a weight compressed once),
timed with `triton.testing.do_bench` (median); their ratios are time / dense time.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.runtime.kernels.cpu.mlir.host import cpu_model
from sparsecc.runtime.nm_format import compress_nm, nm_compressed_bytes, nm_mask

N, M = 2, 4
PATTERNS = ("2:4", "4:8")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(1024, 1024), (2752, 1024), (1024, 2752)]
TOKENS = (1, 8, 512)
SWEEP = {  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps) of the fused kernel tried with --sweep
    "few": [(16, bn, bk, split, 4) for bn in (16, 32, 64) for bk in (128, 256) for split in (1, 4, 8)],
    "many": [(64, 64, 64, 1, 4), (64, 128, 64, 1, 4), (128, 64, 64, 1, 8), (128, 128, 64, 1, 8),
             (64, 128, 128, 1, 4), (128, 128, 128, 1, 8), (128, 64, 32, 1, 8)],
    "decompress": [(32, 128, 4), (64, 128, 4), (16, 256, 4), (32, 256, 4), (64, 256, 8), (128, 128, 8), (8, 512, 4)],
}  # (BLOCK_N, BLOCK_K, num_warps) of the decompression kernel


def cpu_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gpu_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, return_mode="median")


def pruned_layer(out_features: int, in_features: int, dtype: torch.dtype, device: str = "cpu") -> dict:
    weight = torch.randn(out_features, in_features, device=device)
    pruned = (weight * nm_mask(weight.abs(), N, M)).to(dtype)
    values, indices = compress_nm(pruned, N, M)
    return {"dense": pruned, "values": values, "indices": indices, "in": in_features}


def compiled_linear(shape: tuple[int, int], dtype: torch.dtype, pattern: str, tokens: int):
    """(dense nn.Linear, the sparsecc-compiled one, its N:M weight as dense) for `pattern`."""
    layer = torch.nn.Linear(shape[1], shape[0], bias=False).to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = sparsecc.compile(layer, (torch.randn(tokens, shape[1], dtype=dtype),), sparsity=pattern,
                                    check=False, progress=False)
    return compiled


def chosen_path(compiled, tokens: int) -> str:
    from sparsecc.api import nm_kernel_choices
    entries = [k for k in nm_kernel_choices(compiled) if k["tokens"] >= tokens]
    return min(entries, key=lambda k: k["tokens"])["path"] if entries else "tiles"


def interleaved_ms(fns: dict, reps: int, calls: int = 1) -> dict:
    """Median ms per call of each callable: each sample times `calls` consecutive calls of one callable (as a
    decode loop makes them: its weights warm in the caches), samples taken one callable after another for
    `reps` rounds after one warm-up call each: a machine that drifts (other tenants, clocks) slows every column
    alike. The order is shuffled every round: in a fixed order the first of two equal programs measured up to
    10 % slower (2-core Zen 4)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    order, shuffle = list(fns.items()), random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_columns(shape: tuple[int, int], tokens: int, reps: int) -> dict:
    row = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        x = torch.randn(tokens, shape[1], dtype=dtype)
        compiled = {pattern: compiled_linear(shape, dtype, pattern, tokens) for pattern in PATTERNS}
        dense = compiled["2:4"].pruned_state_dict()["weight"].to(dtype)   # the same pruned weight, dense
        calls = {"dense": lambda: F.linear(x, dense)}
        calls.update({pattern: (lambda c=c: c(x)) for pattern, c in compiled.items()})
        for name, ms in interleaved_ms(calls, reps).items():
            key = "dense" if name == "dense" else "nm" + name.replace(":", "")
            row[f"cpu_{key}_{tag}_ms"] = ms
        for pattern, c in compiled.items():
            row[f"cpu_nm{pattern.replace(':', '')}_{tag}_path"] = chosen_path(c, tokens)
        del compiled, calls
    return row


def triton_ms(layer: dict, x: torch.Tensor, sweep: bool) -> tuple[float, str, float, list]:
    """(best time, its config, worst relative error vs dense, all results) of the Triton kernel."""
    from sparsecc.runtime.kernels.triton.nm_linear import nm_linear_triton
    configs = SWEEP["few" if x.shape[0] <= 16 else "many"] if sweep else [default_config(x.shape[0])]
    reference = F.linear(x.float(), layer["dense"].float())
    results = []
    for config in configs:
        blocks = dict(zip(("block_m", "block_n", "block_k", "split_k", "num_warps"), config))
        run = lambda: nm_linear_triton(x, layer["values"], layer["indices"], None, N, M, layer["in"],  # noqa: E731
                                       path="fused", **blocks)
        error = float((run().float() - reference).norm() / reference.norm())
        results.append((gpu_ms(run), str(config), error))
    best = min(results)
    return best[0], best[1], max(r[2] for r in results), results


def default_config(tokens: int) -> tuple:
    from sparsecc.runtime.kernels.triton.nm_linear import default_blocks
    return default_blocks(tokens, M)


def decompress_path_ms(layer: dict, x: torch.Tensor, sweep: bool) -> tuple[float, str, float]:
    """(best time, its config, worst relative error) of the Triton decompression kernel + cuBLAS."""
    from sparsecc.runtime.kernels.triton.nm_linear import nm_decompress_triton
    reference = F.linear(x.float(), layer["dense"].float())
    results = []
    for config in SWEEP["decompress"] if sweep else [None]:
        blocks = dict(zip(("block_n", "block_k", "num_warps"), config or ()))
        run = lambda: F.linear(x, nm_decompress_triton(  # noqa: E731
            layer["values"], layer["indices"], N, M, layer["in"], **blocks))
        error = float((run().float() - reference).norm() / reference.norm())
        results.append((gpu_ms(run), str(config or "default"), error))
    best = min(results)
    return best[0], best[1], max(r[2] for r in results)


def semi_structured_ms(layer: dict, x: torch.Tensor) -> tuple[float | None, str]:
    try:
        sparse = torch.sparse.to_sparse_semi_structured(layer["dense"])
        F.linear(x, sparse)
        return gpu_ms(lambda: F.linear(x, sparse)), ""
    except Exception as err:  # unsupported GPU, shape or build: report why
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


def cusparselt_ms(layer: dict, x: torch.Tensor) -> tuple[float | None, str]:
    """The runtime's direct cuSPARSELt path (compressed weight and algorithm search made on the first call)."""
    from sparsecc.runtime.kernels.cusparselt import nm_linear_cusparselt
    run = lambda: nm_linear_cusparselt(x, layer["values"], layer["indices"], None, N, M, layer["in"])  # noqa: E731
    try:
        reference = F.linear(x.float(), layer["dense"].float())
        error = float((run().float() - reference).norm() / reference.norm())
        return gpu_ms(run), f"cuSPARSELt rel.err {error:.1e}"
    except Exception as err:  # not 2:4, no cuSPARSELt in this torch, unsupported GPU: report why
        return None, f"cuSPARSELt {type(err).__name__}: {str(err).splitlines()[0][:80]}"


def gpu_columns(shape: tuple[int, int], tokens: int, sweep: bool) -> dict:
    layer = pruned_layer(*shape, torch.float16, "cuda")
    x = torch.randn(tokens, shape[1], dtype=torch.float16, device="cuda")
    row = {"gpu_dense_fp16_ms": gpu_ms(lambda: F.linear(x, layer["dense"]))}
    triton_row = triton_ms(layer, x, sweep)
    row["gpu_fused_ms"], row["gpu_fused_config"], row["gpu_fused_rel_err"], row["gpu_fused_sweep"] = triton_row
    row["gpu_decompress_ms"], row["gpu_decompress_config"], row["gpu_decompress_rel_err"] = \
        decompress_path_ms(layer, x, sweep)
    row["gpu_semi_ms"], row["gpu_semi_note"] = semi_structured_ms(layer, x)
    row["gpu_cslt_ms"], row["gpu_cslt_note"] = cusparselt_ms(layer, x)
    return row


def fmt(row: dict, key: str, base: str) -> str:
    value = row.get(key)
    if value is None:
        return f"{'-':>17}"
    return f"{value:9.3f} ({value / row[base]:4.2f}x)"


def print_table(rows: list[dict]) -> None:
    if any("cpu_dense_fp32_ms" in r for r in rows):
        print(f"CPU ({torch.get_num_threads()} threads): ms, and dense / sparsecc (> 1: faster than dense)")
        head = [f"{d} {k}" for d in ("fp32", "bf16") for k in ("dense", "2:4", "4:8")]
        print(f"{'out x in':>12} {'tok':>4} " + " ".join(f"{h:>22}" for h in head))
        for r in rows:
            cells = []
            for tag in ("fp32", "bf16"):
                dense = r[f"cpu_dense_{tag}_ms"]
                cells.append(f"{dense:22.3f}")
                for name in ("24", "48"):
                    ms, path = r[f"cpu_nm{name}_{tag}_ms"], r[f"cpu_nm{name}_{tag}_path"]
                    cells.append(f"{ms:8.3f} {dense / ms:5.2f}x {path[:6]:>6}")
            print(f"{r['shape']:>12} {r['tokens']:>4} " + " ".join(cells))
    cols = [("gpu_dense_fp16_ms", "gpu_dense_fp16_ms"), ("gpu_fused_ms", "gpu_dense_fp16_ms"),
            ("gpu_decompress_ms", "gpu_dense_fp16_ms"), ("gpu_semi_ms", "gpu_dense_fp16_ms"),
            ("gpu_cslt_ms", "gpu_dense_fp16_ms")]
    if not any("gpu_dense_fp16_ms" in r for r in rows):
        return
    print(f"{'out x in':>12} {'tok':>4} {'bytes':>6} " + " ".join(f"{c[0][:-3]:>17}" for c in cols))
    for r in rows:
        print(f"{r['shape']:>12} {r['tokens']:>4} {r['bytes_ratio']:6.4f} " + " ".join(fmt(r, *c) for c in cols))
    for r in rows:
        if "gpu_fused_config" in r:
            print(f"{r['shape']} tok={r['tokens']}: fused {r['gpu_fused_config']} rel.err "
                  f"{r['gpu_fused_rel_err']:.1e}, decompress {r['gpu_decompress_config']} rel.err "
                  f"{r['gpu_decompress_rel_err']:.1e} "
                  f"{r['gpu_semi_note']} {r['gpu_cslt_note']}".rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer reps (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU columns")
    parser.add_argument("--sweep", action="store_true", help="on CUDA, report the best of several tile configs")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts, comma separated")
    args = parser.parse_args()
    rows = []
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        for tokens in map(int, args.tokens.split(",")):
            reps = 3 if args.quick else (21 if tokens <= 16 else 7)
            dense_fp16 = shape[0] * shape[1] * 2
            row = {"shape": f"{shape[0]}x{shape[1]}", "tokens": tokens,
                   "bytes_ratio": nm_compressed_bytes(*shape, N, M, torch.float16) / dense_fp16}
            if not args.no_cpu:
                row |= cpu_columns(shape, tokens, reps)
            if torch.cuda.is_available():
                row |= gpu_columns(shape, tokens, args.sweep)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "gpu_fused_sweep"}), flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model(),
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
