"""Benchmark token routing on a Llama-style MLP stack on CPU: compiled at each capacity vs the dense model.

    python bench/token_routing.py [--quick] [--json PATH]

Model: L residual blocks `x + SwiGLU(RMSNorm(x))` (hidden H, MLP width I, fp32, random
weights), batch 1 x 2048 tokens whose hidden states have a per-token scale drawn
log-normally (so tokens differ in how much they matter). Every block is routed
(`layers: ["*"]`; the default keeps the first and last dense). For each router
(`norm`; `calibrated`, fitted on 4 other batches drawn the same way) and capacity
1.0 / 0.75 / 0.5 / 0.25, one compile, then the medians of timed reps (after a
warm-up, under `torch.no_grad()`, dense and compiled reps interleaved):

    dense ms   the eager torch model
    routed ms  sparsecc.compile(model, sparsity={"tokens": {...}}) on the torch backend
    speed-up   dense / routed wall-clock medians; target >= 0.85 / capacity
    best-of    the same for the fastest reps; cpu-time: for median process CPU time
               (both less sensitive to other processes sharing the cores)
    error      relative L2 error of the output vs dense on the benchmark input
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import sparsecc
import torch
import torch.nn.functional as F
from torch import nn

CAPACITIES = (1.0, 0.75, 0.5, 0.25)
ROUTERS = ("norm", "calibrated")


class RMSNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.norm = RMSNorm(width)
        self.gate, self.up = nn.Linear(width, inner, bias=False), nn.Linear(width, inner, bias=False)
        self.down = nn.Linear(inner, width, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class MLPStack(nn.Module):
    def __init__(self, layers: int, width: int, inner: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(width, inner) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def hidden_states(tokens: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(1, tokens, 1, generator=generator))
    return torch.randn(1, tokens, width, generator=generator) * scale


def timed(fn, x) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call; CPU time is less sensitive to other processes' load."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(x)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def bench(layers: int, width: int, inner: int, tokens: int, reps: int) -> list[dict]:
    torch.manual_seed(0)
    model = MLPStack(layers, width, inner).eval()
    x = hidden_states(tokens, width, seed=0)
    calibration = [(hidden_states(tokens, width, seed=1 + i),) for i in range(4)]
    rows = []
    with torch.no_grad():
        dense_out = model(x)
        for router in ROUTERS:
            for capacity in CAPACITIES:
                tokens_cfg = {"capacity": capacity, "router": router, "layers": ["*"]}
                compiled = sparsecc.compile(model, (x,), sparsity={"tokens": tokens_cfg},
                                            calibration=calibration if router == "calibrated" else None)
                error = sparsecc.numerics.relative_error(compiled(x), dense_out)
                model(x), compiled(x)   # warm-up
                dense, routed = [], []
                for _ in range(reps):
                    dense.append(timed(model, x))
                    routed.append(timed(compiled, x))
                d, r = (statistics.median(t[0] for t in times) for times in (dense, routed))
                best = min(t[0] for t in dense) / min(t[0] for t in routed)
                cpu = statistics.median(t[1] for t in dense) / statistics.median(t[1] for t in routed)
                kept = compiled.report().layers[0].details["kept"]
                rows.append({"router": router, "capacity": capacity, "kept": kept, "tokens": tokens,
                             "dense_ms": d, "routed_ms": r, "speedup": d / r, "speedup_best": best,
                             "speedup_cpu_time": cpu,
                             "target": 0.85 / capacity, "error": error})
                print(f"{router:>10}  {capacity:>8.2f}  {kept:>5}/{tokens}  {d:>9.1f}  {r:>9.1f}  "
                      f"{d / r:>7.2f}x  {best:>7.2f}x  {cpu:>7.2f}x  {0.85 / capacity:>6.2f}x  "
                      f"{'yes' if d / r >= 0.85 / capacity else 'NO':>4}  {error:.3e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few reps (a smoke run)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    layers, width, inner, tokens, reps = (2, 128, 352, 256, 3) if args.quick else (4, 1024, 2816, 2048, 7)
    print(f"token routing, Llama-style MLP stack: {layers} blocks, H={width}, I={inner}, fp32, 1 x {tokens} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'router':>10}  {'capacity':>8}  {'kept':>10}  {'dense ms':>9}  {'routed ms':>9}  {'speed-up':>8}  "
          f"{'best-of':>8}  {'cpu-time':>8}  {'target':>7}  {'met':>4}  error vs dense")
    rows = bench(layers, width, inner, tokens, reps)
    print(f"load after: {os.getloadavg()[0]:.2f} (speed-up: ratio of wall-clock medians, 'met' judged on it; "
          "best-of: of the fastest reps; cpu-time: of median process CPU times)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
