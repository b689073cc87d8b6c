"""The example transformer at 1 token per call: 2:4 compiled vs dense, side by side on the CPU.

    python bench/nm_decode_model.py [--dtype fp32|bf16] [--reps 30] [--dims 128,1024,2048]

The model is examples/tiny_transformer.py's TinyTransformer, at its own tiny size
(dim 128) and at widths where the weights dominate a decode step (dim 1024 and
2048, Llama-like MLP ratio). Each row times, after a warm-up, the eager model,
the dense model compiled by sparsecc (sparsity=None: same runtime, no rewrite)
and the 2:4 one, on one token per call (batch 1), one call of each in turn
round after round (medians: a drifting machine slows all three alike); ratios
are dense / 2:4 (> 1: 2:4 faster).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

import sparsecc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root: examples/
from bench.nm_linear import interleaved_ms  # noqa: E402
from examples.tiny_transformer import TinyTransformer  # noqa: E402

SIZES = [dict(dim=128, heads=4, hidden=384, layers=2, vocab=512),
         dict(dim=1024, heads=8, hidden=2816, layers=4, vocab=4096),
         dict(dim=2048, heads=16, hidden=5632, layers=4, vocab=8192)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def row(size: dict, dtype: torch.dtype, reps: int, calls: int) -> dict:
    torch.manual_seed(0)
    model = TinyTransformer(**size).to(dtype).eval()
    tokens = torch.randint(0, size["vocab"], (1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = sparsecc.compile(model, (tokens,), sparsity=None, check=False, progress=False)
        sparse = sparsecc.compile(model, (tokens,), sparsity="2:4", check=False, progress=False)
    for _ in range(10):          # warm-up: the first calls measure each layer's paths
        dense(tokens), sparse(tokens)
    with torch.no_grad():
        ms = interleaved_ms({"eager": lambda: model(tokens), "dense": lambda: dense(tokens),
                             "sparse": lambda: sparse(tokens)}, reps, calls)
    eager_ms, dense_ms, sparse_ms = ms["eager"], ms["dense"], ms["sparse"]
    paths = sorted({k["path"] for k in sparsecc.api.nm_kernel_choices(sparse)} or {"(one candidate: not tuned)"})
    return {"dim": size["dim"], "layers": size["layers"], "eager_ms": eager_ms, "dense_ms": dense_ms,
            "nm_ms": sparse_ms, "paths": paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--reps", type=int, default=30, help="rounds: one sample of each model per round")
    parser.add_argument("--calls", type=int, default=1,
                        help="consecutive calls per sample (a decode loop's; 1: the models alternate every call)")
    parser.add_argument("--dims", default=",".join(str(size["dim"]) for size in SIZES),
                        help="model widths to run, of " + ", ".join(str(size["dim"]) for size in SIZES))
    args = parser.parse_args()
    dims = {int(d) for d in args.dims.split(",")}
    print(f"{args.dtype}, {torch.get_num_threads()} threads, 1 token per call, {args.calls} consecutive call(s) "
          f"per sample, {args.reps} rounds")
    print(f"{'dim':>5} {'layers':>6} {'eager ms':>9} {'dense ms':>9} {'2:4 ms':>8} {'dense/2:4':>9}  paths")
    for size in (s for s in SIZES if s["dim"] in dims):
        r = row(size, DTYPES[args.dtype], args.reps, args.calls)
        print(f"{r['dim']:>5} {r['layers']:>6} {r['eager_ms']:9.3f} {r['dense_ms']:9.3f} {r['nm_ms']:8.3f} "
              f"{r['dense_ms'] / r['nm_ms']:8.2f}x  {','.join(r['paths'])}", flush=True)


if __name__ == "__main__":
    main()
