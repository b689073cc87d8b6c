"""Attention compiled as users have it: the mask is built inside the model, and sparsecc reads it as a rule.

    python bench/attention_model.py [--quick] [--threads N] [--json PATH] [--device cuda --window-seq 32768]

Modules (fp32, 8 heads, head dim 64), each timed eagerly (the peer: torch's SDPA as the model calls
it) and compiled by `sparsecc.compile`; reps interleaved, median reported. The compiled column is
the whole compiled module per call: whatever layout work it does per call is in its time.

    causal_window  SDPA(is_causal=True), S=16384, B=1, compiled with window 1024 + 4 sinks (block 64)
                   (target >= 5x causal SDPA)
    mask_8192      SDPA with a bool causal mask the module builds from arange, S=8192, B=1, compiled
                   with the exact `mask` policy (block 128) (target >= 2x SDPA with the bool mask)
    padded_8192    the same causal mask AND a key-padding input (B=4, rows left-padded by 25 %):
                   compiled `mask` (padded key blocks absent from the layout, never visited) against
                   the same op call whose layout ignores the padding (causal layout; the padding is
                   applied inside every block): the padding skip's own gain

--quick divides the sequence lengths by 8. On a GPU (--device cuda) the tensors are fp16 and the
compiled attention runs the Triton kernel; --window-seq sets the window case's length (the issue's
GPU target: >= 5x causal SDPA at 32768). Each line prints ms, the ratio to the eager module,
and the relative error against it (0 for exact rewrites up to float rounding).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.runtime.attention_layout import layout_from_blocks
from sparsecc.runtime.attention_rule import rule_block_states, stack_rule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root: bench/
from bench.attention import relative_error  # noqa: E402

HEADS, DIM = 8, 64
DEVICE, DTYPE = torch.device("cpu"), torch.float32


class CausalSDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class CausalMask(torch.nn.Module):
    """A bool causal mask built inside the model (as transformers does), ANDed with key padding."""

    def forward(self, q, k, v, keep):
        i = torch.arange(q.shape[2], device=q.device)
        mask = (i[None, :] <= i[:, None])[None, None] & keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def interleaved_ms(fns: dict, reps: int) -> tuple[dict, dict]:
    """(median ms, first output) per callable, reps interleaved so drift hits every column alike."""
    outputs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, outputs


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def qkv(batch: int, seq: int) -> tuple:
    torch.manual_seed(0)
    return tuple(torch.randn(batch, HEADS, seq, DIM, device=DEVICE, dtype=DTYPE) for _ in range(3))


def causal_window(seq: int, reps: int) -> list[dict]:
    q, k, v = qkv(1, seq)
    model = CausalSDPA()
    compiled = sparsecc.compile(model, (q, k, v), sparsity={"attention": {"policy": "window", "window": 1024,
                                                                          "sinks": 4, "block": 64}})
    return measure("causal_window", seq, {"sdpa_causal": lambda: model(q, k, v),
                                          "compiled": lambda: compiled(q, k, v)}, reps)


def masked(seq: int, batch: int, padding: float, reps: int, name: str) -> list[dict]:
    q, k, v = qkv(batch, seq)
    keep = torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)
    keep[:, : int(seq * padding)] = False     # left padding
    model = CausalMask()
    compiled = sparsecc.compile(model, (q, k, v, keep), sparsity={"attention": {"block": 128}})
    fns = {"sdpa_mask": lambda: model(q, k, v, keep), "compiled": lambda: compiled(q, k, v, keep)}
    if padding:
        fns["no_skip"] = without_padding_skip(q, k, v, keep)
    return measure(name, seq, fns, reps)


def without_padding_skip(q, k, v, keep):
    """The compiled call with a layout that lists padded key blocks too (causal layout, padding applied
    element-wise inside every block): what the padding skip saves."""
    seq = q.shape[2]
    positions = torch.arange(seq, device=DEVICE)
    rows, cols = stack_rule([positions[:, None], torch.zeros(())], [positions, keep[:, None, None, :]], seq, seq)
    causal_any, _ = rule_block_states(rows[:1], cols[:1], "ge", 128, 128)
    _, full = rule_block_states(rows, cols, "ge,ne", 128, 128)
    layout = layout_from_blocks(full, causal_any & ~full)   # fully padded blocks listed (partial) and visited

    def call():
        return torch.ops.sparsecc.block_attention(q, k, v, *layout, None, DIM ** -0.5, 128, 128, 0.0, "zero", 0.0,
                                                  None, rows, cols, "ge,ne")
    return call


def measure(name: str, seq: int, fns: dict, reps: int) -> list[dict]:
    ms, outputs = interleaved_ms(fns, reps)
    base_name = next(iter(fns))
    return [{"case": name, "S": seq, "column": col, "ms": ms[col], "x_eager": ms[base_name] / ms[col],
             "error": relative_error(outputs[col], outputs[base_name])} for col in fns]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sequence lengths / 8")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (fp16, Triton kernels)")
    parser.add_argument("--window-seq", type=int, default=16384, help="the window case's sequence length")
    args = parser.parse_args()
    global DEVICE, DTYPE
    DEVICE = torch.device(args.device)
    DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = 8 if args.quick else 1
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, H={HEADS}, D={DIM}, {DTYPE}")
    print(f"{'case':<14} {'S':>6} {'column':<12} {'ms':>9} {'x eager':>8} {'error':>9}")
    rows = []
    for rows_of in (lambda: causal_window(args.window_seq // scale, args.reps),
                    lambda: masked(8192 // scale, 1, 0.0, args.reps, "mask_8192"),
                    lambda: masked(8192 // scale, 4, 0.25, args.reps, "padded_8192")):
        for row in rows_of():
            print(f"{row['case']:<14} {row['S']:>6} {row['column']:<12} {row['ms']:>9.1f} {row['x_eager']:>7.2f}x "
                  f"{row['error']:>9.1e}", flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
