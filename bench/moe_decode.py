"""Benchmark sparsecc::moe in decode (few tokens) with 2:4-compressed experts on CPU.

    python bench/moe_decode.py [--quick] [--tokens 1 4] [--reps 30] [--json PATH]

One Mixtral-like block (E=8, top-2, H=1024, I=2816; --quick: H=256, I=704) with random weights
pruned 2:4 by magnitude, per dtype (fp32, bf16) and token count; every column computes the same
output from the same pruned weights, reps interleaved round-robin, median ms:

    dense       the moe CPU kernel on the pruned weights stored dense (no compression)
    decompress  what a compiled `{"moe": "dispatch", "weights": "2:4"}` model runs today:
                nm_decompress of both stacked weights (every expert), then the moe CPU kernel
    compressed  kernels/cpu/moe_decode.py: each used expert's projections on its compressed slice,
                on nm_linear's measured CPU path (the generated decode kernel at <= 16 rows)

Each column is checked against `dense` (max |diff| / max |ref|) before timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsecc.runtime.kernels.cpu.moe import moe_cpu
from sparsecc.runtime.kernels.cpu.moe_decode import NMExperts, moe_cpu_nm
from sparsecc.runtime.nm_format import compress_nm, nm_mask
from sparsecc.runtime.ops.nm_decompress import nm_decompress_cpu

SHAPE = dict(experts=8, top_k=2, hidden=1024, inter=2816)
QUICK_SHAPE = dict(experts=8, top_k=2, hidden=256, inter=704)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLUMNS = ("dense", "decompress", "compressed")


def pruned_experts(experts: int, hidden: int, inter: int, dtype: torch.dtype) -> NMExperts:
    """Random Mixtral-like expert weights (randn / sqrt(fan_in)), pruned 2:4 by magnitude, compressed."""
    torch.manual_seed(0)
    parts = []
    for shape in ((experts, 2 * inter, hidden), (experts, hidden, inter)):
        weight = (torch.randn(*shape) / shape[-1] ** 0.5).to(dtype)
        parts += compress_nm(weight, 2, 4, mask=nm_mask(weight.abs(), 2, 4))
    return NMExperts(*parts, 2, 4)


def columns(experts: NMExperts, tokens: int, top_k: int, dtype: torch.dtype) -> dict:
    """column -> a call computing the block's output for `tokens` random tokens."""
    hidden = torch.randn(tokens, experts.width, dtype=dtype)
    logits = torch.randn(tokens, experts.gate_up_values.shape[0], dtype=dtype)
    options = (None, None, None, top_k, True, "softmax", "silu", True)
    w_gate_up, w_down = experts.decompressed()

    def decompress_per_call():
        gate_up = nm_decompress_cpu(experts.gate_up_values, experts.gate_up_indices, 2, 4, experts.width)
        down = nm_decompress_cpu(experts.down_values, experts.down_indices, 2, 4, experts.intermediate)
        return moe_cpu(hidden, logits, gate_up, down, *options)
    return {"dense": lambda: moe_cpu(hidden, logits, w_gate_up, w_down, *options),
            "decompress": decompress_per_call,
            "compressed": lambda: moe_cpu_nm(experts, hidden, logits, None, None, *options)}


def interleaved_ms(runs: dict, reps: int) -> dict[str, list[float]]:
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def measure(shape: dict, dtype_name: str, tokens: int, reps: int) -> dict:
    dtype = DTYPES[dtype_name]
    experts = pruned_experts(shape["experts"], shape["hidden"], shape["inter"], dtype)
    runs = columns(experts, tokens, shape["top_k"], dtype)
    with torch.no_grad():
        reference = runs["dense"]().float()
        errors = {name: ((run().float() - reference).abs().max() / reference.abs().max()).item()
                  for name, run in runs.items()}   # also the warm-up: the first compressed call picks its paths
        samples = interleaved_ms(runs, reps)
    row = {"dtype": dtype_name, "tokens": tokens, **shape, "errors": errors}
    row.update({f"{name}_ms": statistics.median(t) for name, t in samples.items()})
    row.update({f"{name}_best_ms": min(t) for name, t in samples.items()})   # a busy host only ever adds time
    row["dense_over_compressed"] = row["dense_ms"] / row["compressed_ms"]
    row["decompress_over_compressed"] = row["decompress_ms"] / row["compressed_ms"]
    return row


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'dtype':<5} {'T':>3} {'dense':>15} {'decompress':>15} {'compressed':>15} "
          f"{'dense/comp':>11} {'decomp/comp':>12} {'max err':>8}   (ms, median (best))")
    for r in rows:
        times = " ".join(f"{r[c + '_ms']:7.2f} ({r[c + '_best_ms']:5.2f})" for c in COLUMNS)
        print(f"{r['dtype']:<5} {r['tokens']:>3} {times} {r['dense_over_compressed']:10.2f}x "
              f"{r['decompress_over_compressed']:11.2f}x {max(r['errors'].values()):8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="H=256, I=704: a smoke run")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args()
    shape = QUICK_SHAPE if args.quick else SHAPE
    print(f"E={shape['experts']} top-{shape['top_k']} H={shape['hidden']} I={shape['inter']}, 2:4, "
          f"{torch.get_num_threads()} threads")
    rows = [measure(shape, dtype, tokens, args.reps) for dtype in DTYPES for tokens in args.tokens]
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
