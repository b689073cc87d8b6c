"""Benchmark exported sparse attention in onnxruntime (CPU) against the dense export and ORT's own attention op.

    python bench/onnx_attention.py [--quick] [--json PATH]

One causal attention layer (projections, 8 query / 2 kv heads, head dim 64, SDPA under a boolean causal
mask built from arange, as transformers builds it), fp32, batch 1, run in onnxruntime on CPU with default
session options. Columns, all measured in one run:

    dense_onnx        torch.onnx.export of the dense layer (what a user exports today)
    ort_gqa           sparsecc policy `mask` (exact) exported with contrib=True: the causal mask maps to
                      com.microsoft.GroupQueryAttention, onnxruntime's own fused attention (the peer)
    window_function   sparsecc policy `window` (W keys + 4 sinks, block 64; lossy), contrib=False: the
                      `sparsecc::block_attention` local function (states the semantics, computes every block)
    window_sparse     the same with contrib=True: com.microsoft.SparseAttention, buffers bound by OnnxRunner
    sparsecc_torch    the compiled window model in the sparsecc runtime (torch CPU), for reference

Error columns: max |out - dense| / max |dense| of the ONNX output against the dense PyTorch layer (the window
policy is lossy, so its error is the policy's), and max |onnx - compiled| for the sparsecc columns.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import sparsecc
import torch
import torch.nn.functional as F
from sparsecc.onnx.runner import OnnxRunner

from bench.nm_linear import cpu_ms
from bench.onnx_moe import export_hf


class CausalAttention(torch.nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        group = self.heads // self.kv_heads
        k, v = (t[:, :, None].expand(b, self.kv_heads, group, s, self.head_dim).reshape(b, self.heads, s, -1)
                for t in (k, v))
        i = torch.arange(s)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None])
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def rel(out, ref: torch.Tensor) -> float:
    return float((torch.as_tensor(out) - ref).abs().max() / ref.abs().max())


def measure(seq: int, window: int, reps: int, tmp: str) -> dict:
    torch.manual_seed(0)
    model, x = CausalAttention().eval(), torch.randn(1, seq, 512)
    with torch.no_grad():
        dense = model(x)
    row = {"seq": seq, "window": window, "ms": {}, "err_vs_dense": {}, "err_vs_compiled": {}}
    files = {"dense_onnx": os.path.join(tmp, "dense.onnx")}
    export_hf(model, x, files["dense_onnx"])
    exact = sparsecc.compile(model, (x,), sparsity={"attention": "mask"}, check=False)
    files["ort_gqa"] = os.path.join(tmp, "gqa.onnx")
    exact.export_onnx(files["ort_gqa"], contrib=True)
    policy = {"attention": {"policy": "window", "block": 64, "window": window, "sinks": 4}}
    windowed = sparsecc.compile(model, (x,), sparsity=policy, check=False)
    compiled_out = windowed(x)
    for name, contrib in (("window_function", False), ("window_sparse", True)):
        files[name] = os.path.join(tmp, f"{name}.onnx")
        windowed.export_onnx(files[name], contrib=contrib)
    feed = x.numpy()
    for name, path in files.items():
        runner = OnnxRunner(path)
        out = runner.run(feed)[0]
        row["ms"][name] = cpu_ms(lambda: runner.run(feed), reps)
        row["err_vs_dense"][name] = rel(out, dense)
        if name.startswith("window"):
            row["err_vs_compiled"][name] = float((torch.as_tensor(out) - compiled_out).abs().max())
    with torch.no_grad():
        row["ms"]["sparsecc_torch"] = cpu_ms(lambda: windowed(x), reps)
    row["err_vs_dense"]["sparsecc_torch"] = rel(compiled_out, dense)
    return row


def print_row(row: dict) -> None:
    base = row["ms"]["dense_onnx"]
    print(f"\nseq {row['seq']}, window {row['window']} + 4 sinks (block 64)")
    print(f"{'column':>16} {'ms':>9} {'dense/col':>10} {'gqa/col':>8} {'err vs dense':>13} {'err vs compiled':>16}")
    for name, ms in row["ms"].items():
        print(f"{name:>16} {ms:9.1f} {base / ms:10.2f} {row['ms']['ort_gqa'] / ms:8.2f} "
              f"{row['err_vs_dense'][name]:13.2e} {row['err_vs_compiled'].get(name, float('nan')):16.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short sequence, few repetitions")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    shapes = [(512, 128)] if args.quick else [(2048, 256), (4096, 256)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq, window in shapes:
            rows.append(measure(seq, window, 3 if args.quick else 10, tmp))
            print_row(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
