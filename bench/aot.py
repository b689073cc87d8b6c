"""Benchmark ahead-of-time builds: build time per kernel and target, artifact size, load-to-first-output.

    python bench/aot.py [--quick] [--json PATH]

Per model (the README's tiny transformer with 2:4 weights, and a mixed model with block-sparse attention,
an MoE block and 2:4 weights):

    build        CompiledModel.save for cpu, cuda:80, cuda:90, hip:gfx942 with an empty kernel cache
                 (wall time; kernels built in parallel processes), then again with the cache warm
    per kernel   triton.compile time of each specialisation for each target (inside the workers)
    size         dense model's safetensors (state_dict) vs the artifact's weights.safetensors,
                 kernel binaries, manifest
    first output fresh Python process: `import sparsecc.runtime; load(DIR); model(x)` against
                 `import sparsecc; compile(model, x); model(x)`, imports included (median of 3 runs),
                 and `import torch` alone for scale

Everything runs on CPU (this machine may have no GPU); the build is a cross-compile.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import sparsecc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.tiny_transformer import TinyTransformer  # noqa: E402
from tests.passes.moe_models import Block, DenseMoE  # noqa: E402

TARGETS = ["cpu", "cuda:80", "cuda:90", "hip:gfx942"]


class MixedModel(nn.Module):
    """Masked attention (block-sparse rewrite), a residual MoE block (dispatch), linears (2:4)."""

    def __init__(self, dim: int = 256, heads: int = 4, experts: int = 8):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.moe = Block(DenseMoE(hidden=dim, inner=2 * dim, experts=experts), hidden=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        causal = torch.arange(s)[:, None] >= torch.arange(s)[None, :]
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=causal).transpose(1, 2).reshape(b, s, d))
        return self.moe(x)


def tiny(quick: bool):
    torch.manual_seed(0)
    model = TinyTransformer(dim=128, hidden=384, layers=2) if quick else TinyTransformer(4096, 512, 8, 1536, 4)
    return model.eval(), (torch.randint(0, 512, (2, 32)),), "2:4"


def mixed(quick: bool):
    torch.manual_seed(0)
    model = MixedModel(dim=64 if quick else 256).eval()
    sparsity = {"weights": "2:4", "moe": "dispatch", "attention": {"policy": "mask", "block": 64}}
    return model, (torch.randn(1, 128, model.qkv.in_features),), sparsity


MODELS = {"tiny_transformer": tiny, "mixed": mixed}

FIRST_OUTPUT = """
import sys, time
start = time.perf_counter()
{body}
print(time.perf_counter() - start)
"""
LOAD_BODY = """import sparsecc.runtime
from safetensors.torch import load_file
x = load_file(sys.argv[1])["x"]
sparsecc.runtime.load(sys.argv[2])(x)"""
COMPILE_BODY = """import sparsecc
sys.path.insert(0, {root!r})
sys.argv.append("--quick") if {quick} else None
from bench.aot import MODELS
model, inputs, sparsity = MODELS[{name!r}]({quick})
sparsecc.compile(model, inputs, sparsity=sparsity, check=False)(*inputs)"""


def fresh_process_seconds(body: str, args: list[str], reps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    times = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", FIRST_OUTPUT.format(body=body), *args], capture_output=True,
                             text=True, env=env, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def bench_model(name: str, quick: bool, reps: int, work: Path) -> dict:
    model, inputs, sparsity = MODELS[name](quick)
    start = time.perf_counter()
    compiled = sparsecc.compile(model, inputs, sparsity=sparsity, check=False)
    compile_s = time.perf_counter() - start
    path, cache = work / name, work / f"{name}-cache"
    start = time.perf_counter()
    manifest = compiled.save(path, targets=TARGETS, cache_dir=cache, progress=False)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled.save(path, targets=TARGETS, cache_dir=cache, progress=False)
    warm_s = time.perf_counter() - start
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / f"{name}-dense.safetensors"))
    save_file({"x": inputs[0]}, str(work / f"{name}-x.safetensors"))
    kernels = [{"kernel": k["id"], "target": t, "seconds": b["build_seconds"], "bytes": manifest["files"][b["file"]]["bytes"]}
               for k in manifest["kernels"] for t, b in k["binaries"].items()]
    load_s = fresh_process_seconds(LOAD_BODY, [str(work / f"{name}-x.safetensors"), str(path)], reps)
    compile_first_s = fresh_process_seconds(COMPILE_BODY.format(root=str(ROOT), quick=quick, name=name), [], reps)
    import_torch_s = fresh_process_seconds("import torch", [], reps)
    return {"model": name, "compile_s": compile_s, "build_cold_s": cold_s, "build_warm_s": warm_s,
            "kernels": kernels, "dense_bytes": (work / f"{name}-dense.safetensors").stat().st_size,
            "weights_bytes": manifest["files"]["weights.safetensors"]["bytes"],
            "kernel_bytes": sum(k["bytes"] for k in kernels), "manifest_bytes": (path / "manifest.json").stat().st_size,
            "load_first_output_s": load_s, "compile_first_output_s": compile_first_s, "import_torch_s": import_torch_s}


def print_result(r: dict) -> None:
    mib = 1 << 20
    print(f"\n## {r['model']}")
    print(f"build (4 targets, {len(r['kernels'])} binaries): cold cache {r['build_cold_s']:.1f} s, "
          f"warm cache {r['build_warm_s']:.2f} s; compile {r['compile_s']:.1f} s")
    print("| kernel | target | build s | binary KiB |\n|---|---|---|---|")
    for k in r["kernels"]:
        print(f"| {k['kernel']} | {k['target']} | {k['seconds']:.2f} | {k['bytes'] / 1024:.1f} |")
    by_target = {}
    for k in r["kernels"]:
        by_target[k["target"]] = by_target.get(k["target"], 0.0) + k["seconds"]
    print("per target (sum of kernel builds): " + ", ".join(f"{t} {s:.1f} s" for t, s in by_target.items()))
    print(f"size: dense safetensors {r['dense_bytes'] / mib:.2f} MiB; artifact weights {r['weights_bytes'] / mib:.2f} MiB "
          f"({r['weights_bytes'] / r['dense_bytes']:.1%}), kernels {r['kernel_bytes'] / 1024:.0f} KiB, "
          f"manifest {r['manifest_bytes'] / 1024:.0f} KiB")
    print(f"first output in a fresh process: load {r['load_first_output_s']:.2f} s vs compile "
          f"{r['compile_first_output_s']:.2f} s ({r['compile_first_output_s'] / r['load_first_output_s']:.1f}x); "
          f"`import torch` alone {r['import_torch_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, one rep")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="sparsecc-aot-bench-") as work:
        for name in MODELS:
            results.append(bench_model(name, args.quick, 1 if args.quick else 3, Path(work)))
            print_result(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
