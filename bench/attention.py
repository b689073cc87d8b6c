"""Benchmark sparsecc::block_attention on CPU against torch's attention, causal language-model shapes.

    python bench/attention.py [--quick] [--threads N] [--json PATH]

B=1, 8 heads, head dim 64, fp32, S in 2048, 8192, 16384 (--quick: 512, 1024, 2048). Per S, the
columns run side by side (reps interleaved, flex after the others; median reported):

    sdpa_mask    F.scaled_dot_product_attention with an explicit bool causal mask [1, 1, S, S] (what
                 transformers models pass; the mask policy reads the same mask)
    sdpa_causal  F.scaled_dot_product_attention(is_causal=True)
    flex         torch.compile(flex_attention) with the causal BlockMask (built once, untimed;
                 the first call per shape compiles, untimed)
    mask         sparsecc::block_layout(mask) + sparsecc::block_attention(mask), block 128: what the
                 `mask` policy compiles to (exact)
    window       sparsecc::block_layout(mask, policy=window, 1024 keys + 4 sinks) + block_attention(mask),
                 block 64: what the `window` policy compiles to (the layout op reads the mask only
                 inside the window)
    topk         sparsecc::block_layout(mask, policy=topk, 10% of each query block's visible key
                 blocks + 4 sinks, from q and k) + block_attention(mask), block 128: the `topk` policy

Every sparsecc column includes its layout op, run per call as in a compiled model.

"x mask" / "x causal" are speedups over sdpa_mask / sdpa_causal; density is kept / all key
blocks; error is ||out - causal|| / ||causal|| against sdpa_causal. Targets: mask >= 1.6x over
sdpa_mask at 8192, window >= 5x over sdpa_causal at 16384.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import sparsecc.runtime.ops  # noqa: F401  (registers the sparsecc ops)
from sparsecc.runtime.attention_layout import Layout, density

HEADS, DIM, WINDOW, SINKS, TOPK = 8, 64, 1024, 4, 0.1
BLOCK, WINDOW_BLOCK = 128, 64
SIZES, QUICK_SIZES = (2048, 8192, 16384), (512, 1024, 2048)
REPS = {512: 9, 1024: 9, 2048: 9, 8192: 5, 16384: 5}
block_layout, block_attention = torch.ops.sparsecc.block_layout, torch.ops.sparsecc.block_attention


def flex_column(q, k, v):
    """(callable, None) for compiled FlexAttention with a causal BlockMask, or (None, why it cannot run)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        seq = q.shape[2]
        causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, seq, seq, device="cpu")
        compiled = torch.compile(flex_attention)
        compiled(q, k, v, block_mask=causal)  # compiles for this shape
        return (lambda: compiled(q, k, v, block_mask=causal)), None
    except Exception as err:  # noqa: BLE001  (any failure is reported in the table)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"


def policy_call(q, k, v, mask, scale, block, layout_args):
    """What a compiled model runs per call for one policy: the layout op, then the attention op."""
    return lambda: block_attention(q, k, v, *block_layout(mask, block, block, *layout_args), mask, scale, block,
                                   block)


def columns(q, k, v) -> tuple[dict, dict, dict]:
    """(name -> callable, name -> density, name -> note) for one sequence length."""
    seq, scale = q.shape[2], DIM ** -0.5
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    fns = {"sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
           "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    flex, why = flex_column(q, k, v)
    notes = {"flex": why} if why else {}
    if flex:
        fns["flex"] = flex
    policies = {"mask": (BLOCK, ()), "window": (WINDOW_BLOCK, ("window", WINDOW, SINKS)),
                "topk": (BLOCK, ("topk", 0, SINKS, TOPK, q, k))}
    densities = {}
    for name, (block, layout_args) in policies.items():
        fns[name] = policy_call(q, k, v, mask, scale, block, layout_args)
        densities[name] = density(Layout(*block_layout(mask, block, block, *layout_args)))
    return fns, densities, notes


def time_columns(fns: dict, reps: int) -> tuple[dict, dict]:
    """(median ms, output) per column: one warm-up call each, then the reps of all columns interleaved,
    except flex, timed after the others: the OpenMP threads of its compiled kernels keep spinning
    after a call and slowed whatever ran next by ~15% here."""
    outputs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for group in ([n for n in fns if n != "flex"], [n for n in fns if n == "flex"]):
        for _ in range(reps):
            for name in group:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, outputs


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def run_size(seq: int) -> list[dict]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, seq, DIM) for _ in range(3))
    fns, densities, notes = columns(q, k, v)
    ms, outputs = time_columns(fns, REPS.get(seq, 2))
    exact = outputs["sdpa_causal"]
    rows = [{"S": seq, "column": name, "ms": ms[name], "x_mask": ms["sdpa_mask"] / ms[name],
             "x_causal": ms["sdpa_causal"] / ms[name], "density": densities.get(name),
             "error": relative_error(outputs[name], exact)} for name in fns]
    return rows + [{"S": seq, "column": name, "note": note} for name, note in notes.items()]


HEADER = f"{'S':>6} {'column':<12} {'ms':>9} {'x mask':>7} {'x causal':>8} {'density':>8} {'error':>9}"


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        if "note" in row:
            print(f"{row['S']:>6} {row['column']:<12} n/a ({row['note']})")
            continue
        dens = f"{row['density']:.3f}" if row["density"] is not None else "-"
        print(f"{row['S']:>6} {row['column']:<12} {row['ms']:>9.1f} {row['x_mask']:>6.2f}x {row['x_causal']:>7.2f}x"
              f" {dens:>8} {row['error']:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short sequences (512, 1024, 2048)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier "
                        "on a shared machine, where a descheduled OpenMP thread stalls every parallel call")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1, H={HEADS}, D={DIM}, fp32; "
          f"window {WINDOW}+{SINKS} sinks (block {WINDOW_BLOCK}), topk {TOPK:.0%} (block {BLOCK}), mask policy "
          f"block {BLOCK}")
    print(HEADER)
    rows = []
    for seq in QUICK_SIZES if args.quick else SIZES:
        size_rows = run_size(seq)
        print_rows(size_rows)
        rows += size_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
