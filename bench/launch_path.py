"""How a compiled model's Triton kernels are launched on a GPU: the sparsecc kernel cache against Triton's JIT.

    python bench/launch_path.py [--json PATH]        (needs CUDA)

The bundled MoE example (N:M linears, block attention, MoE dispatch: every Triton kernel family) is compiled
twice in one process: once with `SPARSECC_TRITON_JIT=1` (Triton's own launcher and cache), once through the
sparsecc kernel cache (prebuilt binaries launched through the driver API, `sparsecc.cached_launch`).
Columns: compile seconds with a cold cache, then per-call median ms at a decode-like (1 x 16 tokens) and a
prefill-like (4 x 256) input, and the outputs' max |diff| between the two paths.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsecc  # noqa: E402
from examples.tiny_moe import build  # noqa: E402

SPARSITY = {"weights": "2:4", "moe": "dispatch", "attention": "mask"}


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def compiled_with(model, tokens, jit: bool):
    os.environ["SPARSECC_TRITON_JIT"] = "1" if jit else "0"
    start = time.perf_counter()
    compiled = sparsecc.compile(model, (tokens,), sparsity=SPARSITY, backend="triton", check=False)
    compiled(tokens)
    torch.cuda.synchronize()
    return compiled, time.perf_counter() - start


def rows() -> list[dict]:
    model, _ = build()
    model = model.cuda().half()
    out = []
    for batch, seq in ((1, 16), (4, 256)):
        tokens = torch.randint(0, 512, (batch, seq), device="cuda")
        jit, jit_s = compiled_with(model, tokens, jit=True)
        cached, cached_s = compiled_with(model, tokens, jit=False)
        diff = (jit(tokens).float() - cached(tokens).float()).abs().max().item()
        out.append({"tokens": f"{batch}x{seq}", "compile_s_jit": jit_s, "compile_s_cache": cached_s,
                    "ms_jit": bench_ms(lambda: jit(tokens)), "ms_cache": bench_ms(lambda: cached(tokens)),
                    "built": cached.kernel_launcher.built, "max_diff": diff})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/launch_path.py needs a CUDA GPU")
    os.environ.setdefault("SPARSECC_KERNEL_CACHE", tempfile.mkdtemp(prefix="sparsecc-kernels-"))
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'tokens':>8} {'compile jit s':>14} {'compile cache s':>16} {'jit ms':>8} {'cache ms':>9} "
          f"{'jit/cache':>10} {'max diff':>9}")
    table = rows()
    for r in table:
        print(f"{r['tokens']:>8} {r['compile_s_jit']:14.2f} {r['compile_s_cache']:16.2f} {r['ms_jit']:8.3f} "
              f"{r['ms_cache']:9.3f} {r['ms_jit'] / r['ms_cache']:10.2f} {r['max_diff']:9.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
