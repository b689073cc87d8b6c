"""Sweep the launch configurations of the Triton MoE and block-attention kernels on a CUDA GPU.

    python bench/gpu_tune.py [--json PATH]

Prints, per shape, every configuration's median time (`triton.testing.do_bench`, ms) and its
error against a torch reference, best first. The defaults in
`runtime/kernels/triton/moe.py` (`default_blocks`) and `block_attention.py` come from these tables
(recorded in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

import sparsecc.runtime.ops  # noqa: F401  (registers the sparsecc ops)
from sparsecc.runtime.kernels.triton.block_attention import block_attention_triton
from sparsecc.runtime.kernels.triton.moe import moe_triton

from gpu_kernels import bench_ms, moe_loop, rel_error  # noqa: E402  (bench/ is the script's folder)


def moe_candidates(tokens: int) -> list[tuple[int, int, int, int]]:
    if tokens <= 16:
        return list(itertools.product((16,), (32, 64, 128), (64, 128), (4, 8)))
    if tokens <= 512:
        return list(itertools.product((16, 32, 64), (64, 128), (64,), (4, 8)))
    return list(itertools.product((64, 128), (64, 128, 256), (64,), (4, 8)))


def tune_moe() -> list[dict]:
    rows = []
    for experts, hidden, inter in ((8, 4096, 14336), (64, 2048, 1024)):
        torch.manual_seed(0)
        gate_up = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden ** 0.5).bfloat16()
        down = (torch.randn(experts, hidden, inter, device="cuda") / inter ** 0.5).bfloat16()
        for tokens in (1, 16, 512, 4096):
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            logits = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
            ref = moe_loop(x, logits, gate_up, down, 2)
            results = []
            for bm, bn, bk, warps in moe_candidates(tokens):
                def fn():
                    return moe_triton(x, logits, gate_up, down, None, None, None, 2, True, "softmax", "silu",
                                      True, block_m=bm, block_n=bn, block_k=bk, num_warps=warps)
                try:
                    results.append({"config": [bm, bn, bk, warps], "err": rel_error(fn(), ref), "ms": bench_ms(fn)})
                except Exception as err:  # noqa: BLE001  (a config that does not compile is listed)
                    results.append({"config": [bm, bn, bk, warps], "error": str(err).splitlines()[0][:80]})
            results.sort(key=lambda r: r.get("ms", float("inf")))
            row = {"E": experts, "H": hidden, "I": inter, "T": tokens, "results": results}
            rows.append(row)
            best = results[0]
            print(f"MoE E={experts} H={hidden} I={inter} T={tokens}: best (BM,BN,BK,warps)={best['config']} "
                  f"{best.get('ms', float('nan')):.3f} ms; next: "
                  + ", ".join(f"{r['config']} {r.get('ms', float('nan')):.3f}" for r in results[1:4]), flush=True)
    return rows


def tune_attention() -> list[dict]:
    rows = []
    heads, dim = 32, 128
    for seq in (4096, 16384):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.float16) for _ in range(3))
        positions = torch.arange(seq, device="cuda")
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        results = []
        for (bq, bk), warps, stages in itertools.product(((128, 128), (128, 64), (64, 64)), (4, 8), (2, 3)):
            # the causal rule as a compiled model holds it (i ge j): no S x S mask tile is ever read
            *layout, rows, cols = torch.ops.sparsecc.rule_layout([positions[:, None]], [positions], "ge", seq, seq,
                                                                 bq, bk)

            def fn():
                return block_attention_triton(q, k, v, *layout, None, dim ** -0.5, bq, bk, rule_rows=rows,
                                              rule_cols=cols, rule_ops="ge", num_warps=warps, num_stages=stages)
            try:
                results.append({"config": [bq, bk, warps, stages], "err": rel_error(fn(), ref), "ms": bench_ms(fn)})
            except Exception as err:  # noqa: BLE001
                results.append({"config": [bq, bk, warps, stages], "error": str(err).splitlines()[0][:80]})
        results.sort(key=lambda r: r.get("ms", float("inf")))
        sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        rows.append({"S": seq, "sdpa_causal": sdpa, "results": results})
        print(f"attention S={seq} (sdpa_causal {sdpa:.3f} ms): best (BQ,BK,warps,stages) "
              + ", ".join(f"{r['config']} {r.get('ms', float('nan')):.3f}" for r in results[:5]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--only", choices=("moe", "attention"))
    args = parser.parse_args()
    out = {}
    if args.only in (None, "attention"):
        out["attention"] = tune_attention()
    if args.only in (None, "moe"):
        out["moe"] = tune_moe()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
